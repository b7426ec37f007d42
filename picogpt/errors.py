"""The one exception type users see.

Every failure a user can cause or fix (a wrong name, a missing or damaged file, a network fault) is
raised as PicogptError with a one-line message that says what is wrong and what to do. The command
line prints that line and exits non-zero; anything else is a bug and keeps its traceback.
"""


class PicogptError(Exception):
    """A user-facing failure: str(error) is one sentence naming the problem and the fix."""


class BadArgument(PicogptError):
    """A setting that means nothing for this model or input (a scoring stride beyond the context): an
    argument error, which the command line reports with exit status 2 like argparse's own."""


def plural(count, noun):
    """'1 token', '2 tokens': a count with its noun (regular plurals only)."""
    return f"{count} {noun}" + ("" if count == 1 else "s")


def one_line(text):
    """text as one line: its lines joined by single spaces (a message may quote input holding line breaks)."""
    return " ".join(line.strip() for line in str(text).splitlines() if line.strip())


def shown(text):
    """text as it can be printed and stored as UTF-8 (JSON, a page): bytes of a file name or argument that
    are not UTF-8 (held by Python as lone surrogates) as \\xNN, any other lone surrogate as \\uNNNN."""
    text = str(text)
    try:
        return text.encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace")
    except UnicodeEncodeError:
        return text.encode("utf-8", "backslashreplace").decode("utf-8")


def first_line(error):
    """The first line of an exception's message (libraries raise multi-line ones), or its type's name."""
    text = str(error).strip()
    return text.splitlines()[0] if text else type(error).__name__


def interrupted(error):
    """Whether an exception is, or was raised while handling, a Ctrl-C: an extension module interrupted
    while importing (NumPy's) reports an ImportError whose context is the KeyboardInterrupt."""
    while error is not None:
        if isinstance(error, KeyboardInterrupt):
            return True
        error = error.__cause__ or error.__context__
    return False

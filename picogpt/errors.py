"""The one exception type users see.

Every failure a user can cause or fix (a wrong name, a missing or damaged file, a network fault) is
raised as PicogptError with a one-line message that says what is wrong and what to do. The command
line prints that line and exits non-zero; anything else is a bug and keeps its traceback.
"""


class PicogptError(Exception):
    """A user-facing failure: str(error) is one sentence naming the problem and the fix."""

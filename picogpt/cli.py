"""The command line: every `picogpt` subcommand (`python -m picogpt`, the `picogpt` console script, and
the thin scripts in tools/), each an argument parser over the package's Python API.

    picogpt "prompt" -n 20        generate (the default subcommand)
    picogpt score FILE            ...  and the others in SUBCOMMANDS; `picogpt --help` lists them

This module is the way in: the table of subcommands, and what every one of them shares when it runs
(`run`): a user mistake or a fault (PicogptError) prints one line on stderr and exits 1, a bad argument
one line and exits 2, Ctrl-C exits 130, SIGTERM 143, output into a closed pipe 141; --debug shows the
traceback instead. Each subcommand lives in picogpt/commands/ with its parser (their shared argument
types in commands/arguments.py), and its module is imported only when it runs: continuing a prompt
imports neither the converters nor the benchmark, the corpus jobs or PyTorch.
"""

import time

IMPORTS_STARTED = time.perf_counter()  # -v reports how long importing picogpt's modules took

import errno  # noqa: E402
import importlib  # noqa: E402
import os  # noqa: E402
import signal  # noqa: E402
import sys  # noqa: E402

from .errors import BadArgument, PicogptError, interrupted, one_line, shown  # noqa: E402

# name: (the module in picogpt/commands/ that holds it, one line for `picogpt --help`)
SUBCOMMANDS = {
    "generate": ("generate", "continue a prompt (the default: `picogpt \"prompt\" -n 20`)"),
    "score": ("score", "log-probability and perplexity of a text"),
    "attention": ("explain", "pictures of a layer's attention weights"),
    "explain": ("explain", "a web page of what the model computes over a prompt"),
    "score-corpus": ("corpus", "score every document of .jsonl/.txt files, resumably (on Ray with --ray)"),
    "complete-corpus": ("corpus", "continue every document of .jsonl/.txt files, resumably (on Ray with --ray)"),
    "verify": ("models", "check a model file's checksum and weights"),
    "convert-tf": ("models", "download OpenAI's checkpoint and convert it to model.dat"),
    "convert-hf": ("models", "convert a Hugging Face model folder to model.dat"),
    "convert-dtype": ("models", "rewrite a model.dat with bfloat16 (or float32) weight matrices"),
    "parity": ("compare", "compare picogpt with PyTorch layer by layer on a model"),
    "bench": ("compare", "time picogpt against PyTorch on the same weights"),
    "serve": ("serve", "an OpenAI-compatible completion server; concurrent requests decoded in one batch"),
    "serve-bench": ("serve", "time the server's batching at 1, 2, 4, 8 and 16 concurrent streams"),
}


def split_subcommand(argv):
    """(subcommand name, its arguments): the first argument names a subcommand, else it is generate's prompt."""
    name = argv[0] if argv and argv[0] in SUBCOMMANDS else "generate"
    return name, (argv[1:] if argv and argv[0] == name else argv)


def subcommand(name):
    """(parser(prog), command(args)) of a subcommand, its module imported now."""
    module = importlib.import_module(f".commands.{SUBCOMMANDS[name][0]}", __package__)
    return module.COMMANDS[name]


def subcommands_help():
    """The list of subcommands that `picogpt --help` ends with."""
    width = max(map(len, SUBCOMMANDS))
    lines = "\n".join(f"  {name:<{width}}  {summary}" for name, (_, summary) in SUBCOMMANDS.items())
    return (f"commands (picogpt COMMAND --help for each):\n{lines}\n\n"
            "A prompt that is a command's name is continued with: picogpt generate PROMPT (or picogpt [OPTIONS] -- "
            "PROMPT)")


def main(argv=None, prog=None):
    """`picogpt [SUBCOMMAND] ...`: the first argument names a subcommand, else it is generate's prompt.

    prog names the program in messages (default "picogpt SUBCOMMAND", "picogpt" for generate); the
    scripts in tools/ give their own file's name.
    """
    name, argv = split_subcommand(sys.argv[1:] if argv is None else list(argv))
    make_parser, command = subcommand(name)
    prog = prog or ("picogpt" if name == "generate" else f"picogpt {name}")
    parser = make_parser(prog)
    if name == "generate":  # the default subcommand's help is picogpt's own: it lists the others
        parser.epilog = subcommands_help()
    args = parser.parse_args(argv)
    args.prog, args.argv, args.imports_started = prog, argv, IMPORTS_STARTED
    return run(prog, command, args)


# ---------------------------------------------------------------------------------------------------
# Running a subcommand: exit statuses, signals, a closed or full output

class Terminated(BaseException):
    """SIGTERM (a plain `kill`), raised like Ctrl-C's KeyboardInterrupt so that half-written files are
    deleted on the way out."""


def raise_terminated(signum, frame):
    raise Terminated


class OutputFailed(Exception):
    """Writing the command's output (stdout) failed: a closed pipe, a full disk. Holds the OSError."""


class CheckedOutput:
    """sys.stdout while a command runs, telling a failed write to it (OutputFailed) from other OSErrors;
    a name that is not UTF-8 (a file's) is printed escaped (errors.shown) rather than failing."""

    def __init__(self, stream):
        self.stream = stream

    def write(self, text):
        try:
            try:
                return self.stream.write(text)
            except UnicodeEncodeError:  # (raised before anything is written)
                return self.stream.write(shown(text))
        except OSError as e:
            raise OutputFailed(e) from e

    def flush(self):
        try:
            return self.stream.flush()
        except OSError as e:
            raise OutputFailed(e) from e

    def __getattr__(self, name):
        return getattr(self.stream, name)


def say(prog, message):
    """One line on stderr (a name that is not UTF-8 escaped: errors.shown); nothing if stderr itself is gone
    (a closed pipe), since there is nowhere to say it."""
    try:
        print(shown(f"{prog}: {message}"), file=sys.stderr, flush=True)
    except OSError:
        pass


def silence_stdout():
    """Send what stdout still holds to /dev/null, so that Python's flush at exit cannot fail again."""
    try:
        fd = sys.stdout.fileno()
    except (AttributeError, OSError, ValueError):  # not a real file (a test's capture)
        return
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, fd)
    os.close(devnull)


def end_line(args):
    """End a half-printed continuation (so the error is on a line of its own), if stdout still works."""
    if getattr(args, "mid_line", False):
        try:
            print(flush=True)
        except (OSError, OutputFailed):
            pass


def run(prog, command, args):
    """Run command(args), turning failures into one line on stderr and an exit status:

    PicogptError 1 (BadArgument 2, as argparse's own), Ctrl-C 130, a closed output pipe 141 (128 +
    SIGPIPE, as a shell reports any tool that `| head` closed on) and nothing said, a failed write to the
    output (a full disk) 1, memory exhausted 1. --debug shows the traceback instead.
    """
    stdout, sys.stdout = sys.stdout, CheckedOutput(sys.stdout)
    try:
        previous_sigterm = signal.signal(signal.SIGTERM, raise_terminated)
    except ValueError:  # not the main thread
        previous_sigterm = None
    try:
        status = command(args) or 0
        sys.stdout.flush()
        return status
    except OutputFailed as e:
        if args.debug:
            raise
        silence_stdout()
        error = e.args[0]
        if error.errno == errno.EPIPE:
            return 141
        say(prog, f"error: cannot write the output: {error.strerror}; free some space, or send the output "
                  "somewhere else")
        return 1
    except Terminated:
        end_line(args)
        say(prog, "terminated")
        return 143  # 128 + SIGTERM
    except (PicogptError, MemoryError, KeyboardInterrupt, ImportError) as e:  # BadArgument is a PicogptError
        if args.debug or (isinstance(e, ImportError) and not interrupted(e)):
            raise
        end_line(args)
        if interrupted(e):  # a Ctrl-C, or an import it interrupted (TensorFlow's, matplotlib's)
            say(prog, "interrupted")
            return 130
        if isinstance(e, MemoryError):
            say(prog, "error: out of memory; ask for less at once (fewer samples or prompts, fewer tokens, "
                      "a shorter prompt) or use a smaller model")
            return 1
        if isinstance(e, BadArgument):
            say(prog, f"error: {one_line(e)}; see {prog} --help")
            return 2
        say(prog, f"error: {one_line(e)}")
        return 1
    finally:
        sys.stdout = stdout
        if previous_sigterm is not None:
            signal.signal(signal.SIGTERM, previous_sigterm)

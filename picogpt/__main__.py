"""`python -m picogpt` and the `picogpt` console script: the command line of picogpt.cli.

Importing the command line loads NumPy and the rest, a noticeable fraction of a second: a Ctrl-C in
that time ends quietly, as it does later (picogpt.cli.run), instead of with an import's traceback.
A Ctrl-C can reach an extension module inside its C initialisation, which may report it as an
ImportError that no longer mentions it (NumPy does), so the signal itself is noted while importing.
"""

import signal
import sys

_ctrl_c_while_importing = []


def _note_ctrl_c(signum, frame):
    _ctrl_c_while_importing.append(signum)
    raise KeyboardInterrupt


def _import_cli():
    """picogpt.cli.main, imported with Ctrl-C noted (in the main thread; elsewhere signals are not ours)."""
    try:
        previous = signal.signal(signal.SIGINT, _note_ctrl_c)
    except ValueError:
        previous = None
    try:
        from picogpt.cli import main
        return main
    finally:
        if previous is not None:
            signal.signal(signal.SIGINT, previous)  # may run a pending Ctrl-C's handler: still in main's try


def main(argv=None, prog=None):
    try:
        cli_main = _import_cli()
    except BaseException as e:
        from picogpt.errors import interrupted
        if not (_ctrl_c_while_importing or interrupted(e)):
            raise
        print(f"{prog or 'picogpt'}: interrupted", file=sys.stderr)
        return 130
    return cli_main(argv, prog=prog)


if __name__ == "__main__":
    sys.exit(main())

"""`python -m picogpt` and the `picogpt` console script: the command line of picogpt.cli.

Importing the command line and the subcommand's module loads NumPy and the rest, a noticeable fraction
of a second: a Ctrl-C in
that time, or while the arguments are read, ends quietly, as it does later (picogpt.cli.run), instead
of with a traceback.
A Ctrl-C can reach an extension module inside its C initialisation, which may report it as an
ImportError that no longer mentions it (NumPy does), so the signal itself is noted while importing.
"""

import shlex
import signal
import sys

_ctrl_c_while_importing = []


def _note_ctrl_c(signum, frame):
    _ctrl_c_while_importing.append(signum)
    raise KeyboardInterrupt


def _import_cli(argv):
    """picogpt.cli.main, imported with the module of the subcommand argv names, with Ctrl-C noted (in the
    main thread; elsewhere signals are not ours)."""
    try:
        previous = signal.signal(signal.SIGINT, _note_ctrl_c)
    except ValueError:
        previous = None
    try:
        from picogpt.cli import main, split_subcommand, subcommand
        subcommand(split_subcommand(sys.argv[1:] if argv is None else list(argv))[0])
        return main
    finally:
        if previous is not None:
            signal.signal(signal.SIGINT, previous)  # may run a pending Ctrl-C's handler: still in main's try


def main(argv=None, prog=None):
    try:
        cli_main = _import_cli(argv)
    except BaseException as e:
        from picogpt.errors import interrupted
        if _ctrl_c_while_importing or interrupted(e):
            print(f"{prog or 'picogpt'}: interrupted", file=sys.stderr)
            return 130
        if isinstance(e, ModuleNotFoundError) and e.name in REQUIRED_MODULES:
            print(f"{prog or 'picogpt'}: error: {missing_requirement(e.name)}", file=sys.stderr)
            return 1
        raise
    try:
        return cli_main(argv, prog=prog)
    except KeyboardInterrupt:  # between the import and the command (reading the arguments): cli.run has the rest
        if "--debug" in (sys.argv[1:] if argv is None else argv):
            raise
        print(f"{prog or 'picogpt'}: interrupted", file=sys.stderr)
        return 130


# The modules of setup.cfg's install_requires: one of them missing means picogpt runs under a Python
# it was not installed into (the system's, beside a checkout's virtual environment).
REQUIRED_MODULES = {"numpy", "scipy", "threadpoolctl", "tiktoken", "requests", "tqdm", "platformdirs"}


def missing_requirement(module):
    """One sentence for a required module that this Python lacks, with the command that works instead."""
    from pathlib import Path
    checkout = Path(__file__).resolve().parent.parent
    venv_python = checkout / ".venv" / "bin" / "python"
    if venv_python.exists() and Path(sys.prefix).resolve() != (checkout / ".venv").resolve():
        try:
            venv_python = venv_python.relative_to(Path.cwd())
        except ValueError:
            pass
        script = sys.argv[0] if sys.argv[0].endswith(".py") and not sys.argv[0].endswith("__main__.py") else None
        python = shlex.quote(str(venv_python))
        command = f"{python} {shlex.quote(script)}" if script else f"{python} -m picogpt"
        return (f"{module} is not installed for {sys.executable}, which is not picogpt's virtual environment; "
                f"run {command} (or source its bin/activate first)")
    return (f"{module} is not installed for {sys.executable}; install picogpt's requirements with: "
            f"{shlex.quote(sys.executable)} -m pip install -e {shlex.quote(str(checkout))}")


if __name__ == "__main__":
    sys.exit(main())

"""Commands quoted in messages ("fetch it with: ..."), spelled so that they work as printed, from the
folder the user is in, with the Python that is running picogpt.

    picogpt_command("convert-tf", "--model-size", "124M")
        -> "picogpt convert-tf --model-size 124M"      when the `picogpt` on PATH is this installation's
        -> ".venv/bin/python -m picogpt convert-tf ..." otherwise (this interpreter, relative when below .)
    install_command("convert")
        -> ".venv/bin/python -m pip install 'tensorflow-cpu>=2.15'"

Optional parts are installed by naming their own packages (read from this installation's metadata),
never as `picogpt[extra]`: a different project called picogpt exists on the package index.
"""

import importlib.metadata
import importlib.util
import os
import shlex
import shutil
import sys
from pathlib import Path

CHECKOUT = Path(__file__).resolve().parent.parent  # the source checkout, when picogpt runs from one


def _shortest(path):
    """path relative to the current folder when it lies below it (.venv/bin/python), else absolute."""
    path = Path(path).absolute()
    try:
        return str(path.relative_to(Path.cwd()))
    except ValueError:
        return str(path)


def python_command():
    """This interpreter, as a command: `python3` when that name on PATH is this interpreter."""
    for name in ("python3", "python"):
        found = shutil.which(name)
        if found and os.path.realpath(found) == os.path.realpath(sys.executable) \
                and Path(found).parent == Path(sys.executable).parent:
            return name
    return shlex.quote(_shortest(sys.executable))


def picogpt_command(*args):
    """`picogpt ARGS` as the user can type it here: the console script if the one on PATH belongs to this
    interpreter's installation, else `PYTHON -m picogpt`. Arguments are quoted for a POSIX shell."""
    script = shutil.which("picogpt")
    if script and Path(script).resolve().parent == Path(sys.executable).absolute().parent.resolve():
        command = "picogpt"
    else:
        command = f"{python_command()} -m picogpt"
    return " ".join([command, *(shlex.quote(str(a)) for a in args)])


def extra_requirements(extra):
    """The requirements of one of picogpt's extras ("convert", "plot"...), as this installation lists them."""
    try:
        requires = importlib.metadata.requires("picogpt") or []
    except importlib.metadata.PackageNotFoundError:
        return []
    wanted = [f'extra == "{extra}"', f"extra == '{extra}'"]
    return [r.split(";")[0].strip() for r in requires if ";" in r and any(w in r.split(";", 1)[1] for w in wanted)]


def install_command(extra):
    """A pip command that installs an extra's packages into this interpreter. Where picogpt is not installed
    (run from a checkout on PYTHONPATH), the checkout itself with the extra."""
    requirements = extra_requirements(extra)
    if not requirements:
        requirements = [f"{_shortest(CHECKOUT)}[{extra}]"] if (CHECKOUT / "setup.cfg").is_file() else []
        if not requirements:
            return f"{python_command()} -m pip install <picogpt's {extra} extra>"
        return f"{python_command()} -m pip install -e {shlex.quote(requirements[0])}"
    return f"{python_command()} -m pip install {' '.join(shlex.quote(r) for r in requirements)}"


def in_checkout():
    """Whether the user stands in picogpt's source checkout, where `make` targets work as printed."""
    return (CHECKOUT / "Makefile").is_file() and Path.cwd().resolve() == CHECKOUT


def fetch_command(size, models_dir=None):
    """The one command that fetches GPT-2 `size` (downloads and converts it), including TensorFlow's
    installation when it is missing. models_dir only when the user named one (else the default is used)."""
    if in_checkout():
        return f"make fetch MODEL={size}" + (f" MODELS_DIR={shlex.quote(str(models_dir))}" if models_dir else "")
    args = ["convert-tf", "--model-size", size] + (["--models-dir", str(models_dir)] if models_dir else [])
    fetch = picogpt_command(*args)
    if importlib.util.find_spec("tensorflow") is None:
        return f"{install_command('convert')} && {fetch}"
    return fetch

"""picogpt's shipped data: GPT-2's vocabulary (data/gpt2) and the demo model (data/demo).

They are found in the source checkout's data/ folder (an editable install runs from it), else where
setup.cfg's data_files install them (PREFIX/share/picogpt). A missing or damaged file says how to get
it back: from git in a checkout, else by reinstalling.
"""

import shlex
import sys
from pathlib import Path

from . import hints
from .errors import PicogptError

DEMO = "demo"  # the small model trained on Python's documentation that ships in data/demo (see its README)


def data_dirs():
    """The folders that may hold picogpt's shipped data, in the order they are tried."""
    return [Path(__file__).resolve().parent.parent / "data", Path(sys.prefix) / "share" / "picogpt"]


def find_file(name, dirs):
    """The first of dirs that holds a file `name`, joined with it; None if none does."""
    return next((Path(d) / name for d in dirs if (Path(d) / name).is_file()), None)


def demo_model_path():
    """data/demo/model.dat: in the source checkout, or where setup.cfg's data_files install it."""
    path = find_file(f"{DEMO}/model.dat", data_dirs())
    if path is None:
        raise PicogptError(f"the demo model (data/demo/model.dat) is missing; {demo_remake_hint()}")
    return path


def demo_remake_hint():
    if (hints.CHECKOUT / ".git").exists() and (hints.CHECKOUT / "data" / DEMO).is_dir():
        return f"restore it with: git -C {shlex.quote(str(hints.CHECKOUT))} checkout -- data/{DEMO}/model.dat"
    return "reinstall picogpt"

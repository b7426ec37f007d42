"""Files: where picogpt's shipped data lies, and writing a file so that it appears complete or not at all.

Shipped data (GPT-2's vocabulary in data/gpt2, the demo model in data/demo) is found in the source
checkout's data/ folder (an editable install runs from it), else where setup.cfg's data_files install it.

Writing: into a hidden temporary file beside the final name, renamed onto it (os.replace) only once
complete, deleted on any failure.
"""

import os
import sys
import tempfile
from pathlib import Path


def data_dirs():
    """The folders that may hold picogpt's shipped data, in the order they are tried."""
    return [Path(__file__).resolve().parent.parent / "data", Path(sys.prefix) / "share" / "picogpt"]


def find_file(name, dirs):
    """The first of dirs that holds a file `name`, joined with it; None if none does."""
    return next((Path(d) / name for d in dirs if (Path(d) / name).is_file()), None)


def temp_file_beside(path, suffix):
    """A new hidden temporary file in path's folder (same file system, so the rename is atomic): (fd, Path).

    mkstemp makes it private (mode 0600); it gets the permissions any new file would (0666 less the
    umask), since it is to become an ordinary file such as a model or a picture.
    """
    path = Path(path)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=suffix)
    try:
        umask = os.umask(0)
        os.umask(umask)
        os.fchmod(fd, 0o666 & ~umask)
    except BaseException:
        os.close(fd)
        os.unlink(tmp)
        raise
    return fd, Path(tmp)

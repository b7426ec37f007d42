"""Writing a file so that it appears complete or not at all: into a hidden temporary file beside it,
renamed onto the final name (os.replace) only once complete, deleted on any failure."""

import os
import tempfile
from pathlib import Path


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

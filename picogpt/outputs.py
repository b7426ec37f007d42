"""Writing outputs: where an output file may go (checked before the work that makes it), and writing a
file so that it appears complete or not at all.

A path that is not a regular file (a device such as /dev/null or /dev/stdout, a named pipe) is written
through, for outputs that are written once from start to end (pages, pictures, JSON), and refused in one
sentence for those that are not (a model.dat is written in place and mapped when read): it is never
replaced by a file, whatever the writer (`replace_onto` is the one rename every writer goes through).

Writing: into a hidden temporary file beside the final name, renamed onto it (os.replace) only once
complete, deleted on any failure. A process killed outright (SIGKILL, a power cut) cannot delete it, so
its name says whose it is, `.model.dat.HOST.PID.RANDOM.partial`, and the next writer of the same file
(or `picogpt verify`) removes those whose process is gone from this machine.
"""

import contextlib
import os
import re
import socket
import stat
import tempfile
from pathlib import Path

from .errors import PicogptError


def _host():
    """This machine's name, reduced to letters, digits and dashes (it is part of file names)."""
    return re.sub(r"[^A-Za-z0-9-]", "-", socket.gethostname())[:64] or "localhost"


def _process_is_gone(pid):
    if os.name != "posix":  # os.kill(pid, 0) would terminate the process on Windows: never claim it is gone
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    except OSError:  # it exists but is someone else's (EPERM), or we cannot tell
        return False
    return False


def remove_stale_partials(path, suffix=".partial"):
    """Delete the temporary files that writers of `path` killed on this machine left beside it (their
    process no longer exists); files of live writers, of other machines, or of unknown origin are kept.
    Returns the paths removed."""
    path = Path(path)
    own = re.compile(rf"^\.{re.escape(path.name)}\.(?P<host>[A-Za-z0-9-]+)\.(?P<pid>\d+)\.[^.]+{re.escape(suffix)}$")
    removed = []
    try:
        names = os.listdir(path.parent)
    except OSError:
        return removed
    for name in names:
        match = own.match(name)
        if match and match["host"] == _host() and _process_is_gone(int(match["pid"])):
            try:
                os.unlink(path.parent / name)
                removed.append(path.parent / name)
            except OSError:
                pass
    return removed


def temp_file_beside(path, suffix):
    """A new hidden temporary file in path's folder (same file system, so the rename is atomic): (fd, Path).

    Its name carries this machine's name and process id, and stale ones of earlier writers of the same
    path are removed first (see remove_stale_partials). mkstemp makes it private (mode 0600); it gets the
    permissions any new file would (0666 less the umask), since it is to become an ordinary file such as
    a model or a picture.
    """
    path = Path(path)
    remove_stale_partials(path, suffix)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.{_host()}.{os.getpid()}.", suffix=suffix)
    try:
        umask = os.umask(0)
        os.umask(umask)
        os.fchmod(fd, 0o666 & ~umask)
    except BaseException:
        os.close(fd)
        os.unlink(tmp)
        raise
    return fd, Path(tmp)


def not_a_file(path):
    """What an existing path is when it is not a regular file (links followed): "a character device", "a
    block device", "a named pipe", "a socket", "a folder"; None for a regular file or nothing at all."""
    try:
        mode = os.stat(path).st_mode
    except (OSError, ValueError):
        return None
    kinds = ((stat.S_ISREG, None), (stat.S_ISDIR, "a folder"), (stat.S_ISCHR, "a character device"),
             (stat.S_ISBLK, "a block device"), (stat.S_ISFIFO, "a named pipe"), (stat.S_ISSOCK, "a socket"))
    return next((kind for test, kind in kinds if test(mode)), "not a regular file")


def replace_onto(tmp, path):
    """os.replace(tmp, path), the rename that completes every atomic write, but never onto something that
    is not a regular file: renaming onto /dev/full (as root) would put a file where the device was."""
    kind = not_a_file(path)
    if kind is not None:
        raise PicogptError(f"{path} is {kind}, not a file, and was left as it is; give the name of a file")
    os.replace(tmp, path)


def output_file(path, default_name=None, create_folder=False, regular=False):
    """Where an output file goes, checked before the work that makes it: a path naming a folder means
    default_name inside it (without one, it is an error that says so); a symbolic link means the file it
    points to; a device or pipe (/dev/stdout) is written through, if it can be, or refused where the
    output must be a regular file (regular=True: a model.dat); otherwise the folder must exist (or is
    made, with create_folder) and take a new file, and an existing file must be writable. Returns the
    Path; a problem is one PicogptError sentence."""
    path = Path(path)
    if path.is_dir():
        if default_name is None:
            raise PicogptError(f"{path} is a folder; give a file name, such as {path / 'results.json'}")
        path = path / default_name
    kind = not_a_file(path)
    if kind is not None:  # a device or a pipe: written through, no temporary file beside it
        if regular:
            raise PicogptError(f"{path} is {kind}, not a file: this output is written in place and read back by "
                               f"mapping it, so it needs a regular file; give a file name")
        if not os.access(path, os.W_OK):
            raise PicogptError(f"cannot write {path}: permission denied; choose another file")
        return path
    if path.is_file() and not os.access(path, os.W_OK):  # the user's read-only mark: not replaced behind it
        raise PicogptError(f"cannot write {path}: the file is read-only; make it writable (chmod u+w) or choose "
                           f"another file")
    path = path.resolve() if path.is_symlink() else path  # replace the file a link points to, not the link
    folder = path.parent
    if create_folder:
        try:
            folder.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise PicogptError(f"cannot write in {folder}: {e.strerror}; choose a writable folder") from None
    if not folder.is_dir():
        problem = "is not a folder" if folder.exists() else "does not exist"
        raise PicogptError(f"cannot write {path}: the folder {folder} {problem}; create it or choose another")
    try:
        with tempfile.TemporaryFile(dir=folder):  # the one sure test of "can a file be made here"
            pass
    except OSError as e:
        raise PicogptError(f"cannot write {path}: {e.strerror}; choose a writable folder") from None
    return path


@contextlib.contextmanager
def atomic_output(path):
    """`with atomic_output(path) as f:` writes a file that appears complete or not at all: f is a
    temporary file beside path, renamed onto it when the block ends, deleted if it fails. A symbolic
    link's target is what is replaced; a device or a pipe (/dev/stdout) is written directly. An OSError
    (a full disk, a folder that takes no files) becomes one PicogptError sentence."""
    path = Path(path)
    if not_a_file(path) not in (None, "a folder"):  # a device or a pipe: written through
        try:
            with open(path, "wb") as f:
                yield f
        except OSError as e:
            raise PicogptError(f"cannot write {path}: {e.strerror}; choose another file") from None
        return
    path = path.resolve() if path.is_symlink() else path
    try:
        fd, tmp = temp_file_beside(path, ".partial")
    except OSError as e:
        raise PicogptError(f"cannot write {path}: {e.strerror}; choose a writable folder") from None
    try:
        with os.fdopen(fd, "wb") as f:
            yield f
        replace_onto(tmp, path)
    except BaseException as e:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        if isinstance(e, OSError):
            raise PicogptError(f"cannot write {path}: {e.strerror}; free some space or choose another folder") from None
        raise


def write_atomically(path, data):
    """Write bytes to path so that it appears complete or not at all (see atomic_output)."""
    with atomic_output(path) as f:
        f.write(data)
    return Path(path)

"""Download OpenAI's GPT-2 TensorFlow checkpoint files, resumably; the facts of that release (sizes, URL, files).

The checkpoints are large (the 1558M data file is about 6 GB) and the links people download them over
are not always good, so every file is:

- streamed to `NAME.partial` in chunks, never held in memory;
- renamed to `NAME` only once exactly the announced number of bytes is on disk, so a file with the
  final name is complete by construction and is never fetched again;
- resumed with `Range: bytes=N-` from whatever a `.partial` holds, both between retries and when the
  user re-runs the command after a failure or Ctrl-C;
- retried with exponential back-off on faults that may go away (connection errors, timeouts, a body
  cut short, HTTP 5xx and 429), and failed at once on ones that will not (404, other 4xx, an HTML
  page where a file should be).

Every failure is a PicogptError with a one-line message naming the URL or file and what to do.
This module prints nothing but the progress bars; the caller prints summaries.

requests, urllib3 and tqdm are imported by the functions that download, not with the module: every
`import picogpt` reads this module's release facts, and those libraries would add about 60 ms to it.
"""

from __future__ import annotations

import os
import re
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING, Optional

from .errors import PicogptError, one_line, plural
from .outputs import replace_onto

if TYPE_CHECKING:  # for the annotations only
    import requests

# OpenAI's release of GPT-2: the four sizes, where they are served, and the files of each checkpoint.
MODEL_SIZES = ("124M", "355M", "774M", "1558M")
DEFAULT_BASE_URL = "https://openaipublic.blob.core.windows.net/gpt-2/models"
BASE_URL_ENV = "PICOGPT_BASE_URL"  # a mirror for every fetch that names none, e.g. inside a company network
CHECKPOINT_FILES = (
    "checkpoint",
    "encoder.json",
    "hparams.json",
    "model.ckpt.data-00000-of-00001",
    "model.ckpt.index",
    "model.ckpt.meta",
    "vocab.bpe",
)
CHUNK_SIZE = 1 << 20  # bytes per write: small enough to lose little on a cut, big enough to be cheap

_NETWORK_FIX = "check your network or use --base-url to point at a mirror, then re-run the same command to resume"
_CONTENT_RANGE = re.compile(r"bytes\s+(?:(\d+)-(\d+)|\*)/(\d+|\*)\s*$")


def check_model_size(size):
    """Return `size` if it is one of OpenAI's GPT-2 sizes; raise PicogptError naming them if not."""
    if size not in MODEL_SIZES:
        raise PicogptError(f"unknown GPT-2 model size {size!r}; choose one of {', '.join(MODEL_SIZES)}")
    return size


def resolve_base_url(given=None):
    """Where checkpoints are downloaded from: `given`, else $PICOGPT_BASE_URL, else OpenAI's own (DEFAULT_BASE_URL)."""
    return given or os.environ.get(BASE_URL_ENV) or DEFAULT_BASE_URL


class _Transient(Exception):
    """A fault worth retrying; its str is the reason, for the message if we run out of attempts."""


def download_checkpoint(
    size,
    dest_dir,
    base_url: str | None = None,
    *,
    progress: bool = True,
    retries: int = 5,
    backoff: float = 1.0,
    timeout: float = 30.0,
) -> Path:
    """Fetch the seven checkpoint files of one model size into dest_dir (created if needed).

    Files already complete in dest_dir are skipped, and `.partial` files are resumed, so re-running
    after any failure finishes the job. base_url: see resolve_base_url(). Returns dest_dir as a Path.
    """
    size = check_model_size(size)
    base_url = resolve_base_url(base_url)
    dest_dir = Path(dest_dir)
    try:
        dest_dir.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise PicogptError(f"cannot create the directory {dest_dir}: {e.strerror}; choose another one") from e
    import requests

    with requests.Session() as session:  # one connection pool: the seven files reuse a connection
        for name in CHECKPOINT_FILES:
            download_file(
                f"{base_url.rstrip('/')}/{size}/{name}",
                dest_dir / name,
                session=session,
                progress=progress,
                retries=retries,
                backoff=backoff,
                timeout=timeout,
            )
    return dest_dir


def download_file(
    url: str,
    dest,
    *,
    session: Optional[requests.Session] = None,
    progress: bool = True,
    retries: int = 5,
    backoff: float = 1.0,
    timeout: float = 30.0,
) -> Path:
    """Fetch `url` to `dest` through `dest.partial`, resuming and retrying; return dest as a Path.

    A `dest` that already exists is taken as complete and not fetched. Up to `retries` attempts are
    made, sleeping backoff * 2**attempt seconds between them; each attempt resumes from the partial.
    """
    import requests

    dest = Path(dest)
    if dest.exists():
        return dest
    partial = dest.with_name(dest.name + ".partial")
    own_session = session is None
    if own_session:
        session = requests.Session()
    try:
        attempts = max(1, retries)
        for attempt in range(attempts):
            try:
                _attempt(session, url, dest, partial, progress, timeout)
                return dest
            except _Transient as e:
                reason = str(e)
            if attempt + 1 < attempts:
                time.sleep(backoff * 2**attempt)
        raise PicogptError(one_line(f"download of {url} failed after {plural(attempts, 'attempt')} ({reason}); "
                                    f"{_NETWORK_FIX}"))
    finally:
        if own_session:
            session.close()


def _attempt(session: requests.Session, url: str, dest: Path, partial: Path, progress: bool, timeout: float) -> None:
    """One request: append what the server sends to `partial`; rename it to `dest` once complete.

    Raises _Transient for faults worth another try, PicogptError for those that are not.
    """
    import requests
    import urllib3
    from tqdm import tqdm

    have = partial.stat().st_size if partial.exists() else 0
    # identity: the byte counts in Content-Length / Content-Range must be the bytes we write.
    headers = {"Accept-Encoding": "identity"}
    if have:
        headers["Range"] = f"bytes={have}-"
    try:
        response = session.get(url, headers=headers, stream=True, timeout=timeout)
    except (requests.exceptions.InvalidURL, requests.exceptions.MissingSchema, requests.exceptions.InvalidSchema) as e:
        raise PicogptError(f"cannot download {url}: not a valid http(s) URL; check --base-url") from e
    except requests.RequestException as e:
        raise _Transient(_reason(e)) from e

    with response:
        status = response.status_code
        if status == 416 and have:
            # We asked for bytes past the end: if the partial is exactly the whole file, it is done
            # (a previous run was cut between the last byte and the rename).
            _, _, total = _parse_content_range(response.headers.get("Content-Range"))
            if total == have:
                return _finish(partial, dest)
            _discard(partial)  # bigger than the file on the server: not a prefix of it, start over
            raise _Transient(f"{partial.name} did not match the file on the server and was discarded")
        if status == 404:
            raise PicogptError(f"no such file on the server: {url}; check the model size / --base-url")
        if status == 429 or status >= 500:
            raise _Transient(f"server answered HTTP {status} {response.reason or ''}".strip())
        if status not in (200, 206):
            raise PicogptError(
                one_line(f"server refused {url} with HTTP {status} {response.reason or ''}; check the URL / --base-url")
            )
        content_type = response.headers.get("Content-Type", "").split(";")[0].strip().lower()
        if content_type == "text/html":
            # None of the checkpoint files is HTML: this is a captive portal, a proxy's login page or
            # an error page served with 200. Retrying will not help until the network is fixed.
            raise PicogptError(
                f"{url} returned an HTML page instead of the file (a captive portal, proxy login or error page?); "
                "check your network or use --base-url to point at a mirror"
            )
        if response.headers.get("Content-Encoding", "identity").lower() != "identity":
            raise PicogptError(
                f"server sent {url} compressed although asked not to, so its size cannot be checked; "
                "use --base-url to point at another mirror"
            )

        if status == 206:
            start, _, total = _parse_content_range(response.headers.get("Content-Range"))
            if start != have or total is None:
                _discard(partial)  # not the continuation we asked for: start again from byte zero
                raise _Transient(f"server answered a resume request with the wrong range for {partial.name}")
            mode = "ab"
        else:
            # 200 is the whole file from byte zero, even if we asked for a range (some servers and
            # proxies ignore Range): restart the partial rather than append to it.
            have, mode = 0, "wb"
            total = _content_length(response)
            if total is None and response.headers.get("Transfer-Encoding", "").lower() != "chunked":
                # Without a length (or chunked framing) a cut connection looks like a clean end.
                raise PicogptError(
                    f"server sent {url} without a Content-Length, so a cut download could not be detected; "
                    "use --base-url to point at another mirror"
                )
        length = _content_length(response)
        if status == 206 and length is not None and have + length != total:
            raise _Transient(f"server's Content-Length and Content-Range disagree for {url}")

        bar = tqdm(
            total=total,
            initial=have,
            desc=dest.name,
            unit="B",
            unit_scale=True,
            unit_divisor=1024,
            file=sys.stderr,
            disable=not (progress and sys.stderr.isatty()),  # no bar in logs or under pytest
        )
        try:
            with bar, open(partial, mode) as f:
                # Read the raw stream, not iter_content: on a cut connection iter_content drops the
                # chunk it was filling, while raw reads hand over every byte that arrived, so the
                # partial keeps them. (Content-Encoding is identity, checked above: nothing to decode.)
                for chunk in response.raw.stream(CHUNK_SIZE, decode_content=False):
                    f.write(chunk)
                    have += len(chunk)
                    bar.update(len(chunk))
                    if total is not None and have > total:
                        _discard(partial)
                        raise _Transient(f"server sent more than the {total} bytes it announced")
        except (requests.RequestException, urllib3.exceptions.HTTPError) as e:  # before OSError: these can be OSErrors too
            # Typically the connection closed mid-file; what arrived stays in the partial.
            raise _Transient(f"{_reason(e)} after {have} of {total or '?'} bytes") from e
        except OSError as e:
            raise PicogptError(
                f"cannot write {partial}: {e.strerror or e}; free some disk space or fix permissions, "
                "then re-run the same command to resume"
            ) from e

    if total is not None and have != total:
        raise _Transient(f"connection closed after {have} of {total} bytes")
    _finish(partial, dest)


def _finish(partial: Path, dest: Path) -> None:
    try:
        replace_onto(partial, dest)  # atomic: dest appears complete or not at all; never onto a device
    except OSError as e:
        raise PicogptError(f"cannot rename {partial} to {dest.name}: {e.strerror or e}; fix permissions and re-run") from e


def _discard(partial: Path) -> None:
    try:
        partial.unlink()
    except FileNotFoundError:
        pass


def _content_length(response: requests.Response) -> Optional[int]:
    value = response.headers.get("Content-Length", "")
    return int(value) if value.strip().isdigit() else None


def _parse_content_range(value: Optional[str]) -> tuple[Optional[int], Optional[int], Optional[int]]:
    """'bytes 10-99/100' -> (10, 99, 100); 'bytes */100' -> (None, None, 100); unknown parts -> None."""
    match = _CONTENT_RANGE.match((value or "").strip())
    if not match:
        return None, None, None
    start, end, total = match.groups()
    to_int = lambda s: int(s) if s and s.isdigit() else None  # noqa: E731
    return to_int(start), to_int(end), to_int(total)


def _reason(error: BaseException) -> str:
    """A short description of a requests/urllib3 error, from the root cause where there is one.

    requests wraps urllib3 which wraps the socket error, and the outer messages are long reprs.
    """
    import requests
    import urllib3

    seen, todo = set(), [error]
    while todo:
        e = todo.pop()
        if id(e) in seen:
            continue
        seen.add(id(e))
        if isinstance(e, ConnectionRefusedError):
            return "connection refused"
        if isinstance(e, TimeoutError) or "timed out" in str(e).lower():
            return "timed out"
        if isinstance(e, OSError) and not isinstance(e, requests.RequestException) and e.strerror:
            return e.strerror.lower()
        todo += [x for x in (e.__cause__, e.__context__, getattr(e, "reason", None)) if isinstance(x, BaseException)]
        todo += [x for x in getattr(e, "args", ()) if isinstance(x, BaseException)]
    if isinstance(error, (requests.exceptions.ChunkedEncodingError, urllib3.exceptions.ProtocolError)):
        return "connection closed mid-file"
    return one_line(f"{type(error).__name__}: {error}")[:200]


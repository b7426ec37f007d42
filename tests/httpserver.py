"""A small local HTTP file server for tests, with scriptable misbehaviour.

    with serve_directory(root) as server:
        server.url                                  # "http://127.0.0.1:PORT"
        server.faults["/124M/vocab.bpe"] = Fault(cut_after=100, times=1)
        ...                                         # fetch f"{server.url}/124M/vocab.bpe"
        server.requests                             # [("/124M/vocab.bpe", None), ("/124M/vocab.bpe", "bytes=100-")]

It serves the files under `root` (URL path "/a/b" is root/"a"/"b") over HTTP/1.1 on 127.0.0.1 with
Content-Length, `Range: bytes=N-` / `bytes=N-M` (206 + Content-Range, 416 + "bytes */SIZE" when the
start is past the end), and 404 for anything missing. It logs nothing, binds only to 127.0.0.1, and
runs in a daemon thread that the context manager shuts down.

A Fault applies to the first `times` requests for its path (every request when times is None); the
server counts them in `fault.hits`. Several fields may be combined (e.g. ignore_range with cut_after).
"""

from __future__ import annotations

import contextlib
import re
import threading
import time
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Iterator, Optional

_RANGE = re.compile(r"bytes=(\d+)-(\d*)$")


@dataclass
class Fault:
    """Misbehaviour for one path. Fields left at their defaults change nothing."""

    times: Optional[int] = None  # applies to the first `times` requests for the path; None = all of them
    status: Optional[int] = None  # answer this status (404, 429, 500, 503, ...) with a small text body
    cut_after: Optional[int] = None  # send only this many body bytes of the response, then close the connection
    length_delta: int = 0  # announce Content-Length this many bytes more (or, negative, fewer) than the body
    ignore_range: bool = False  # answer 200 with the whole file even when a Range was asked for
    html: bool = False  # answer 200 with an HTML page (a captive portal / proxy login page)
    stall: float = 0.0  # seconds to wait after the headers before sending the body (to trigger read timeouts)
    hits: int = 0  # how many requests this fault has been applied to (kept by the server)


class FileServer(ThreadingHTTPServer):
    """The server object that serve_directory yields: url, root, faults, requests."""

    daemon_threads = True  # a stalled handler must never keep the test process alive
    allow_reuse_address = True

    def __init__(self, root: Path):
        super().__init__(("127.0.0.1", 0), _Handler)
        self.root = Path(root)
        self.url = f"http://127.0.0.1:{self.server_address[1]}"
        self.faults: dict[str, Fault] = {}
        self.requests: list[tuple[str, Optional[str]]] = []  # (path, Range header or None), in arrival order
        self._lock = threading.Lock()

    def paths(self) -> list[str]:
        """The paths requested so far, in order (requests without their Range headers)."""
        return [path for path, _ in self.requests]

    def _take_fault(self, path: str) -> Optional[Fault]:
        with self._lock:
            fault = self.faults.get(path)
            if fault is None or (fault.times is not None and fault.hits >= fault.times):
                return None
            fault.hits += 1
            return fault

    def handle_error(self, request, client_address):
        pass  # clients hanging up mid-body is what these tests do; no tracebacks on stderr


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"  # keep-alive, so Content-Length is what delimits a body
    disable_nagle_algorithm = True  # headers and body go out in separate writes: avoid 40 ms delayed-ACK stalls
    server: FileServer

    def log_message(self, format, *args):
        pass  # silent

    def do_HEAD(self):
        self._serve(send_body=False)

    def do_GET(self):
        self._serve(send_body=True)

    def _serve(self, send_body: bool):
        path = self.path.split("?", 1)[0]
        range_header = self.headers.get("Range")
        self.server.requests.append((path, range_header))
        fault = self.server._take_fault(path) or Fault()

        if fault.status is not None:
            return self._send_text(fault.status, f"fault injected: HTTP {fault.status}\n", send_body)
        if fault.html:
            page = "<!DOCTYPE html><html><body><h1>Please log in to continue</h1></body></html>\n"
            return self._send_text(200, page, send_body, content_type="text/html; charset=utf-8")

        file = (self.server.root / path.lstrip("/")).resolve()
        if self.server.root.resolve() not in file.parents or not file.is_file():
            return self._send_text(404, f"not found: {path}\n", send_body)
        data = file.read_bytes()
        size = len(data)

        status, start, end = 200, 0, size  # body is data[start:end]
        match = _RANGE.match(range_header or "")
        if match and not fault.ignore_range:
            start = int(match.group(1))
            end = min(int(match.group(2)) + 1, size) if match.group(2) else size
            if start >= size or start >= end:
                self.send_response(416)
                self.send_header("Content-Range", f"bytes */{size}")
                self.send_header("Content-Length", "0")
                self.end_headers()
                return
            status = 206

        body = data[start:end]
        self.send_response(status)
        self.send_header("Content-Type", "application/json" if path.endswith(".json") else "application/octet-stream")
        self.send_header("Accept-Ranges", "bytes")
        self.send_header("Content-Length", str(len(body) + fault.length_delta))
        if status == 206:
            self.send_header("Content-Range", f"bytes {start}-{end - 1}/{size}")
        if fault.cut_after is not None or fault.length_delta:
            # The body will not match its Content-Length: close the connection so that nothing stray
            # is read as the start of the next response.
            self.send_header("Connection", "close")
            self.close_connection = True
        self.end_headers()
        if not send_body:
            return
        if fault.stall:
            self.wfile.flush()
            time.sleep(fault.stall)
        if fault.cut_after is not None:
            body = body[: fault.cut_after]
        try:
            self.wfile.write(body)
            self.wfile.flush()
        except (BrokenPipeError, ConnectionResetError):
            self.close_connection = True

    def _send_text(self, status: int, text: str, send_body: bool, content_type: str = "text/plain; charset=utf-8"):
        body = text.encode()
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        if send_body:
            self.wfile.write(body)


@contextlib.contextmanager
def serve_directory(root) -> Iterator[FileServer]:
    """Serve `root` on 127.0.0.1 at a free port for the duration of the with-block."""
    server = FileServer(root)
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    try:
        yield server
    finally:
        server.shutdown()
        server.server_close()
        thread.join(timeout=5)

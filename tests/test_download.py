"""picogpt.download against a local server (tests/httpserver.py) that misbehaves on request."""

import os
import socket

import pytest
import urllib3

from httpserver import Fault, serve_directory
from picogpt.download import CHECKPOINT_FILES, download_checkpoint, download_file
from picogpt.download import MODEL_SIZES, check_model_size
from picogpt.errors import PicogptError

FAST = dict(progress=False, backoff=0, timeout=5.0)


def fake_checkpoint(root, size="124M"):
    """Small stand-ins for the seven files, with distinct, non-repeating contents."""
    folder = root / size
    folder.mkdir(parents=True)
    for i, name in enumerate(CHECKPOINT_FILES):
        (folder / name).write_bytes(os.urandom(1000 + 3000 * i))
    return folder


@pytest.fixture
def served(tmp_path):
    """(server, folder of served 124M files, empty destination folder)."""
    source = fake_checkpoint(tmp_path / "remote")
    with serve_directory(tmp_path / "remote") as server:
        yield server, source, tmp_path / "local"


def fetch(server, source, dest_dir, name="model.ckpt.data-00000-of-00001", **kwargs):
    """Download one served file into dest_dir; return (bytes expected, path of the destination)."""
    dest_dir.mkdir(exist_ok=True)
    dest = download_file(f"{server.url}/124M/{name}", dest_dir / name, **{**FAST, **kwargs})
    return (source / name).read_bytes(), dest


def assert_one_line_naming(error, *names):
    message = str(error.value)
    assert "\n" not in message
    assert any(name in message for name in names), message


def test_check_model_size():
    assert [check_model_size(size) for size in MODEL_SIZES] == list(MODEL_SIZES)
    with pytest.raises(PicogptError) as error:
        check_model_size("125M")
    assert all(size in str(error.value) for size in MODEL_SIZES + ("125M",))
    with pytest.raises(PicogptError):
        download_checkpoint("125M", "unused", "http://127.0.0.1:9", **FAST)


def test_all_files_download_byte_identical(served):
    server, source, local = served
    assert download_checkpoint("124M", local / "124M", server.url, **FAST) == local / "124M"
    for name in CHECKPOINT_FILES:
        assert (local / "124M" / name).read_bytes() == (source / name).read_bytes(), name
    assert sorted(os.listdir(local / "124M")) == sorted(CHECKPOINT_FILES)  # no .partial left behind
    assert [range_ for _, range_ in server.requests] == [None] * len(CHECKPOINT_FILES)


def test_complete_files_are_not_requested_again(served):
    server, source, local = served
    (local / "124M").mkdir(parents=True)
    (local / "124M" / "vocab.bpe").write_bytes((source / "vocab.bpe").read_bytes())
    download_checkpoint("124M", local / "124M", server.url + "/", **FAST)  # a trailing slash is fine
    assert "/124M/vocab.bpe" not in server.paths()
    assert len(server.requests) == len(CHECKPOINT_FILES) - 1
    download_checkpoint("124M", local / "124M", server.url, **FAST)
    assert len(server.requests) == len(CHECKPOINT_FILES) - 1  # everything complete: no requests at all


def test_cut_transfer_resumes_with_range(served):
    server, source, local = served
    name = "model.ckpt.data-00000-of-00001"
    size = (source / name).stat().st_size
    server.faults[f"/124M/{name}"] = Fault(cut_after=size // 2, times=1)
    expected, dest = fetch(server, source, local, name)
    assert dest.read_bytes() == expected
    assert server.requests == [(f"/124M/{name}", None), (f"/124M/{name}", f"bytes={size // 2}-")]
    assert not dest.with_name(name + ".partial").exists()


def test_existing_partial_is_resumed(served):
    server, source, local = served
    local.mkdir()
    data = (source / "vocab.bpe").read_bytes()
    (local / "vocab.bpe.partial").write_bytes(data[:1234])
    expected, dest = fetch(server, source, local, "vocab.bpe")
    assert dest.read_bytes() == expected
    assert server.requests == [("/124M/vocab.bpe", "bytes=1234-")]


def test_server_ignoring_range_restarts_from_zero(served):
    server, source, local = served
    local.mkdir()
    (local / "vocab.bpe.partial").write_bytes(b"stale bytes that must not survive")
    server.faults["/124M/vocab.bpe"] = Fault(ignore_range=True)
    expected, dest = fetch(server, source, local, "vocab.bpe")
    assert dest.read_bytes() == expected
    assert server.requests[0][1] is not None  # it did ask to resume


def test_partial_already_complete_is_finished_by_416(served):
    server, source, local = served
    local.mkdir()
    (local / "vocab.bpe.partial").write_bytes((source / "vocab.bpe").read_bytes())
    expected, dest = fetch(server, source, local, "vocab.bpe")
    assert dest.read_bytes() == expected
    assert len(server.requests) == 1


def test_404_fails_at_once(served):
    server, source, local = served
    local.mkdir()
    url = f"{server.url}/124M/no-such-file"
    with pytest.raises(PicogptError, match="no such file on the server") as error:
        download_file(url, local / "no-such-file", retries=5, **FAST)
    assert_one_line_naming(error, url)
    assert len(server.requests) == 1
    assert os.listdir(local) == []


def test_wrong_size_is_a_clear_error(served):
    server, source, local = served
    with pytest.raises(PicogptError, match="no such file on the server") as error:
        download_checkpoint("355M", local, server.url, **FAST)  # the server only has 124M
    assert_one_line_naming(error, f"{server.url}/355M/checkpoint")
    assert len(server.requests) == 1


def test_other_4xx_fails_at_once(served):
    server, source, local = served
    server.faults["/124M/vocab.bpe"] = Fault(status=403)
    with pytest.raises(PicogptError, match="403") as error:
        fetch(server, source, local, "vocab.bpe", retries=5)
    assert_one_line_naming(error, "/124M/vocab.bpe")
    assert len(server.requests) == 1
    assert os.listdir(local) == []


def test_connection_refused(tmp_path):
    with socket.socket() as s:  # a port that was free a moment ago and has nothing listening
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    url = f"http://127.0.0.1:{port}/124M/vocab.bpe"
    with pytest.raises(PicogptError, match="connection refused") as error:
        download_file(url, tmp_path / "vocab.bpe", retries=2, **FAST)
    assert_one_line_naming(error, url)
    assert "--base-url" in str(error.value)
    assert os.listdir(tmp_path) == []


def test_always_short_body_fails_after_retries_and_keeps_partial(served):
    server, source, local = served
    name = "model.ckpt.data-00000-of-00001"
    server.faults[f"/124M/{name}"] = Fault(cut_after=1000)  # every response stops 1000 bytes in
    with pytest.raises(PicogptError, match="after 3 attempts") as error:
        fetch(server, source, local, name, retries=3)
    assert_one_line_naming(error, f"/124M/{name}")
    assert "re-run" in str(error.value)
    assert len(server.requests) == 3
    assert [r for _, r in server.requests] == [None, "bytes=1000-", "bytes=2000-"]  # each retry resumed
    assert os.listdir(local) == [name + ".partial"]
    assert (local / (name + ".partial")).read_bytes() == (source / name).read_bytes()[:3000]


def test_announced_length_longer_than_body_is_retried(served):
    server, source, local = served
    server.faults["/124M/vocab.bpe"] = Fault(length_delta=10, times=1)
    expected, dest = fetch(server, source, local, "vocab.bpe")
    # The first response carried the whole file but announced 10 bytes more, so it was not trusted; the
    # resume request then found the partial complete (416, bytes */SIZE).
    assert dest.read_bytes() == expected
    assert len(server.requests) == 2


def test_html_page_is_a_clear_error(served):
    server, source, local = served
    server.faults["/124M/encoder.json"] = Fault(html=True)
    with pytest.raises(PicogptError, match="HTML") as error:
        fetch(server, source, local, "encoder.json", retries=5)
    assert_one_line_naming(error, "/124M/encoder.json")
    assert len(server.requests) == 1
    assert os.listdir(local) == []


@pytest.mark.parametrize("status", [503, 500, 429])
def test_transient_status_twice_then_ok(served, status):
    server, source, local = served
    server.faults["/124M/hparams.json"] = Fault(status=status, times=2)
    expected, dest = fetch(server, source, local, "hparams.json", retries=3)
    assert dest.read_bytes() == expected
    assert len(server.requests) == 3


def test_persistent_503_gives_up(served):
    server, source, local = served
    server.faults["/124M/hparams.json"] = Fault(status=503)
    with pytest.raises(PicogptError, match="503") as error:
        fetch(server, source, local, "hparams.json", retries=2)
    assert_one_line_naming(error, "/124M/hparams.json")
    assert len(server.requests) == 2
    assert os.listdir(local) == []


def test_read_timeout_is_retried(served):
    server, source, local = served
    server.faults["/124M/checkpoint"] = Fault(stall=1.0, times=1)
    expected, dest = fetch(server, source, local, "checkpoint", timeout=0.2)
    assert dest.read_bytes() == expected
    assert len(server.requests) == 2


def test_keyboard_interrupt_leaves_only_the_partial(served, monkeypatch):
    server, source, local = served
    name = "model.ckpt.data-00000-of-00001"
    real_stream = urllib3.response.HTTPResponse.stream

    def ctrl_c_after_1000_bytes(response, amt=None, decode_content=None):
        yield next(real_stream(response, 1000, decode_content))
        raise KeyboardInterrupt

    monkeypatch.setattr(urllib3.response.HTTPResponse, "stream", ctrl_c_after_1000_bytes)
    with pytest.raises(KeyboardInterrupt):
        fetch(server, source, local, name)
    assert os.listdir(local) == [name + ".partial"]
    monkeypatch.undo()
    expected, dest = fetch(server, source, local, name)  # the re-run resumes
    assert dest.read_bytes() == expected
    assert server.requests[-1][1] == "bytes=1000-"

"""picogpt.tokenizer: GPT-2's exact token ids, offline loading, streaming decode, clear errors."""

import hashlib
import importlib.util
import shutil
import socket
import tempfile
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from picogpt import tokenizer
from picogpt.errors import PicogptError
from picogpt.tokenizer import EOT, StreamDecoder, decode, encode, load_tokenizer

DATA = Path(__file__).resolve().parent.parent / "data" / "gpt2"
PINNED_SHA256 = {  # OpenAI's gpt-2 release files and tiktoken's r50k_base rank file
    "encoder.json": "196139668be63f3b5d6574427317ae82f612a97c5d1cdaf36ed2256dbf636783",
    "vocab.bpe": "1ce1664773c50f3e0cc8842619a93edc4624525b728b188a9e0be33b7726adc5",
    "gpt2.tiktoken": "306cd27f03c1a714eca7108e03d66b7dc042abe8c258b44c199a7ed9838dd930",
}
# Surrogate code points can't be encoded as UTF-8, so no tokenizer can round-trip them.
TEXT = st.text(alphabet=st.characters(exclude_categories=("Cs",)))


@pytest.fixture
def fresh_cache():
    """Make load_tokenizer build from scratch, and leave no half-patched tokenizer cached afterwards."""
    load_tokenizer.cache_clear()
    yield
    load_tokenizer.cache_clear()


def stream(ids) -> list[str]:
    decoder = StreamDecoder()
    return [decoder.push(i) for i in ids] + [decoder.flush()]


def test_known_prompt_gives_gpt2_ids():
    text = "Alan Turing theorized that computers would one day become very powerful, but even he could not imagine"
    ids = [36235, 39141, 18765, 1143, 326, 9061, 561, 530, 1110, 1716, 845, 3665, 11, 475, 772, 339, 714, 407, 5967]
    assert encode(text) == ids
    assert decode(ids) == text


def test_round_trip_special_token_and_vocab_size():
    assert decode(encode("San Francisco is")) == "San Francisco is"
    assert encode("<|endoftext|>") == [EOT] == [50256]
    assert decode([EOT]) == "<|endoftext|>"
    assert load_tokenizer().n_vocab == 50257
    assert load_tokenizer() is load_tokenizer()


@pytest.mark.parametrize("name", sorted(PINNED_SHA256))
def test_shipped_data_files_are_pinned(name):
    assert hashlib.sha256((DATA / name).read_bytes()).hexdigest() == PINNED_SHA256[name]


def test_ranks_file_regenerates_exactly(monkeypatch):
    spec = importlib.util.spec_from_file_location("make_tiktoken_ranks", DATA.parent.parent / "tools" / "make_tiktoken_ranks.py")
    tool = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(tool)
    monkeypatch.setenv("TIKTOKEN_CACHE_DIR", "")
    assert tool.make_ranks(DATA) == (DATA / "gpt2.tiktoken").read_bytes()


def test_loading_is_offline_and_writes_nothing(monkeypatch, tmp_path, fresh_cache):
    def no_network(*args, **kwargs):
        raise AssertionError("the tokenizer tried to use the network")

    monkeypatch.setattr(socket.socket, "connect", no_network)
    monkeypatch.setattr(socket, "getaddrinfo", no_network)
    # tiktoken caches downloads and reads in tempfile.gettempdir()/data-gym-cache unless told otherwise.
    monkeypatch.delenv("TIKTOKEN_CACHE_DIR", raising=False)
    monkeypatch.delenv("DATA_GYM_CACHE_DIR", raising=False)
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    assert load_tokenizer().encode("offline") == encode("offline")
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("text", ["🦄", "👍🏽", "日本語のテキスト", "a🦄b 日本 👍🏽!"])
def test_stream_decoder_holds_back_split_characters(text):
    ids = encode(text)
    token_bytes = [load_tokenizer().decode_single_token_bytes(i) for i in ids]
    assert b"".join(token_bytes) == text.encode()

    def valid_utf8(data):
        try:
            data.decode("utf-8")
            return True
        except UnicodeDecodeError:
            return False

    assert not all(map(valid_utf8, token_bytes)), "no character is split across tokens; the test is too easy"
    pieces = stream(ids)
    assert "".join(pieces) == text
    assert not any("\ufffd" in piece for piece in pieces)
    assert "" in pieces  # some push had nothing complete to return yet


def test_stream_decoder_flush_replaces_incomplete_character():
    decoder = StreamDecoder()
    first = encode("🦄")[0]  # b"\xf0\x9f": the first half of the emoji
    assert decoder.push(first) == ""
    assert decoder.flush() == "\ufffd"
    assert decoder.flush() == ""
    assert decoder.push(encode("hi")[0]) == "hi"  # usable again after flush


@settings(max_examples=300, deadline=None)
@given(TEXT)
def test_round_trip_any_text(text):
    ids = encode(text)
    assert decode(ids) == text
    assert "".join(stream(ids)) == text


@settings(max_examples=300, deadline=None)
@given(st.lists(st.integers(0, EOT)))
def test_stream_decoder_matches_decode_for_any_ids(ids):
    # Arbitrary ids include invalid UTF-8; streaming must still give exactly what decode gives.
    assert "".join(stream(ids)) == decode(ids)


def test_missing_data_folder_is_a_one_line_error(monkeypatch, tmp_path, fresh_cache):
    monkeypatch.setattr(tokenizer, "data_dirs", lambda: [tmp_path / "missing", tmp_path / "also-missing"])
    with pytest.raises(PicogptError) as error:
        load_tokenizer()
    message = str(error.value)
    assert "\n" not in message
    assert "gpt2.tiktoken not found" in message and "make_tiktoken_ranks.py" in message


def test_corrupted_ranks_file_is_a_one_line_error(monkeypatch, tmp_path, fresh_cache):
    damaged = bytearray((DATA / "gpt2.tiktoken").read_bytes())
    damaged[1000] ^= 1
    (tmp_path / "gpt2.tiktoken").write_bytes(damaged)
    monkeypatch.setattr(tokenizer, "data_dirs", lambda: [tmp_path])
    with pytest.raises(PicogptError) as error:
        load_tokenizer()
    message = str(error.value)
    assert "\n" not in message
    assert str(tmp_path / "gpt2.tiktoken") in message and "damaged" in message


def test_installed_copy_is_used_when_checkout_has_none(monkeypatch, tmp_path, fresh_cache):
    shutil.copy(DATA / "gpt2.tiktoken", tmp_path)
    monkeypatch.setattr(tokenizer, "data_dirs", lambda: [tmp_path / "missing", tmp_path])
    assert load_tokenizer().encode("San Francisco is") == [15017, 6033, 318]

"""GPT-2's byte-level BPE tokenizer, through tiktoken, built entirely offline.

The vocabulary is OpenAI's GPT-2 vocabulary (data/gpt2/encoder.json and vocab.bpe, from the gpt-2
release; see data/gpt2/LICENSE). picogpt ships it a second time as gpt2.tiktoken, tiktoken's rank file
(base64 token bytes and rank per line, byte-identical to tiktoken's r50k_base), made from the original
two files by tools/make_tiktoken_ranks.py. Reading the rank file takes about 25 ms; re-deriving the
ranks from the merges list and cross-checking them against encoder.json takes about 0.2 s, which would
be most of the tokenizer's start-up. The originals stay alongside as the provenance of the vocabulary.

tiktoken.get_encoding("gpt2") is never called: it downloads the vocabulary and caches it under /tmp.
We build the same Encoding from the shipped file, verify its SHA-256 ourselves and write nothing.
"""

import binascii
import codecs
import functools
import hashlib
import re
import shlex
from pathlib import Path

import tiktoken
from tiktoken_ext.openai_public import r50k_pat_str

from . import shipped
from .errors import PicogptError
from .hints import CHECKOUT, python_command

EOT = 50256  # <|endoftext|>, the token GPT-2 saw between documents; also its only special token
N_VOCAB = 50257
RANKS_FILE = "gpt2.tiktoken"
# The shipped vocabulary files (data/gpt2) and their SHA-256: OpenAI's two originals, and the rank file
# made from them by tools/make_tiktoken_ranks.py, byte-identical to tiktoken's r50k_base.
VOCABULARY_SHA256 = {
    "encoder.json": "196139668be63f3b5d6574427317ae82f612a97c5d1cdaf36ed2256dbf636783",
    "vocab.bpe": "1ce1664773c50f3e0cc8842619a93edc4624525b728b188a9e0be33b7726adc5",
    RANKS_FILE: "306cd27f03c1a714eca7108e03d66b7dc042abe8c258b44c199a7ed9838dd930",
}


def _remake_hint(name):
    """What to do about a missing or damaged vocabulary file: the rank file can be re-derived in a checkout."""
    tool = CHECKOUT / "tools" / "make_tiktoken_ranks.py"
    if name == RANKS_FILE and tool.is_file():
        return f"re-create it with: {python_command()} {shlex.quote(str(tool))}"
    return "reinstall picogpt"


def data_dirs() -> list[Path]:
    """Folders that may hold the vocabulary files, in the order they are tried (tests monkeypatch this)."""
    return [d / "gpt2" for d in shipped.data_dirs()]


def check_vocabulary_file(path: Path, contents: bytes) -> bytes:
    """contents, if they are the shipped vocabulary file path.name (by SHA-256); PicogptError if not."""
    expected = VOCABULARY_SHA256[path.name]
    actual = hashlib.sha256(contents).hexdigest()
    if actual != expected:
        raise PicogptError(f"GPT-2 vocabulary file {path} is damaged (sha256 {actual}, expected {expected}); "
                           f"{_remake_hint(path.name)}")
    return contents


def vocabulary_file(name: str) -> bytes:
    """The bytes of a shipped vocabulary file (a key of VOCABULARY_SHA256), found in data_dirs() and
    checked against its SHA-256; a missing, unreadable or damaged file is one PicogptError sentence."""
    dirs = data_dirs()
    path = shipped.find_file(name, dirs)
    if path is None:
        raise PicogptError(f"GPT-2 vocabulary file {name} not found in {' or '.join(map(str, dirs))}; "
                           f"{_remake_hint(name)}")
    try:
        contents = path.read_bytes()
    except OSError as error:
        raise PicogptError(f"cannot read GPT-2 vocabulary file {path} ({error.strerror}); "
                           "check its permissions or reinstall picogpt") from None
    return check_vocabulary_file(path, contents)


def _read_ranks() -> dict[bytes, int]:
    """Parse gpt2.tiktoken (checked by vocabulary_file) into tiktoken's {token bytes: rank}."""
    # Parsing it ourselves rather than via tiktoken.load.load_tiktoken_bpe: that function checks the hash
    # only when it caches a copy under /tmp, and we want both the check and no writes.
    contents = vocabulary_file(RANKS_FILE)
    # Each line is "<base64 token bytes> <rank>"; splitting the whole file on whitespace and decoding in
    # bulk is twice as fast as a loop over lines, and the hash check guarantees the format.
    fields = contents.split()
    return dict(zip(map(binascii.a2b_base64, fields[0::2]), map(int, fields[1::2])))


@functools.cache
def load_tokenizer() -> tiktoken.Encoding:
    """GPT-2's tokenizer as a tiktoken Encoding; built once per process, later calls return the same object."""
    return tiktoken.Encoding(
        name="gpt2",
        pat_str=r50k_pat_str,
        mergeable_ranks=_read_ranks(),
        special_tokens={"<|endoftext|>": EOT},
        explicit_n_vocab=N_VOCAB,
    )


def encode(text: str) -> list[int]:
    """Token ids of text.

    The literal string "<|endoftext|>" becomes the special token EOT rather than the six ordinary tokens
    that spell it: a user who types it into a prompt means the document separator GPT-2 was trained
    with. (tiktoken's own default would raise an error on it instead.) Every other string is ordinary
    text, and decode(encode(text)) == text. A string that is not valid Unicode, one holding a lone
    surrogate (a command-line argument's bytes that are not UTF-8 come so, as does "\\ud800" in JSON),
    is refused in one sentence: tiktoken would turn it into U+FFFD, and so continue other text than given.
    """
    if not text.isascii() and (bad := SURROGATE.search(text)):
        raise PicogptError(f"the text is not valid Unicode: it holds {surrogate_name(bad.group())} at character "
                           f"{bad.start()}; give UTF-8 text")
    return load_tokenizer().encode(text, allowed_special={"<|endoftext|>"})


SURROGATE = re.compile("[\ud800-\udfff]")


def surrogate_name(character):
    """How a lone surrogate came to be, said for a user: one byte of a name or argument that is not UTF-8
    (Python's surrogateescape holds byte 0xNN as U+DCNN), or half of a UTF-16 pair."""
    code = ord(character)
    if 0xDC80 <= code <= 0xDCFF:
        return f"byte 0x{code - 0xDC00:02x} (not UTF-8)"
    return f"U+{code:04X} (half of a UTF-16 surrogate pair)"


def decode(ids) -> str:
    """Text of a sequence of token ids; bytes that are not valid UTF-8 become U+FFFD."""
    return load_tokenizer().decode(list(ids))


class StreamDecoder:
    """Turns token ids arriving one at a time into text that is safe to print at once.

    A GPT-2 token is a run of bytes, not of characters: an emoji or a CJK character is often split over
    two or three tokens, and a token's bytes alone can be an incomplete UTF-8 sequence. push() returns
    only the characters completed so far and holds back the bytes of a partial one until the tokens that
    finish it arrive. flush() ends the stream: it returns what was held back, with any bytes that never
    formed a character as U+FFFD, and leaves the decoder ready for a new stream. The pieces, joined,
    equal decode() of the whole sequence.

        stream = StreamDecoder()
        for token in tokens:
            print(stream.push(token), end="", flush=True)
        print(stream.flush())
    """

    def __init__(self, encoding: tiktoken.Encoding | None = None):
        self._encoding = encoding or load_tokenizer()
        self._utf8 = codecs.getincrementaldecoder("utf-8")(errors="replace")

    def push(self, token_id: int) -> str:
        """Add one token; return the text it completes (possibly "")."""
        return self._utf8.decode(self._encoding.decode_single_token_bytes(token_id))

    def flush(self) -> str:
        """End the stream; return the held-back remainder ("" when every character was complete)."""
        return self._utf8.decode(b"", final=True)

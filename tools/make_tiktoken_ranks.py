"""Re-encode OpenAI's GPT-2 vocabulary (encoder.json + vocab.bpe) as tiktoken's rank file.

    python tools/make_tiktoken_ranks.py          # writes data/gpt2/gpt2.tiktoken

picogpt.tokenizer loads gpt2.tiktoken rather than the original two files: deriving the ranks from the
merges and cross-checking them against encoder.json takes about 0.2 s, reading the rank file (one base64
token and its rank per line) about 25 ms. The output must be byte-identical to tiktoken's published
r50k_base file; this script checks its SHA-256 and writes nothing if it differs.
"""

import base64
import hashlib
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run from a checkout without installing

from picogpt.errors import PicogptError  # noqa: E402
from picogpt.tokenizer import RANKS_FILE, VOCABULARY_SHA256, check_vocabulary_file  # noqa: E402

DATA_DIR = Path(__file__).resolve().parent.parent / "data" / "gpt2"


def check_sha256(path: Path) -> None:
    try:
        check_vocabulary_file(path, path.read_bytes())
    except PicogptError as e:
        raise SystemExit(f"error: {e}") from None


def make_ranks(data_dir: Path = DATA_DIR) -> bytes:
    """Return the contents of gpt2.tiktoken built from data_dir's encoder.json and vocab.bpe."""
    from tiktoken.load import data_gym_to_mergeable_bpe_ranks

    # An empty TIKTOKEN_CACHE_DIR stops tiktoken from copying the files into a cache under /tmp. Without
    # the cache it also skips its hash check (the check only guards cached copies), so verify here.
    check_sha256(data_dir / "encoder.json")
    check_sha256(data_dir / "vocab.bpe")
    saved = os.environ.get("TIKTOKEN_CACHE_DIR")
    os.environ["TIKTOKEN_CACHE_DIR"] = ""
    try:
        ranks = data_gym_to_mergeable_bpe_ranks(
            vocab_bpe_file=str(data_dir / "vocab.bpe"),
            encoder_json_file=str(data_dir / "encoder.json"),
            vocab_bpe_hash=VOCABULARY_SHA256["vocab.bpe"],
            encoder_json_hash=VOCABULARY_SHA256["encoder.json"],
        )
    finally:
        if saved is None:
            del os.environ["TIKTOKEN_CACHE_DIR"]
        else:
            os.environ["TIKTOKEN_CACHE_DIR"] = saved
    # tiktoken's dump_tiktoken_bpe writes this same format but needs blobfile, so write it directly.
    lines = (base64.b64encode(token) + b" " + str(rank).encode() + b"\n"
             for token, rank in sorted(ranks.items(), key=lambda item: item[1]))
    return b"".join(lines)


def main() -> None:
    contents = make_ranks()
    out = DATA_DIR / RANKS_FILE
    actual = hashlib.sha256(contents).hexdigest()
    if actual != VOCABULARY_SHA256[RANKS_FILE]:
        sys.exit(f"error: generated ranks have sha256 {actual}, expected {VOCABULARY_SHA256[RANKS_FILE]} "
                 "(r50k_base); nothing written")
    out.write_bytes(contents)
    print(f"wrote {out} ({len(contents)} bytes, sha256 {VOCABULARY_SHA256[RANKS_FILE]})")


if __name__ == "__main__":
    main()

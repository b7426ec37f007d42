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

DATA_DIR = Path(__file__).resolve().parent.parent / "data" / "gpt2"
ENCODER_JSON_SHA256 = "196139668be63f3b5d6574427317ae82f612a97c5d1cdaf36ed2256dbf636783"
VOCAB_BPE_SHA256 = "1ce1664773c50f3e0cc8842619a93edc4624525b728b188a9e0be33b7726adc5"
RANKS_SHA256 = "306cd27f03c1a714eca7108e03d66b7dc042abe8c258b44c199a7ed9838dd930"  # r50k_base


def check_sha256(path: Path, expected: str) -> None:
    actual = hashlib.sha256(path.read_bytes()).hexdigest()
    if actual != expected:
        raise SystemExit(f"error: {path} has sha256 {actual}, expected {expected}; restore the original file")


def make_ranks(data_dir: Path = DATA_DIR) -> bytes:
    """Return the contents of gpt2.tiktoken built from data_dir's encoder.json and vocab.bpe."""
    from tiktoken.load import data_gym_to_mergeable_bpe_ranks

    # An empty TIKTOKEN_CACHE_DIR stops tiktoken from copying the files into a cache under /tmp. Without
    # the cache it also skips its hash check (the check only guards cached copies), so verify here.
    check_sha256(data_dir / "encoder.json", ENCODER_JSON_SHA256)
    check_sha256(data_dir / "vocab.bpe", VOCAB_BPE_SHA256)
    saved = os.environ.get("TIKTOKEN_CACHE_DIR")
    os.environ["TIKTOKEN_CACHE_DIR"] = ""
    try:
        ranks = data_gym_to_mergeable_bpe_ranks(
            vocab_bpe_file=str(data_dir / "vocab.bpe"),
            encoder_json_file=str(data_dir / "encoder.json"),
            vocab_bpe_hash=VOCAB_BPE_SHA256,
            encoder_json_hash=ENCODER_JSON_SHA256,
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
    actual = hashlib.sha256(contents).hexdigest()
    if actual != RANKS_SHA256:
        sys.exit(f"error: generated ranks have sha256 {actual}, expected {RANKS_SHA256} (r50k_base); "
                 "nothing written")
    out = DATA_DIR / "gpt2.tiktoken"
    out.write_bytes(contents)
    print(f"wrote {out} ({len(contents)} bytes, sha256 {actual})")


if __name__ == "__main__":
    main()

#!/usr/bin/env python3
"""Check picogpt against PyTorch on your own model, layer by layer (make parity).

    python tools/parity.py --model 124M|PATH [--prompt TEXT] [-n 20]

The same as `picogpt parity` (see `--help`): picogpt.cli parses the arguments, the package does the work.
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run from a checkout without installing

from picogpt.__main__ import main  # noqa: E402  (Ctrl-C while importing ends quietly)

if __name__ == "__main__":
    sys.exit(main(["parity", *sys.argv[1:]], prog="parity"))

#!/usr/bin/env python3
"""Download OpenAI's GPT-2 TensorFlow checkpoint and convert it to model.dat.

    python tools/convert_tf_checkpoint.py --model-size 124M --models-dir models

The same as `picogpt convert-tf` (see `--help`): picogpt.cli parses the arguments, the package does the work.
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run from a checkout without installing

from picogpt.__main__ import main  # noqa: E402  (Ctrl-C while importing ends quietly)

if __name__ == "__main__":
    sys.exit(main(["convert-tf", *sys.argv[1:]], prog="convert_tf_checkpoint"))

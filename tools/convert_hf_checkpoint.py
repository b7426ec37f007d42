#!/usr/bin/env python3
"""Convert a local Hugging Face GPT-2 model folder (config.json + model.safetensors) to model.dat.

    python tools/convert_hf_checkpoint.py models/distilgpt2 --out models/distilgpt2/model.dat

The same as `picogpt convert-hf` (see `--help`): picogpt.cli parses the arguments, the package does the work.
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run from a checkout without installing

from picogpt.__main__ import main  # noqa: E402  (Ctrl-C while importing ends quietly)

if __name__ == "__main__":
    sys.exit(main(["convert-hf", *sys.argv[1:]], prog="convert_hf_checkpoint"))

#!/usr/bin/env python3
"""Convert a local Hugging Face GPT-2 model folder (config.json + model.safetensors) to model.dat.

    python tools/convert_hf_checkpoint.py models/distilgpt2 --out models/distilgpt2/model.dat

Needs numpy and safetensors only (no PyTorch, no TensorFlow); see `--help`. The work is done by
picogpt.convert_hf; a refused folder prints one line and exits 1.
"""

import sys

from picogpt.cli import convert_hf_main

if __name__ == "__main__":
    sys.exit(convert_hf_main())

#!/usr/bin/env python3
"""Download OpenAI's GPT-2 TensorFlow checkpoint and convert it to model.dat.

    python tools/convert_tf_checkpoint.py --model-size 124M --models-dir models

See `--help`; the work is done by picogpt.download and picogpt.convert_tf.
"""

import sys

from picogpt.cli import convert_main

if __name__ == "__main__":
    sys.exit(convert_main())

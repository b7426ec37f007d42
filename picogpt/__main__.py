import sys

import picogpt
from picogpt.cli import main

# `python -m picogpt` imported the package before this line: time the imports from its first line.
sys.exit(main(started=picogpt._import_started))

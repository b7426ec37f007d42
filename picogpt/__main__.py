import sys

from picogpt.cli import main

sys.exit(main())

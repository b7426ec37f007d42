import time

started = time.perf_counter()

import sys  # noqa: E402

from picogpt.cli import main  # noqa: E402

sys.exit(main(started=started))

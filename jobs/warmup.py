"""The warmup stage alone as a Ray job: `ray job submit --working-dir . -- python jobs/warmup.py --config FILE [k=v ...]`."""

import os
import sys

# `python jobs/x.py` puts jobs/ first on sys.path, where jobs/select.py would shadow the stdlib
# `select` (and jobs/evaluate.py the `evaluate` package): put the repository root there instead.
sys.path[0] = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
from jobs._entry import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main(["warmup"]))

"""The warmup stage alone as a Ray job: `ray job submit --working-dir . -- python jobs/warmup.py --config FILE [k=v ...]`."""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from _entry import main

if __name__ == "__main__":
    sys.exit(main(["warmup"]))

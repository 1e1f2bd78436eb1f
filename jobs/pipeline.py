"""Whole pipeline as a Ray job. The driver joins the cluster the job runs on (RAY_ADDRESS is set by Ray).

    ray job submit --working-dir . \
      --runtime-env-json '{"excludes": [".git", ".venv", "outputs", "*.safetensors"]}' \
      -- python jobs/pipeline.py --config olmoe_less data.pool=[...] output_dir=s3://bucket/run

Then: ``ray job status <id>``, ``ray job logs <id> --follow``, ``ray job stop <id>``.
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from _entry import main

if __name__ == "__main__":
    sys.exit(main(None))

"""Whole pipeline as a Ray job. The driver joins the cluster the job runs on (RAY_ADDRESS is set by Ray).

    ray job submit --working-dir . \
      --runtime-env-json '{"excludes": [".git", ".venv", "outputs", "*.safetensors"]}' \
      -- python jobs/pipeline.py --config olmoe_less data.pool=[...] output_dir=s3://bucket/run

Then: ``ray job status <id>``, ``ray job logs <id> --follow``, ``ray job stop <id>``.
"""

import os
import sys

# `python jobs/x.py` puts jobs/ first on sys.path, where jobs/select.py would shadow the stdlib
# `select` (and jobs/evaluate.py the `evaluate` package): put the repository root there instead.
sys.path[0] = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
from jobs._entry import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main(None))

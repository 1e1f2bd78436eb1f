"""A driver-side progress bar for a Ray Train run: ``trainer.fit()`` blocks the driver and the workers'
output does not reach it (``log_to_driver`` is off), so the bar tails the run's metrics log (written by the
controller on the driver's node) from a thread."""

from __future__ import annotations

import json
import sys
import threading
from pathlib import Path
from typing import IO

from tqdm.auto import tqdm


class MetricsProgress:
    """``with MetricsProgress(log, total, desc):`` shows steps done / ``total``, steps/s and the last loss.

    ``enabled=None`` shows the bar only when ``file`` is a terminal (tqdm's rule), so job logs and tests
    stay clean."""

    def __init__(
        self,
        log_path: str | Path,
        total: int,
        desc: str,
        *,
        enabled: bool | None = None,
        interval_s: float = 1.0,
        file: IO[str] | None = None,
    ) -> None:
        self.log_path = Path(log_path)
        self.interval_s = interval_s
        self.bar = tqdm(
            total=total,
            desc=desc,
            unit=" step",
            file=file or sys.stderr,
            disable=None if enabled is None else not enabled,
            mininterval=0.5,
            dynamic_ncols=True,
        )
        self._offset = 0
        self._step = 0
        self._done = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True, name="selectmoe-train-progress")

    def __enter__(self) -> MetricsProgress:
        if not self.bar.disable:
            self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._done.set()
        if self._thread.is_alive():
            self._thread.join(timeout=5)
        self.poll()
        self.bar.close()

    def _run(self) -> None:
        while not self._done.wait(self.interval_s):
            self.poll()

    def poll(self) -> None:
        """Read the log lines written since the last poll and move the bar to the latest step."""
        if self.bar.disable or not self.log_path.is_file():
            return
        with open(self.log_path, "rb") as fh:
            fh.seek(self._offset)
            chunk = fh.read()
        complete, _, _ = chunk.rpartition(b"\n")  # a line being written is read at the next poll
        if not complete:
            return
        self._offset += len(complete) + 1
        step, loss = self._step, None
        for line in complete.decode("utf-8").splitlines():
            row = json.loads(line)
            if isinstance(row.get("step"), int):
                step = max(step, row["step"])
            if isinstance(row.get("loss"), (int, float)):
                loss = row["loss"]
        if step > self._step:
            self.bar.update(step - self._step)
            self._step = step
        if loss is not None:
            self.bar.set_postfix(loss=f"{loss:.4f}", refresh=False)

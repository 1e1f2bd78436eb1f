"""Progress bars of long stages: the training bar follows the metrics log, the k sweep counts fitted k."""

from __future__ import annotations

import io
import json

import numpy as np

from selectmoe.cluster.sweep import sweep_k
from selectmoe.training.progress import MetricsProgress


def test_training_bar_follows_the_metrics_log_and_waits_for_whole_lines(tmp_path):
    log = tmp_path / "train_metrics.jsonl"
    out = io.StringIO()
    progress = MetricsProgress(log, total=10, desc="warmup", enabled=True, file=out)
    progress.poll()  # no log yet: nothing moves
    assert progress.bar.n == 0
    rows = [{"step": 2, "loss": 3.5}, {"step": 4, "loss": 2.25}]
    log.write_text("".join(json.dumps(r) + "\n" for r in rows) + '{"step": 6, "lo')  # last line half-written
    progress.poll()
    assert progress.bar.n == 4 and progress.bar.postfix == "loss=2.2500"
    with open(log, "a", encoding="utf-8") as fh:
        fh.write('ss": 1.125}\n{"step": 6, "eval_loss": 1.0}\n')
    progress.poll()
    assert progress.bar.n == 6 and progress.bar.postfix == "loss=1.1250"
    with progress:  # enter/exit: a final poll, then the bar closes at 6/10
        pass
    assert "6/10" in out.getvalue().replace("\r", "\n").splitlines()[-1]


def test_disabled_bar_reads_nothing(tmp_path):
    log = tmp_path / "train_metrics.jsonl"
    log.write_text('{"step": 3, "loss": 1.0}\n')
    progress = MetricsProgress(log, total=5, desc="finetune", enabled=False)
    progress.poll()
    assert progress.bar.n == 0


def test_k_sweep_bar_counts_every_k(capsys):
    X = np.random.default_rng(0).normal(size=(60, 8)).astype(np.float32)
    result = sweep_k(X, [2, 3, 4], use_ray=False, progress=True)
    err = capsys.readouterr().err.replace("\r", "\n")
    assert result.ks == [2, 3, 4]
    assert "k sweep" in err and "3/3" in err

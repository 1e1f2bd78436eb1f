"""Ray Tune over the warmup: quality-loss type / weight / params and lr, scored by the probe AUC.

Each trial is a function trainable (the Ray Train V2 "driver function" pattern) that runs
:func:`selectmoe.stages.warmup.run_warmup` -- a ``TorchTrainer`` with its own workers -- on ``cfg.warmup``
with the trial's dotted overrides applied (OmegaConf), in its own ``<tune.output_dir>/trials/<trial_id>``.
Train reports reach Tune through ``TuneReportCallback``; every report carries the latest probe AUC
(``probe_auc``, the pre-training value until the first epoch end) and ``epoch`` (fractional), which is
ASHA's time attribute, so ``grace_period`` is in epochs.

``param_space`` values: a list -> ``tune.choice``; ``{"loguniform": [a, b]}`` / ``{"uniform": [a, b]}`` /
``{"randint": [a, b]}`` / ``{"grid": [...]}`` -> the matching Tune domain; anything else is a constant.

Outputs in ``tune.output_dir``: ``results.csv`` + ``results.json`` (one row per trial: params, metric,
status, trial dir), ``best_config.json`` (the best trial's overrides + its metrics + the full resolved
warmup config), ``_manifest.json``.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from selectmoe.config import PipelineConfig, WarmupConfig

logger = logging.getLogger(__name__)


@dataclass
class TuneResult:
    output_dir: str
    metric: str
    mode: str
    best_params: dict[str, Any]
    best_metric: float | None
    best_trial_dir: str | None
    n_trials: int
    rows: list[dict[str, Any]] = field(default_factory=list)
    wall_s: float = 0.0

    def summary(self) -> dict[str, Any]:
        return {
            "n_trials": self.n_trials,
            "metric": self.metric,
            "best_metric": self.best_metric,
            "best_params": self.best_params,
            "wall_s": round(self.wall_s, 1),
        }

    def __str__(self) -> str:
        return json.dumps(self.summary(), indent=2, default=str)


def to_domain(value: Any):
    """A ``param_space`` entry as a Ray Tune search domain (see module docstring)."""
    from ray import tune

    if isinstance(value, (list, tuple)):
        return tune.choice(list(value))
    if isinstance(value, dict) and len(value) == 1:
        ((kind, args),) = value.items()
        if kind == "loguniform":
            return tune.loguniform(float(args[0]), float(args[1]))
        if kind == "uniform":
            return tune.uniform(float(args[0]), float(args[1]))
        if kind == "randint":
            return tune.randint(int(args[0]), int(args[1]))
        if kind == "grid":
            return tune.grid_search(list(args))
        if kind == "choice":
            return tune.choice(list(args))
    return value


def apply_overrides(base: WarmupConfig | dict[str, Any], overrides: dict[str, Any]) -> WarmupConfig:
    """``base`` with dotted ``overrides`` (``quality_loss.type``, ``lr`` ...) applied; unknown keys raise."""
    from omegaconf import OmegaConf

    conf = OmegaConf.structured(WarmupConfig)
    conf = OmegaConf.merge(conf, dataclasses.asdict(base) if dataclasses.is_dataclass(base) else base)
    for key, value in overrides.items():
        if OmegaConf.select(conf, key, default="__missing__") == "__missing__":
            raise KeyError(f"tune.param_space key {key!r} is not a warmup config field")
        OmegaConf.update(conf, key, value, merge=False)
    return OmegaConf.to_object(conf)  # type: ignore[return-value]


def _trial(config: dict[str, Any], *, base: dict[str, Any], trials_dir: str) -> None:
    """The Tune function trainable: one warmup run; Train reports are forwarded to Tune."""
    import ray.tune
    from ray.tune.integration.ray_train import TuneReportCallback

    from selectmoe.stages.warmup import run_warmup

    trial_id = ray.tune.get_context().get_trial_id()
    cfg = apply_overrides(base, config)
    out = Path(trials_dir) / trial_id
    cfg.output_dir = str(out)
    cfg.storage_path = str(out / "ray_results")
    cfg.resume_from = None
    (out).mkdir(parents=True, exist_ok=True)
    (out / "trial_overrides.json").write_text(json.dumps(config, indent=2, default=str))
    run_warmup(cfg, callbacks=[TuneReportCallback()], name=f"warmup-trial-{trial_id}")


def run_tune(cfg: PipelineConfig) -> TuneResult:
    """Run the sweep described by ``cfg.tune`` over ``cfg.warmup`` (see module docstring)."""
    import ray.tune
    from ray.tune.schedulers import ASHAScheduler

    from selectmoe.manifest import write_manifest
    from selectmoe.stages.contract import check_inputs

    check_inputs("warmup", cfg.warmup)  # every trial is a warmup: fail once, here, not in each trial
    t0 = time.perf_counter()
    tc = cfg.tune
    out = Path(tc.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    param_space = {k: to_domain(v) for k, v in dict(tc.param_space).items()}
    base = dataclasses.asdict(cfg.warmup)
    apply_overrides(base, {})  # validate the base before any trial starts
    max_t = max(float(cfg.warmup.epochs), float(tc.grace_period))
    scheduler = ASHAScheduler(
        time_attr="epoch",
        grace_period=tc.grace_period,
        reduction_factor=tc.reduction_factor,
        max_t=max_t,
    )
    trainable = ray.tune.with_parameters(_trial, base=base, trials_dir=str(out / "trials"))
    # The trial is only a driver: the TorchTrainer requests its own workers; Ray Data tasks run outside
    # the trial's placement group.
    trainable = ray.tune.with_resources(trainable, {"cpu": 0.25})
    tuner = ray.tune.Tuner(
        trainable,
        param_space=param_space,
        tune_config=ray.tune.TuneConfig(
            metric=tc.metric,
            mode=tc.mode,
            num_samples=int(tc.num_samples),
            max_concurrent_trials=int(tc.max_concurrent_trials),
            scheduler=scheduler,
        ),
        run_config=ray.tune.RunConfig(name="tune", storage_path=str(out / "ray_results"), verbose=0),
    )
    grid = tuner.fit()

    rows = trial_rows(grid, list(param_space), tc.metric, out / "trials")
    scored = [r for r in rows if isinstance(r[tc.metric], (int, float)) and not math.isnan(r[tc.metric])]
    best_row = None
    if scored:
        best_row = (max if tc.mode == "max" else min)(scored, key=lambda r: r[tc.metric])
    best_params = {k[len("param.") :]: v for k, v in (best_row or {}).items() if k.startswith("param.")}
    _write_table(out, rows)
    best = {
        "metric": tc.metric,
        "mode": tc.mode,
        "value": best_row[tc.metric] if best_row else None,
        "params": best_params,
        "trial_dir": best_row["trial_dir"] if best_row else None,
        "warmup_config": dataclasses.asdict(apply_overrides(base, best_params)) if best_row else None,
    }
    (out / "best_config.json").write_text(json.dumps(best, indent=2, default=str) + "\n")
    wall = time.perf_counter() - t0
    result = TuneResult(
        output_dir=str(out),
        metric=tc.metric,
        mode=tc.mode,
        best_params=best_params,
        best_metric=best["value"],
        best_trial_dir=best["trial_dir"],
        n_trials=len(rows),
        rows=rows,
        wall_s=wall,
    )
    write_manifest(
        out,
        stage="tune",
        config={"tune": dataclasses.asdict(tc), "warmup": base},
        counts={"trials": len(rows), "errors": sum(r["status"] == "error" for r in rows)},
        seed=cfg.seed,
        wall_s=wall,
        extra={"best": {k: v for k, v in best.items() if k != "warmup_config"}},
    )
    return result


TRIAL_METRICS = ("epoch", "step", "probe_auc_before", "lm_loss", "quality_loss")


def trial_rows(grid, params: list[str], metric: str, trials_dir: Path) -> list[dict[str, Any]]:
    """One row per trial (``param.<key>``, the metric, :data:`TRIAL_METRICS`, status, trial id and dir)
    from ``ResultGrid.get_dataframe()`` (each trial's last report). A trial that failed before its first
    report has no dataframe row: it gets one from its result, status ``error``, metrics empty."""
    df = grid.get_dataframe()
    failed = {(res.metrics or {}).get("trial_id") for res in grid if res.error}
    records = df.to_dict("records")
    reported = {rec.get("trial_id") for rec in records}
    records += [
        {"trial_id": (res.metrics or {}).get("trial_id"), **{f"config/{k}": v for k, v in res.config.items()}}
        for res in grid
        if (res.metrics or {}).get("trial_id") not in reported
    ]
    rows = []
    for rec in records:
        trial_id = rec.get("trial_id")
        rows.append(
            {
                **{f"param.{k}": rec.get(f"config/{k}") for k in params},
                **{key: rec.get(key) for key in (metric, *TRIAL_METRICS)},
                "status": "error" if trial_id in failed else "ok",
                "trial_id": trial_id,
                "trial_dir": str(trials_dir / trial_id) if trial_id else None,
            }
        )
    return rows


def _write_table(out: Path, rows: list[dict[str, Any]]) -> None:
    import pandas as pd

    table = pd.DataFrame(rows)
    table.to_csv(out / "results.csv", index=False)
    (out / "results.json").write_text(table.to_json(orient="records", indent=2) + "\n")


__all__ = ["TuneResult", "apply_overrides", "run_tune", "to_domain", "trial_rows"]

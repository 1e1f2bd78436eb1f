"""Stage ``demo``: the embedded demo's pool, tiny models and eval task (:mod:`selectmoe.demo`)."""

from __future__ import annotations

from selectmoe.config import DemoConfig
from selectmoe.demo import DemoAssets, prepare_demo_assets

DemoResult = DemoAssets


def run_demo(cfg: DemoConfig, *, seed: int = 42) -> DemoResult:
    """``seed``: the run's seed (``PipelineConfig.seed``; the demo config has none of its own)."""
    return prepare_demo_assets(cfg, seed=seed)


__all__ = ["DemoResult", "run_demo"]

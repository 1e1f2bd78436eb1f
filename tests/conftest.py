"""Shared fixtures: one real local Ray per test session (ray.init costs ~5 s), GPU skip marker."""

from __future__ import annotations

import os

import pytest
import torch

import selectmoe  # noqa: F401  (pins torch's CPU kernels to one level before any runs: selectmoe.cpu_isa)

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("RAY_TRAIN_V2_ENABLED", "1")


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip_gpu = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip_gpu)


@pytest.fixture(scope="session")
def ray_local():
    """A real local Ray cluster (2 CPUs) shared by every test that needs one."""
    import ray

    from selectmoe.ray_utils import WORKER_ENV

    if not ray.is_initialized():
        ray.init(
            address="local",  # never attach to a `ray start --head` another test runs
            num_cpus=2,
            include_dashboard=False,
            log_to_driver=False,
            runtime_env={"env_vars": dict(WORKER_ENV)},
        )
    yield ray
    ray.shutdown()

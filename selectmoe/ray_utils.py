"""Ray connection and resource helpers shared by every stage."""

from __future__ import annotations

import logging
import os

logger = logging.getLogger(__name__)

# Env vars every Ray worker needs: offline hub, quiet tokenizers, Train V2.
WORKER_ENV = {
    "HF_HUB_OFFLINE": "1",
    "HF_DATASETS_OFFLINE": "1",
    "TRANSFORMERS_OFFLINE": "1",
    "TOKENIZERS_PARALLELISM": "false",
    "RAY_TRAIN_V2_ENABLED": "1",
}


def init_ray(address: str | None = None, *, num_cpus: int | None = None, quiet: bool = True):
    """Connect to Ray once: an explicit address, ``RAY_ADDRESS``, a running local head, else in-process.

    Returns the ``ray`` module. Idempotent: a driver that already called ``ray.init`` (a test fixture, a
    ``ray job submit`` entrypoint) is reused as is.
    """
    import ray

    for key, value in WORKER_ENV.items():
        os.environ.setdefault(key, value)
    if ray.is_initialized():
        return ray
    address = address or os.environ.get("RAY_ADDRESS") or None
    kwargs: dict = {"runtime_env": {"env_vars": dict(WORKER_ENV)}, "log_to_driver": not quiet}
    if address:
        ray.init(address=address, **kwargs)
        logger.info("joined Ray cluster at %s", address)
        return ray
    try:  # a head started with `ray start --head` on this machine
        ray.init(address="auto", **kwargs)
        logger.info("joined the running local Ray head")
    except (ConnectionError, RuntimeError, ValueError):
        ray.init(address="local", num_cpus=num_cpus, include_dashboard=False, **kwargs)
        logger.info("started an in-process Ray (%s CPUs)", ray.cluster_resources().get("CPU"))
    return ray


def cluster_gpus() -> float:
    """Number of GPUs the connected Ray cluster offers (0.0 on CPU-only clusters)."""
    import ray

    return float(ray.cluster_resources().get("GPU", 0.0)) if ray.is_initialized() else 0.0


def cluster_cpus() -> float:
    import ray

    return (
        float(ray.cluster_resources().get("CPU", 1.0)) if ray.is_initialized() else float(os.cpu_count() or 1)
    )


def resolve_use_gpu(flag: bool | None) -> bool:
    """``None`` means "use GPUs when the cluster has them"; ``True`` on a GPU-less cluster is an error."""
    gpus = cluster_gpus()
    if flag is None:
        return gpus > 0
    if flag and gpus == 0:
        raise RuntimeError("use_gpu=true but the Ray cluster reports no GPU resources")
    return bool(flag)

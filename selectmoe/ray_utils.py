"""Ray connection and resource helpers shared by every stage."""

from __future__ import annotations

import contextlib
import logging
import os
import socket
import tempfile

from selectmoe.cpu_isa import cpu_isa_env

logger = logging.getLogger(__name__)

# Env vars every Ray worker needs: offline hub, quiet tokenizers, Train V2, the pinned CPU kernels (set at
# worker start: a worker may run a torch kernel before it imports selectmoe).
WORKER_ENV = {
    **cpu_isa_env(),
    "HF_HUB_OFFLINE": "1",
    "HF_DATASETS_OFFLINE": "1",
    "TRANSFORMERS_OFFLINE": "1",
    "TOKENIZERS_PARALLELISM": "false",
    "RAY_TRAIN_V2_ENABLED": "1",
}

LOOPBACK = "127.0.0.1"


@contextlib.contextmanager
def loopback_node():
    """Start Ray nodes in this block on 127.0.0.1 only: an in-process Ray is reachable from this machine
    alone. Why more than ``_node_ip_address="127.0.0.1"``: Ray maps a loopback address to the machine's
    interface address (``services.resolve_ip_for_localhost``) and then listens there and on 0.0.0.0,
    unless its multi-node switch (``RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER``, read once at import) is off;
    that switch is turned off for the node's start only (also for ``ray.cluster_utils.Cluster`` nodes)."""
    from ray._private import ray_constants

    saved = ray_constants.ENABLE_RAY_CLUSTER
    ray_constants.ENABLE_RAY_CLUSTER = False
    try:
        yield
    finally:
        ray_constants.ENABLE_RAY_CLUSTER = saved


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
    head = running_local_head()
    if head:  # a head started with `ray start --head` on this machine
        ray.init(address=head, **kwargs)
        logger.info("joined the running local Ray head at %s", head)
    else:
        with loopback_node():
            ray.init(
                address="local",
                num_cpus=num_cpus,
                include_dashboard=False,
                _node_ip_address=LOOPBACK,
                **kwargs,
            )
        logger.info("started an in-process Ray (%s CPUs)", ray.cluster_resources().get("CPU"))
    return ray


def _ray_address_file() -> str:
    try:
        from ray._common.utils import get_ray_address_file

        return get_ray_address_file(None)
    except ImportError:  # older Ray layouts: the documented default location
        return os.path.join(tempfile.gettempdir(), "ray", "ray_current_cluster")


def running_local_head(timeout_s: float = 1.0) -> str | None:
    """GCS address of the head ``ray start --head`` recorded on this machine, if it still answers.

    Why not ``ray.init(address="auto")``: a head that died without ``ray stop`` leaves its address file
    behind, and "auto" then retries the dead GCS for a minute or more before failing. A one-second TCP
    probe tells a live head from a stale file.
    """
    path = _ray_address_file()
    try:
        with open(path) as f:
            address = f.read().strip()
    except OSError:
        return None
    host, _, port = address.rpartition(":")
    if not host or not port.isdigit():
        return None
    try:
        with socket.create_connection((host, int(port)), timeout=timeout_s):
            return address
    except OSError:
        logger.warning("ignoring %s: no Ray head answers at %s (stale file?)", path, address)
        return None


def cluster_gpus() -> float:
    """Number of GPUs the connected Ray cluster offers (0.0 on CPU-only clusters)."""
    import ray

    return float(ray.cluster_resources().get("GPU", 0.0)) if ray.is_initialized() else 0.0


def cluster_cpus() -> float:
    import ray

    return (
        float(ray.cluster_resources().get("CPU", 1.0)) if ray.is_initialized() else float(os.cpu_count() or 1)
    )


def largest_node_cpus() -> float:
    """CPUs of the cluster's largest alive node (this machine's count without Ray): what one actor's
    threads can use at most."""
    import ray

    if not ray.is_initialized():
        return float(os.cpu_count() or 1)
    sizes = [float(n["Resources"].get("CPU", 0)) for n in ray.nodes() if n.get("Alive")]
    return max(sizes, default=1.0) or 1.0


def resolve_use_gpu(flag: bool | None) -> bool:
    """``None`` means "use GPUs when the cluster has them"; ``True`` on a GPU-less cluster is an error."""
    gpus = cluster_gpus()
    if flag is None:
        return gpus > 0
    if flag and gpus == 0:
        raise RuntimeError("use_gpu=true but the Ray cluster reports no GPU resources")
    return bool(flag)

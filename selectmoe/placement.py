"""Never a hang: fit a request for actors to the Ray cluster before asking for them, then place them.

Ray queues an actor it cannot place and waits forever, so a stage that asks for more than the cluster has
(8 sweep actors on 2 CPUs, 0.25-GPU actors on a GPU-less node) hangs without a word. :func:`plan_actors`
compares the request with ``ray.cluster_resources()`` first: it shrinks the plan to what exists with a
one-line notice naming the key, or stops with a one-line error naming it. :func:`place_actors` reserves the
plan in one placement group and gives up after ``timeout_s`` (resources held by someone else) instead of
waiting forever.

GPU actors: one bundle ``{"GPU": 1}`` per GPU in use, actors dealt round-robin over the bundles, so 8 actors
on 8 GPUs get one GPU each (a plain ``num_gpus=0.25`` request lets Ray pack them onto 2 GPUs).
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass, field
from typing import Any

logger = logging.getLogger(__name__)


@dataclass
class ActorPlan:
    n_actors: int
    gpus_per_actor: float  # 0: CPU actors
    cpus_per_actor: float
    n_bundles: int
    notices: list[str] = field(default_factory=list)

    @property
    def bundles(self) -> list[dict[str, float]]:
        if self.gpus_per_actor:
            return [{"GPU": 1.0}] * self.n_bundles
        return [{"CPU": self.cpus_per_actor}] * self.n_actors


def plan_actors(
    key: str,
    requested: int,
    *,
    gpus_per_actor: float,
    memory_per_actor: float = 0.0,
    memory_key: str | None = None,
    resources: dict[str, float] | None = None,
) -> ActorPlan:
    """Fit ``requested`` actors (``key`` names the config key that asked) to the cluster's resources.

    GPU clusters: ``gpus_per_actor`` (fractional: several actors share a GPU) over the GPUs there are. CPU
    clusters: one CPU each. ``memory_per_actor`` (bytes) against the cluster's ``memory`` resource; with
    no room for even one actor, a ``ValueError`` names ``memory_key``.
    """
    import ray

    res = dict(resources if resources is not None else ray.cluster_resources())
    requested = max(1, int(requested))
    notices: list[str] = []
    gpus = math.floor(res.get("GPU", 0.0) + 1e-9)
    if gpus >= 1:
        per = float(gpus_per_actor)
        if not 0 < per <= 1:
            raise ValueError(f"{key}: GPUs per actor must be in (0, 1], got {per}")
        per_gpu = max(1, math.floor(1 / per + 1e-9))
        fit = min(requested, gpus * per_gpu)
        if fit < requested:
            notices.append(
                f"{key}={requested}: the Ray cluster has {gpus} GPU(s) at {per_gpu} actor(s) each; "
                f"running {fit} actors"
            )
        n, cpus, bundles = fit, 0.0, min(gpus, fit)
    else:
        cpus_total = math.floor(res.get("CPU", 0.0) + 1e-9)
        if cpus_total < 1:
            raise ValueError(f"{key}: the Ray cluster offers no CPU (resources: {res})")
        n = min(requested, cpus_total)
        if n < requested:
            notices.append(f"{key}={requested}: the Ray cluster has {cpus_total} CPU(s); running {n} actors")
        cpus, bundles = 1.0, n
    memory = res.get("memory", 0.0)
    if memory_per_actor > 0 and memory > 0:
        room = int(memory // memory_per_actor)
        if room < 1:
            raise ValueError(
                f"{memory_key or key}: one actor needs ~{memory_per_actor / 2**30:.1f} GiB, the Ray cluster "
                f"offers {memory / 2**30:.1f} GiB of memory"
            )
        if room < n:
            notices.append(
                f"{key}={n}: ~{memory_per_actor / 2**30:.1f} GiB per actor, {memory / 2**30:.1f} GiB in the "
                f"cluster; running {room} actors"
            )
            n = room
            bundles = min(bundles, n)
    for line in notices:
        logger.warning(line)
    return ActorPlan(n, float(gpus_per_actor) if gpus >= 1 else 0.0, cpus, bundles, notices)


def place_actors(actor_cls: Any, plan: ActorPlan, args: tuple = (), *, key: str, timeout_s: float = 60.0):
    """``plan.n_actors`` actors of ``actor_cls`` (a plain class), reserved in one placement group.

    Returns ``(actors, placement_group)``; remove the group when done. Raises ``TimeoutError`` naming
    ``key`` when the cluster cannot reserve the plan within ``timeout_s`` (its resources are held by
    other work): a stage stops instead of waiting forever.
    """
    import ray
    from ray.util.placement_group import placement_group, remove_placement_group
    from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

    pg = placement_group(plan.bundles, strategy="SPREAD")
    ready, _ = ray.wait([pg.ready()], timeout=timeout_s)
    if not ready:
        remove_placement_group(pg)
        raise TimeoutError(
            f"{key}={plan.n_actors}: Ray could not reserve {plan.bundles[:1]} x {len(plan.bundles)} within "
            f"{timeout_s:.0f} s (available: {ray.available_resources()}); lower {key} or free the cluster"
        )
    remote = ray.remote(actor_cls)
    actors = []
    for i in range(plan.n_actors):
        strategy = PlacementGroupSchedulingStrategy(
            placement_group=pg, placement_group_bundle_index=i % len(plan.bundles)
        )
        opts: dict[str, Any] = {"scheduling_strategy": strategy}
        if plan.gpus_per_actor:
            per_bundle = math.ceil(plan.n_actors / len(plan.bundles))
            opts.update(num_gpus=1.0 / per_bundle, num_cpus=0)
        else:
            opts.update(num_cpus=plan.cpus_per_actor)
        actors.append(remote.options(**opts).remote(*args))
    return actors, pg

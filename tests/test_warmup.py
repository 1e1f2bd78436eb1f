"""Warmup stage end to end on a local Ray (CPU): a reproducible probe, fail-once resume, loadable artefacts."""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest
import torch

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    """A small demo pool + a briefly pre-trained tiny OLMoE converted to Select-MoE."""
    from selectmoe.config import DemoConfig
    from selectmoe.data.ingest import ingest_pool
    from selectmoe.demo import prepare_demo_assets
    from selectmoe.model import convert_olmoe

    root = tmp_path_factory.mktemp("warmup")
    t0 = time.perf_counter()
    demo = prepare_demo_assets(
        DemoConfig(
            dir=str(root / "demo"),
            n_clean=240,
            n_eval=8,
            vocab_size=512,
            pretrain_steps=60,
            pretrain_batch_size=16,
            target_pretrain_steps=0,  # the finetune target is not used here
        ),
        seed=0,
    )
    # Gate weights start at exactly zero: every token gets the same g = sigmoid(bias), so the untrained
    # model's probe has no signal (AUC ~0.5: scores tie up to float rounding of the token mean) and any
    # signal above it is learned by the warmup.
    convert_olmoe(demo.olmoe_dir, root / "converted", gate_init_std=0.0)
    ingest_pool([demo.pool_dir], root / "ingest")  # the ingest stage: warmup reads its shards
    print(f"assets built in {time.perf_counter() - t0:.1f}s: {demo.summary()}")
    return {"root": root, "pool": demo.pool_dir, "model": str(root / "converted")}


# the LoRA run's logged loss at steps 2, 4, 6 (seeded, deterministic CPU kernels at the pinned level)
PINNED_WARMUP_LOSSES = [2.53571, 3.03803, 2.02722]  # under the pinned CPU level (selectmoe.cpu_isa)


def _cfg(assets, out: Path, **kw):
    from selectmoe.config import WarmupConfig

    base = dict(
        model_dir=assets["model"],
        ingest_dir=str(assets["root"] / "ingest"),
        output_dir=str(out),
        storage_path=str(out / "ray_results"),
        trainable="full_rank",
        lr=3e-3,
        epochs=1,
        batch_size=16,
        micro_batch_size=4,
        max_length=96,
        gradient_checkpointing=False,
        checkpoint_every=4,
        log_every=2,
        probe_samples=24,
        num_workers=2,
        use_gpu=False,
        seed=0,
    )
    base.update(kw)
    return WarmupConfig(**base)


def test_warmup_without_its_inputs_fails_in_one_line(tmp_path):
    """Nothing converted or ingested: one line naming both inputs and the stages that make them, before
    Ray starts and before the output directory exists."""
    import ray

    from selectmoe.config import WarmupConfig
    from selectmoe.stages.warmup import run_warmup

    cfg = WarmupConfig(
        model_dir=str(tmp_path / "converted"),
        ingest_dir=str(tmp_path / "ingest"),
        output_dir=str(tmp_path / "w"),
    )
    ray_was_up = ray.is_initialized()  # False when this file runs alone
    with pytest.raises(FileNotFoundError) as err:
        run_warmup(cfg)
    assert str(err.value) == (
        f"warmup: needs the converted model at {tmp_path}/converted (run: selectmoe run CONFIG --only convert); "
        f"warmup: needs the ingested pool at {tmp_path}/ingest/shards (run: selectmoe run CONFIG --only ingest)"
    )
    assert ray.is_initialized() == ray_was_up and not (tmp_path / "w").exists()


def _check_artefact(model_dir: str, base_dir: str, mode: str):
    from selectmoe.model import SelectMoeForCausalLM, load_selector

    model, tok, enc = load_selector(model_dir)
    assert enc["max_length"] == 96
    meta = json.loads((Path(model_dir) / "selector.json").read_text())
    assert meta["trainable_mode"] == mode
    assert meta["model_config_overrides"]["quality_loss_type"] == "sigmoid"
    base = SelectMoeForCausalLM.from_pretrained(base_dir, dtype=torch.float32)
    trained, orig = dict(model.named_parameters()), dict(base.named_parameters())
    gates = [n for n in orig if "quality_gate" in n]
    changed = [n for n in gates if not torch.equal(trained[n], orig[n])]
    assert changed, "no quality-gate tensor changed"
    routers = [n for n in orig if n.endswith("mlp.gate.weight")]
    routers_changed = any(not torch.equal(model.state_dict()[n], base.state_dict()[n]) for n in routers)
    assert routers and routers_changed == (mode != "gates_only")
    assert tok.pad_token_id is not None


@pytest.mark.pinned
@pytest.mark.slow
def test_warmup_two_workers_reproduces_its_probe(ray_local, assets, tmp_path):
    """2 DDP workers, 51 steps of ``gates_only``: a reproducible run, its probe AUC before and after pinned.

    Bit-reproducible on every x86 CPU with AVX2: the fixture's base pre-training and the Ray Train workers
    run deterministic kernels, fixed thread counts and one kernel level (``selectmoe.cpu_isa``): 0.4914 ->
    0.4994 there. What it does NOT show is that warmup raises the probe at this scale: before the level was
    pinned, this exact run gave 0.4914 -> 0.5463 on one box, -> 0.4507 on an AVX-512/AMX box and -> 0.4295
    there with ATen at avx2 (issue 27): float rounding alone moves the AUC over 48 probe pairs by more
    than 51 gate steps do. (Earlier still, the base drifted between fixture builds and this test gave
    anything from 0.41 to 0.58.) ``gates_only`` because at this scale and lr the co-trained routers make
    the outcome depend on the data order (``full_rank``, bare loop, 3 orders: 0.518 / 0.484 / 0.554).
    ``full_rank`` artefacts are checked in the Tune test (and the demo pipeline scores with one).
    """
    from selectmoe.manifest import read_manifest
    from selectmoe.stages.warmup import run_warmup
    from selectmoe.training.loop import METRICS_LOG

    t0 = time.perf_counter()
    cfg = _cfg(assets, tmp_path / "w", trainable="gates_only", epochs=3, lr=1e-2, probe_samples=48,
               checkpoint_every=100)  # fmt: skip
    res = run_warmup(cfg)
    print(f"warmup 2 workers: {time.perf_counter() - t0:.1f}s {res.summary()} {res.probe}")
    assert res.steps == 3 * (res.n_train_rows // 16) > 0
    before, after = res.probe["probe_auc_before"], res.probe["probe_auc"]
    # Zero-init gate weights: every token has the same g, so "before" is ~0.5 (ties broken by float
    # rounding of the token means). Pinned at the pinned kernel level (a reproducibility check, not a lift).
    assert (before, after) == pytest.approx((0.4914, 0.4994), abs=1e-4)
    assert set(res.probe["per_corruption"]) == {"shuffle_words", "swap_response", "truncate", "noise"}
    for key in ("lm_loss", "quality_loss", "tokens_per_s", "g_mean_l0"):
        assert key in res.metrics, key
    # Every log step's metrics reach the log once, though reports are batched (at most one per 2 s).
    logged = [json.loads(x) for x in (tmp_path / "w" / METRICS_LOG).read_text().splitlines()]
    per_epoch = res.steps // 3
    log_steps = [s for s in range(1, res.steps + 1) if s % 2 == 0 or s % per_epoch == 0]
    assert [r["step"] for r in logged] == log_steps
    assert all(r["lm_loss"] > 0 and r["tokens_per_s"] > 0 for r in logged)
    assert logged[-1]["probe_auc"] == pytest.approx(after)  # epoch-end rows carry the probe
    assert len([r for r in logged if "probe_auc" in r]) < len(logged)  # batched: not one report per row
    manifest = read_manifest(tmp_path / "w")
    assert manifest["extra"]["probe"]["probe_auc"] == pytest.approx(after)
    assert manifest["counts"]["steps"] == res.steps
    # truncation at max_length, per dataset of the training rows (data.truncation), in result and manifest
    trunc = manifest["extra"]["truncation"]
    assert trunc == res.truncation and trunc["max_length"] == 96
    assert {k: (c["rows"], c["truncated"]) for k, c in trunc["datasets"].items()} == {
        "arithmetic": (41, 9), "capitals": (36, 1), "letter_count": (41, 7), "odd_even": (35, 3),
        "reverse_word": (44, 3), "sorting": (39, 18), "unit_conversion": (36, 1),
    }  # fmt: skip
    assert len(trunc["warnings"]) == 5  # every dataset above 5% truncated, not capitals / unit_conversion
    keep = trunc["datasets"]["sorting"]["keep_length"]
    assert keep > 96 and trunc["warnings"][-1] == (
        "warmup: 46.2% of sorting rows (18/39) truncated at 96 tokens; the gates train on a prefix "
        f"(max_length={keep} keeps 90% of them whole)"
    )
    assert sum(c["rows"] for c in trunc["datasets"].values()) == res.n_train_rows
    assert manifest["counts"]["truncated"] == sum(c["truncated"] for c in trunc["datasets"].values())
    _check_artefact(res.model_dir, assets["model"], "gates_only")


def _tensors(res) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    from selectmoe.training.loop import TRAINABLE_FILE

    return load_file(str(Path(res.checkpoint_path) / TRAINABLE_FILE))


def _equal(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def _losses(out: Path) -> list[float]:
    from selectmoe.training.loop import METRICS_LOG

    rows = [json.loads(x) for x in (out / METRICS_LOG).read_text().splitlines()]
    return [round(r["loss"], 5) for r in rows]


@pytest.mark.pinned
@pytest.mark.slow
def test_warmup_resume_reproduces_and_a_changed_config_retrains(ray_local, assets, tmp_path, monkeypatch):
    """LoRA routers, 1 worker, 6 steps (mid-epoch), checkpoints every 2 steps.

    - killed after step 3 and restarted by Ray Train from the step-2 checkpoint: the final tensors equal
      the uninterrupted run's bit for bit;
    - rerun into the same output dir with the same config: the finished run is returned, same tensors;
    - rerun there with ``quality_loss.type=mse``: a fresh run (the old model came back before the run
      identity), equal to an mse run in a new directory.
    """
    from selectmoe.config import QualityLossConfig
    from selectmoe.stages.warmup import run_warmup
    from selectmoe.training.loop import FAIL_ONCE_ENV

    common = dict(trainable="lora", num_workers=1, checkpoint_every=2, max_steps=6, batch_size=8,
                  probe_samples=8, max_failures=1)  # fmt: skip
    t0 = time.perf_counter()
    plain = run_warmup(_cfg(assets, tmp_path / "a", **common))
    assert plain.steps == 6
    assert _losses(tmp_path / "a") == PINNED_WARMUP_LOSSES
    _check_artefact(plain.model_dir, assets["model"], "lora")

    marker = tmp_path / "failed.marker"
    monkeypatch.setenv(FAIL_ONCE_ENV, f"3:{marker}")
    resumed = run_warmup(_cfg(assets, tmp_path / "b", **common))
    monkeypatch.delenv(FAIL_ONCE_ENV)
    assert marker.exists(), "the injected failure never fired"
    assert resumed.steps == 6 and _equal(_tensors(resumed), _tensors(plain))
    assert _losses(tmp_path / "b")[-1] == PINNED_WARMUP_LOSSES[-1]

    again = run_warmup(_cfg(assets, tmp_path / "a", **common))
    assert _equal(_tensors(again), _tensors(plain))

    mse = QualityLossConfig(type="mse")
    changed = run_warmup(_cfg(assets, tmp_path / "a", quality_loss=mse, **common))
    fresh = run_warmup(_cfg(assets, tmp_path / "c", quality_loss=mse, **common))
    assert _equal(_tensors(changed), _tensors(fresh))
    assert not _equal(_tensors(changed), _tensors(plain))
    assert _losses(tmp_path / "a") == _losses(tmp_path / "c") != PINNED_WARMUP_LOSSES
    print(f"warmup resume + identity: {time.perf_counter() - t0:.1f}s")


@pytest.mark.slow
def test_warmup_fsdp_two_workers_with_the_probe_on(ray_local, assets, tmp_path):
    """``strategy=fsdp`` on 2 gloo workers with the probe on (the default): trains and reports the probe AUC
    before and after, as DDP does (old main: both ranks died on the probe's first forward, "Inplace update
    to inference tensor outside InferenceMode"). Same global batches, so the same model up to float
    summation order: tensors within 1e-4 (as finetune FSDP vs DDP), AUCs within a few rank flips."""
    from selectmoe.manifest import read_manifest
    from selectmoe.stages.warmup import run_warmup

    common = dict(trainable="gates_only", lr=1e-2, max_steps=3, batch_size=8, probe_samples=16,
                  checkpoint_every=100)  # fmt: skip
    runs = {s: run_warmup(_cfg(assets, tmp_path / s, strategy=s, **common)) for s in ("ddp", "fsdp")}
    ddp, fsdp = runs["ddp"], runs["fsdp"]
    assert fsdp.steps == ddp.steps == 3
    for key in ("probe_auc_before", "probe_auc"):
        assert isinstance(fsdp.probe[key], float), key
        assert fsdp.probe[key] == pytest.approx(ddp.probe[key], abs=5e-3), key
    assert read_manifest(tmp_path / "fsdp")["extra"]["probe"]["probe_auc"] == fsdp.probe["probe_auc"]
    a, b = _tensors(fsdp), _tensors(ddp)
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=0, atol=1e-4, msg=k)
    changed = [k for k in a if "quality_gate.weight" in k and bool(a[k].abs().sum() > 0)]
    assert changed  # zero-init gates: trained away from zero

"""A 4-trial Ray Tune sweep (2-point grid x 2 samples) over the warmup (tiny model, tiny max_steps)
picks the best trial by the metric."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from selectmoe.config import PipelineConfig, WarmupConfig


def test_to_domain_and_overrides():
    from ray.tune.search.sample import Categorical, Float

    from selectmoe.tune import apply_overrides, to_domain

    assert isinstance(to_domain(["a", "b"]), Categorical)
    assert isinstance(to_domain({"loguniform": [1e-4, 1e-3]}), Float)
    assert isinstance(to_domain({"uniform": [0.0, 1.0]}), Float)
    assert to_domain(3) == 3
    base = WarmupConfig(model_dir="m", ingest_dir="i", output_dir="o", storage_path="s", seed=1)
    cfg = apply_overrides(base, {"quality_loss.type": "mse", "lr": 0.5})
    assert cfg.quality_loss.type == "mse" and cfg.lr == 0.5 and cfg.model_dir == "m"
    with pytest.raises(KeyError, match="nope"):
        apply_overrides(base, {"nope.x": 1})


def test_trial_rows_come_from_the_result_grid(ray_local, tmp_path):
    """``ResultGrid.get_dataframe()`` rows, with every failed trial kept, also one that never reported."""
    import ray.tune

    from selectmoe.tune import _write_table, trial_rows

    def _toy_trial(config):  # nested: pickled by value (the test module is not importable on workers)
        if config["lr"] == 3:
            raise RuntimeError("fails before its first report")
        ray.tune.report(
            {"probe_auc": config["lr"] / 10, "epoch": 1.0, "step": 4, "lm_loss": 2.0 + config["lr"]}
        )
        if config["lr"] == 2:
            raise RuntimeError("fails after one report")

    tuner = ray.tune.Tuner(
        _toy_trial,
        param_space={"lr": ray.tune.grid_search([1, 2, 3])},
        run_config=ray.tune.RunConfig(name="toy", storage_path=str(tmp_path / "rr"), verbose=0),
    )
    rows = trial_rows(tuner.fit(), ["lr"], "probe_auc", tmp_path / "trials")
    got = sorted((r["param.lr"], r["status"], r["probe_auc"], r["lm_loss"], r["step"]) for r in rows)
    assert got[:2] == [(1, "ok", 0.1, 3.0, 4), (2, "error", 0.2, 4.0, 4)]
    assert got[2][:2] == (3, "error") and all(x is None for x in got[2][2:])
    assert all(r["trial_dir"] == str(tmp_path / "trials" / r["trial_id"]) for r in rows if r["trial_id"])
    _write_table(tmp_path, rows)
    assert (tmp_path / "results.csv").read_text().splitlines()[0].split(",") == list(rows[0])
    assert len(json.loads((tmp_path / "results.json").read_text())) == 3


@pytest.fixture(scope="module")
def tiny_assets(tmp_path_factory):
    from selectmoe.data.demo_pool import build_demo_pool
    from selectmoe.data.ingest import ensure_ingested, iter_ingested_records
    from selectmoe.model.tiny import build_tiny_select_moe, train_bpe_tokenizer

    root = tmp_path_factory.mktemp("tune")
    pool = build_demo_pool(root / "pool", n_clean=48, bad_fraction=0.25, seed=0)
    ingest = ensure_ingested([str(p) for p in pool.all_paths], root / "ingest")
    texts = [m["content"] for r in iter_ingested_records(ingest.out_dir) for m in r["messages"]]
    tok = train_bpe_tokenizer(texts, vocab_size=400)
    model = build_tiny_select_moe(tok, seed=0)
    model.save_pretrained(root / "model")
    tok.save_pretrained(root / "model")
    return root, [str(p) for p in pool.all_paths]


@pytest.mark.slow
def test_tune_sweep_picks_best(ray_local, tiny_assets):
    from selectmoe.model import SelectMoeForCausalLM, load_selector
    from selectmoe.tune import run_tune

    root, _ = tiny_assets
    warmup = WarmupConfig(
        model_dir=str(root / "model"), ingest_dir=str(root / "ingest"), output_dir=str(root / "unused"), storage_path=str(root / "unused_rr"),
        trainable="full_rank", epochs=1, batch_size=8, micro_batch_size=4, max_length=96, max_steps=2,
        gradient_checkpointing=False, checkpoint_every=100, log_every=1, probe_samples=8, num_workers=1,
        use_gpu=False, seed=0,
    )  # fmt: skip
    cfg = PipelineConfig(output_dir=str(root), seed=0, warmup=warmup)
    cfg.tune.output_dir = str(root / "tune")
    # Each trial is a full Ray Train run (~50 s of fixed cost here): half-CPU workers let two run at once.
    cfg.warmup.resources_per_worker = {"CPU": 0.5}
    cfg.tune.max_concurrent_trials = 2
    cfg.tune.num_samples = 2  # x a 2-point grid = 4 trials
    cfg.tune.param_space = {
        "quality_loss.type": {"grid": ["sigmoid", "mse"]},
        "lr": {"loguniform": [1e-3, 1e-2]},
    }
    result = run_tune(cfg)
    print(result)
    assert result.n_trials == 4
    ok = [r for r in result.rows if r["status"] == "ok"]
    assert len(ok) == 4
    assert sorted(r["param.quality_loss.type"] for r in ok) == ["mse", "mse", "sigmoid", "sigmoid"]
    assert all(1e-3 <= r["param.lr"] <= 1e-2 for r in ok)
    best = max(r["probe_auc"] for r in ok)
    assert result.best_metric == pytest.approx(best)
    saved = json.loads((root / "tune" / "best_config.json").read_text())
    assert saved["value"] == pytest.approx(best)
    assert saved["warmup_config"]["quality_loss"]["type"] == saved["params"]["quality_loss.type"]
    assert (root / "tune" / "results.csv").read_text().count("\n") == 5
    assert (root / "tune" / "_manifest.json").is_file()
    assert (root / "tune" / "trials").is_dir() and len(list((root / "tune" / "trials").iterdir())) == 4
    # The best trial's selector is a loadable full_rank artefact: gates and routers both trained.
    model, _, _ = load_selector(Path(result.best_trial_dir) / "model")
    trained = model.state_dict()
    base = SelectMoeForCausalLM.from_pretrained(root / "model", dtype=torch.float32).state_dict()
    for part in ("quality_gate", "mlp.gate.weight"):
        names = [n for n in base if part in n]
        assert names and any(not torch.equal(trained[n], base[n]) for n in names), part

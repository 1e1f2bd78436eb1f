"""Config: defaults in one place, presets validated, overrides, clear errors."""

from __future__ import annotations

import dataclasses

import pytest

from selectmoe.config import PipelineConfig, list_presets, load_config

_PATHS = ["convert.source=/m", "data.pool=[/d]", "finetune.base_model=/t"]
REQUIRED = {"olmoe_less": _PATHS, "select_moe_gate": _PATHS}


@pytest.mark.parametrize("preset", list_presets())
def test_every_shipped_preset_loads_and_validates(preset):
    cfg = load_config(preset, [*REQUIRED.get(preset, []), "output_dir=/tmp/run"])
    assert isinstance(cfg, PipelineConfig)
    assert cfg.score.output_dir == "/tmp/run/router_data"
    assert cfg.select.router_dir == cfg.score.output_dir  # stages chain through interpolation
    assert cfg.warmup.pool == cfg.data.pool


def test_presets_cover_the_documented_users():
    assert {"demo", "olmoe_less", "tune_quality_loss", "select_moe_gate"} <= set(list_presets())


def test_select_score_and_policy_validated_and_seed_preset():
    gate = load_config("select_moe_gate", [*_PATHS, "output_dir=/tmp/run"]).select
    assert (gate.score, gate.policy) == ("gate", "round_robin")
    default = load_config("demo", ["output_dir=/tmp/run"]).select
    assert (default.score, default.policy) == ("response_nll", "quality_round_robin")
    with pytest.raises(ValueError, match=r"select\.score=.ppl. is not one of"):
        load_config("demo", ["output_dir=/tmp/run", "select.score=ppl"])
    with pytest.raises(ValueError, match=r"select\.score=ifd needs score\.ifd=true"):
        load_config("demo", ["output_dir=/tmp/run", "select.score=ifd"])
    with pytest.raises(ValueError, match=r"select\.quality_floor"):
        load_config("demo", ["output_dir=/tmp/run", "select.quality_floor=0"])
    with pytest.raises(ValueError, match=r"select\.baselines: unknown policy"):
        load_config("demo", ["output_dir=/tmp/run", "select.baselines=[randm]"])


def test_dotted_overrides_and_interpolated_seed():
    cfg = load_config(None, ["seed=7", "select.k_range=[3,9]", "warmup.quality_loss.type=mse"])
    assert cfg.select.seed == 7 and cfg.warmup.seed == 7
    assert cfg.select.k_range == [3, 9]
    assert cfg.warmup.quality_loss.type == "mse"


def test_unknown_key_is_an_error():
    with pytest.raises(Exception, match=r"selectt|not in"):
        load_config(None, ["selectt.k=3"])


def test_mandatory_preset_values_are_named():
    with pytest.raises(ValueError, match=r"convert\.source.*data\.pool.*finetune\.base_model"):
        load_config("olmoe_less")


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("select.k_choice=biggest", "k_choice"),
        ("warmup.trainable=everything", "trainable"),
        ("select.selection_percentage=0", "selection_percentage"),
        ("select.k_range=[1,5]", "k_range"),
        ("stages=[warmup,polish]", "unknown stage"),
    ],
)
def test_invalid_values_fail_clearly(override, message):
    with pytest.raises(ValueError, match=message):
        load_config(None, [override])


def test_defaults_match_the_original_final_run():
    """The original's final Stage-1 settings (reference §3.5) are the warmup defaults."""
    w = load_config(None).warmup
    assert (w.lr, w.epochs, w.batch_size, w.max_length) == (3e-4, 2, 16, 1024)
    assert (w.quality_loss.type, w.quality_loss.weight, w.quality_loss.sample_wise_averaging) == (
        "sigmoid",
        1.0,
        True,
    )
    f = load_config(None).finetune
    assert (f.lora_r, f.lora_alpha, f.lora_dropout, f.lr, f.epochs, f.batch_size) == (
        128,
        512,
        0.1,
        2e-5,
        4,
        128,
    )
    assert dataclasses.asdict(load_config(None))["select"]["selection_percentage"] == 0.05


def test_local_paths_become_absolute_uris_and_hub_ids_do_not(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "pool.jsonl").write_text("")
    cfg = load_config(
        None,
        [
            "output_dir=runs/a",
            "data.pool=[pool.jsonl,s3://bucket/x.jsonl]",
            "finetune.base_model=Qwen/Qwen2.5-1.5B",
        ],
    )
    assert cfg.output_dir == str(tmp_path / "runs" / "a")
    assert cfg.warmup.storage_path == str(tmp_path / "runs" / "a" / "ray_results")
    assert cfg.data.pool == [str(tmp_path / "pool.jsonl"), "s3://bucket/x.jsonl"]
    assert cfg.finetune.base_model == "Qwen/Qwen2.5-1.5B"

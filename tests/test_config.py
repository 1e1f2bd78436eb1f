"""Config: defaults in one place, wiring in the base YAML, presets validated, overrides, clear errors."""

from __future__ import annotations

import dataclasses
import re
import sys

import pytest
from omegaconf import OmegaConf

from selectmoe.config import (
    BASE_CONFIG,
    CHOICES,
    PRESET_DIR,
    FinetuneConfig,
    PipelineConfig,
    SelectConfig,
    TrainingConfig,
    WarmupConfig,
    dump_config,
    leaves,
    list_presets,
    load_config,
    merged_config,
    preset_path,
)

_PATHS = ["convert.source=/m", "data.pool=[/d]", "finetune.base_model=/t"]
REQUIRED = {"olmoe_less": _PATHS, "select_moe_gate": _PATHS}


@pytest.mark.parametrize("preset", list_presets())
def test_every_shipped_preset_loads_and_validates(preset):
    cfg = load_config(preset, [*REQUIRED.get(preset, []), "output_dir=/tmp/run"])
    assert isinstance(cfg, PipelineConfig)
    assert cfg.score.output_dir == "/tmp/run/router_data"
    assert cfg.select.router_dir == cfg.score.output_dir  # stages chain through interpolation
    assert cfg.warmup.ingest_dir == cfg.score.ingest_dir == cfg.data.ingest_dir == "/tmp/run/ingest"
    assert cfg.evaluate.output_dir == "/tmp/run/evaluate"


def test_presets_cover_the_documented_users():
    assert set(list_presets()) == {"demo", "olmoe_less", "tune_quality_loss", "select_moe_gate"}
    with pytest.raises(FileNotFoundError, match="no config file or preset named '_base'"):
        preset_path("_base")  # the wiring is merged under everything, it is not a preset


def test_dataclass_defaults_are_concrete_and_the_wiring_lives_in_the_base_yaml():
    defaults = dataclasses.asdict(PipelineConfig())
    wired = [k for k, v in leaves(defaults) if "${" in str(v)]
    assert wired == []
    assert SelectConfig().seed == 42 and WarmupConfig().seed == 42
    assert WarmupConfig().model_dir == "???"  # an input the wiring (or the caller) names
    base = OmegaConf.to_container(OmegaConf.load(BASE_CONFIG))
    # the base YAML holds only wiring, and everything the dataclasses leave mandatory is wired there
    assert all("${" in str(v) for _, v in leaves(base))
    assert {k for k, v in leaves(defaults) if v == "???"} == {k for k, _ in leaves(base)} - {
        "finetune.train_files.selected",
        "warmup.seed",
        "select.seed",
        "finetune.seed",
    }


@pytest.mark.parametrize("preset", list_presets())
def test_no_preset_restates_a_default(preset):
    defaults = OmegaConf.to_container(merged_config(), resolve=False)
    restated = []
    for key, value in leaves(OmegaConf.to_container(OmegaConf.load(PRESET_DIR / f"{preset}.yaml"))):
        node = defaults
        for part in key.split("."):
            node = node.get(part, KeyError) if isinstance(node, dict) else KeyError
        if node == value:
            restated.append(key)
    assert restated == []


def test_warmup_and_finetune_share_one_training_config_the_loop_takes_as_is():
    shared = {f.name for f in dataclasses.fields(WarmupConfig)} & {
        f.name for f in dataclasses.fields(FinetuneConfig)
    }
    assert shared == {f.name for f in dataclasses.fields(TrainingConfig)} and len(shared) == 24
    assert issubclass(WarmupConfig, TrainingConfig) and issubclass(FinetuneConfig, TrainingConfig)
    from selectmoe.training.loop import LoopSpec

    assert {f.name: f.type for f in dataclasses.fields(LoopSpec)}["train"] == "TrainingConfig"
    # LESS's protocol for the finetune, the original's final run for the warmup; the rest shared
    w, f = load_config(None).warmup, load_config(None).finetune
    assert (w.lr, w.label_mode, w.gradient_checkpointing) == (3e-4, "full_sequence_mask_tags", True)
    assert (f.lr, f.label_mode, f.gradient_checkpointing) == (2e-5, "assistant_only", False)
    assert w.storage_path == f.storage_path and w.seed == f.seed == 42


def test_select_score_and_policy_validated_and_seed_preset():
    gate = load_config("select_moe_gate", [*_PATHS, "output_dir=/tmp/run"]).select
    assert (gate.score, gate.policy, gate.rank_within) == ("gate", "round_robin", "pool")
    default = load_config("demo", ["output_dir=/tmp/run"]).select
    assert (default.score, default.policy, default.rank_within) == (
        "nll_ifd_text", "quality_sample", "dataset",
    )  # fmt: skip
    with pytest.raises(ValueError, match=r"select\.score=.ppl. is not one of"):
        load_config("demo", ["output_dir=/tmp/run", "select.score=ppl"])
    with pytest.raises(ValueError, match=r"select\.score=ifd needs score\.ifd=true"):
        load_config("demo", ["output_dir=/tmp/run", "select.score=ifd", "score.ifd=false"])
    with pytest.raises(ValueError, match=r"select\.rank_within"):
        load_config("demo", ["output_dir=/tmp/run", "select.rank_within=cluster"])
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


@pytest.mark.parametrize(
    "removed",
    [
        "warmup.pool=[/x]",
        "warmup.data_format=auto",
        "warmup.strict=true",
        "warmup.lora_dropout=0",
        "score.pool=[/x]",
        "score.data_format=auto",
        "score.strict=true",
        "score.concurrency=2",
        "select.num_actors=2",
        "select.num_gpus_per_actor=0.5",
        "select.fit_fraction=0.5",
        "evaluate.num_gpus_per_eval=1",
    ],
)
def test_removed_and_renamed_keys_are_refused_by_name(removed):
    key = removed.split("=")[0].split(".")[1]
    with pytest.raises(Exception, match=rf"Key '{key}' not in"):
        load_config(None, [removed])


def test_replica_counts_share_one_name():
    cfg = load_config(
        None, ["score.num_replicas=3", "select.num_replicas=4", "evaluate.num_gpus_per_replica=0.5"]
    )
    assert (cfg.score.num_replicas, cfg.select.num_replicas, cfg.evaluate.num_gpus_per_replica) == (3, 4, 0.5)
    assert (cfg.score.num_gpus_per_replica, cfg.select.num_gpus_per_replica) == (1.0, 0.25)


@pytest.mark.parametrize("key", sorted(CHOICES))
def test_every_choice_field_is_validated_by_name(key):
    cfg = load_config(None)
    node = cfg
    for part in key.split("."):
        node = getattr(node, part)
    assert node in CHOICES[key]  # the default is a valid choice
    allowed = ", ".join(repr(c) for c in CHOICES[key])
    with pytest.raises(ValueError, match=rf"^{key.replace('.', '[.]')}='bogus' is not one of \[{allowed}\]$"):
        load_config(None, [f"{key}=bogus"])


def test_kneedle_without_kneed_is_an_error_not_a_silent_elbow(monkeypatch):
    from selectmoe.cluster.kselect import choose_k

    assert load_config(None, ["select.k_choice=kneedle"]).select.k_choice == "kneedle"  # kneed installed
    monkeypatch.setitem(sys.modules, "kneed", None)  # the import fails as when it is not installed
    with pytest.raises(ValueError, match=r"select\.k_choice=kneedle needs the kneed package"):
        load_config(None, ["select.k_choice=kneedle"])
    with pytest.raises(ValueError, match="needs the kneed package"):
        choose_k([2, 3, 4, 5], [10.0, 4.0, 3.0, 2.5], None, "kneedle")


def test_dump_is_reusable_and_its_paths_follow_a_new_output_dir(tmp_path):
    text = dump_config("demo", ["warmup.lr=0.01"])
    assert "output_dir: ${output_dir}/warmup" in text and "pool:\n  - ${demo.dir}/pool" in text
    saved = tmp_path / "run.yaml"
    saved.write_text(text)
    cfg = load_config(saved, ["output_dir=/other"])
    paths = [(k, v) for k, v in leaves(dataclasses.asdict(cfg)) for v in (v if isinstance(v, list) else [v])]
    paths = [(k, v) for k, v in paths if isinstance(v, str) and v.startswith("/")]
    assert len(paths) == 27 and [(k, v) for k, v in paths if not f"{v}/".startswith("/other/")] == []
    assert cfg.data.pool == ["/other/demo_assets/pool"] and cfg.warmup.lr == 0.01
    assert cfg.finetune.train_files == {
        "selected": "/other/selection/selected_data.jsonl",
        "random": "/other/selection/selected_random.jsonl",
        "top_k": "/other/selection/selected_top_k.jsonl",
    }
    assert dataclasses.asdict(load_config(saved)) == dataclasses.asdict(
        load_config("demo", ["warmup.lr=0.01"])
    )


def test_dump_keeps_mandatory_values_open():
    text = dump_config("olmoe_less", [])
    assert "  source: ???\n" in text and "  pool: ???\n" in text and "  base_model: ???\n" in text
    assert "source: ???" not in dump_config("olmoe_less", ["convert.source=/m"])


def test_mandatory_preset_values_are_named():
    # only the `???` values, not the interpolations that refer to them (evaluate.base_model)
    wanted = "mandatory value(s) not set: convert.source, data.pool, finetune.base_model (give key=value)"
    with pytest.raises(ValueError, match=re.escape(f"config olmoe_less: {wanted}")):
        load_config("olmoe_less")
    with pytest.raises(ValueError, match=r"not set: warmup\.model_dir \("):
        load_config(None, ["warmup.model_dir=???"])  # an override reopens a value too


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("select.k_choice=biggest", "k_choice"),
        ("warmup.trainable=everything", "trainable"),
        ("select.selection_percentage=0", "selection_percentage"),
        ("select.k_range=[1,5]", "k_range"),
        ("select.k_range=[4]", "k_range"),
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

"""CLI and pipeline planning: list and show configs; stage selection (CLI errors: test_cli.py)."""

from __future__ import annotations

import json

import pytest

from selectmoe.cli import main
from selectmoe.config import load_config
from selectmoe.pipeline import is_complete, planned_stages, stage_key


def test_presets_and_config_commands(capsys):
    assert main(["presets"]) == 0
    assert {"demo", "olmoe_less", "tune_quality_loss"} <= set(capsys.readouterr().out.split())
    assert main(["config", "demo", "output_dir=/tmp/zz", "select.k_range=[3,5]"]) == 0
    shown = capsys.readouterr().out
    assert "output_dir: /tmp/zz" in shown and "output_dir: ${output_dir}/router_data" in shown
    assert "k_range:\n  - 3\n  - 5\n" in shown


def test_planned_stages_only_and_from():
    cfg = load_config("demo")
    assert planned_stages(cfg) == [
        "demo", "ingest", "convert", "warmup", "score", "select", "finetune", "evaluate", "report",
    ]  # fmt: skip
    assert planned_stages(cfg, only=["score"]) == ["score"]
    assert planned_stages(cfg, start="select") == ["select", "finetune", "evaluate", "report"]
    tune = load_config("tune_quality_loss")
    assert planned_stages(tune) == ["demo", "ingest", "convert"]


def test_stage_key_follows_config_and_upstream_manifests(tmp_path):
    cfg = load_config("demo", [f"output_dir={tmp_path}"])
    key = stage_key(cfg, "select")
    assert stage_key(load_config("demo", [f"output_dir={tmp_path}", "select.n_init=5"]), "select") != key
    # An upstream stage that writes a (new) manifest changes the downstream key.
    router = tmp_path / "router_data"
    router.mkdir()
    (router / "_manifest.json").write_text(json.dumps({"stage": "score", "complete": True}))
    assert stage_key(cfg, "select") != key
    assert not is_complete(cfg, "select")


def test_stage_table_is_the_contract():
    """Every stage is ``selectmoe/stages/<name>.py: run_<name>(cfg) -> <Name>Result``, in pipeline order."""
    import importlib
    import inspect

    from selectmoe.stages.contract import STAGE_TABLE

    assert [s.name for s in STAGE_TABLE] == planned_stages(load_config("demo"))
    for stage in STAGE_TABLE:
        module, func = stage.runner.split(":")
        assert (module, func) == (f"selectmoe.stages.{stage.name}", f"run_{stage.name}")
        ret = inspect.signature(getattr(importlib.import_module(module), func)).return_annotation
        assert ret == f"{stage.name.capitalize()}Result", (stage.name, ret)
    assert {s.name for s in STAGE_TABLE if s.needs_ray} == {
        "warmup",
        "score",
        "select",
        "finetune",
        "evaluate",
    }


def test_a_stage_without_its_inputs_fails_before_ray_and_creates_nothing(tmp_path, capsys):
    import ray

    from selectmoe.pipeline import run_pipeline

    run = tmp_path / "run"
    cfg = load_config("demo", [f"output_dir={run}"])
    want = (
        f"score: needs the warmup model at {run}/warmup/model (run: selectmoe run CONFIG --only warmup); "
        f"score: needs the ingested pool at {run}/ingest/shards (run: selectmoe run CONFIG --only ingest)"
    )
    ray_was_up = ray.is_initialized()  # False when this file runs alone
    with pytest.raises(FileNotFoundError) as err:
        run_pipeline(cfg, only=["score"], echo=lambda line: None)
    assert str(err.value) == want
    assert main(["run", "demo", f"output_dir={run}", "--only", "score"]) == 2
    assert capsys.readouterr().err == f"selectmoe run: error: {want}\n"
    assert ray.is_initialized() == ray_was_up and not run.exists()
    # --from finetune: the selections are missing, and the base model (the demo stage is not planned)
    with pytest.raises(FileNotFoundError) as err:
        run_pipeline(cfg, start="finetune", echo=lambda line: None)
    assert str(err.value).split("; ") == [
        f"finetune: needs the base model at {run}/demo_assets/tiny_target (set finetune.base_model)",
        *(
            f"finetune: needs the selection at {run}/selection/{name} (run: selectmoe run CONFIG --only select)"
            for name in ("selected_data.jsonl", "selected_random.jsonl", "selected_top_k.jsonl")
        ),
    ]
    assert not run.exists()


def test_inputs_made_by_an_earlier_planned_stage_pass_the_check(tmp_path):
    from selectmoe.pipeline import check_planned_inputs, stages_to_run

    cfg = load_config("demo", [f"output_dir={tmp_path}"])
    stages = planned_stages(cfg)
    check_planned_inputs(cfg, stages, stages_to_run(cfg, stages))  # the demo makes pool and models
    (tmp_path / "ingest" / "shards").mkdir(parents=True)  # ingested; nothing converted
    with pytest.raises(FileNotFoundError, match=r"^warmup: needs the converted model at .*--only convert\)$"):
        check_planned_inputs(cfg, ["warmup"], {"warmup"})


def test_ingest_names_a_missing_pool_file(tmp_path):
    from selectmoe.config import DataConfig
    from selectmoe.stages.ingest import run_ingest

    (tmp_path / "a.jsonl").write_text("")
    pool = [
        f"{tmp_path}/a.jsonl#dataset=a",
        f"{tmp_path}/b.jsonl",
        "s3://bucket/c.jsonl",
        f"{tmp_path}/*.json",
    ]
    with pytest.raises(FileNotFoundError) as err:
        run_ingest(DataConfig(pool=pool, ingest_dir=str(tmp_path / "ingest")))
    assert str(err.value) == f"ingest: needs the pool file at {tmp_path}/b.jsonl (set data.pool)"
    with pytest.raises(ValueError, match=r"^data\.pool is empty"):
        run_ingest(DataConfig(pool=[], ingest_dir=str(tmp_path / "ingest")))
    assert not (tmp_path / "ingest").exists()

"""CLI and pipeline planning: list, show and validate configs; stage selection; clear errors."""

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


def test_cli_reports_missing_mandatory_values(capsys):
    assert main(["run", "olmoe_less"]) == 2
    assert "convert.source" in capsys.readouterr().err


def test_cli_rejects_unknown_stage(capsys):
    assert main(["run", "demo", "--only", "polish"]) == 2
    assert "unknown stage" in capsys.readouterr().err


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


@pytest.mark.parametrize("bad", ["demo.yml", "nope"])
def test_unknown_config_names_the_presets(bad, capsys):
    assert main(["config", bad]) == 2
    assert "presets:" in capsys.readouterr().err

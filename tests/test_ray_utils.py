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

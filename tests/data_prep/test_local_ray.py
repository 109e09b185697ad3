"""free_ports: loopback ports outside the ephemeral range (where outgoing connections would take
them before Ray's GCS and dashboard bind them; CI once saw the dashboard fail so)."""

import socket

import pytest

from data_prep import local_ray
from data_prep.local_ray import PORT_FLOOR, free_port, free_ports


def _bindable(port: int) -> bool:
    with socket.socket() as s:
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return False
        return True


def test_free_ports_are_distinct_bindable_and_below_the_ephemeral_range():
    top = local_ray._ephemeral_start()
    assert top > PORT_FLOOR + 1000  # this machine leaves room: the path under test is taken
    ports = free_ports(16)
    assert len(set(ports)) == 16
    assert all(PORT_FLOOR <= p < top for p in ports), ports
    assert all(_bindable(p) for p in ports)
    assert PORT_FLOOR <= free_port() < top


def test_a_port_in_use_is_never_returned(monkeypatch):
    with socket.socket() as held:  # the only port the window allows is taken
        held.bind(("127.0.0.1", 0))
        taken = held.getsockname()[1]
        monkeypatch.setattr(local_ray, "PORT_FLOOR", taken)
        monkeypatch.setattr(local_ray, "_ephemeral_start", lambda: taken + 2)  # window: taken, +1
        if not _bindable(taken + 1):
            pytest.skip(f"port {taken + 1} is busy on this machine")
        assert free_ports(1) == [taken + 1]
        with pytest.raises(RuntimeError, match="found only 1 of 2 free ports"):
            free_ports(2)


def test_no_room_below_the_ephemeral_range_falls_back_to_the_os(monkeypatch, tmp_path):
    narrow = tmp_path / "ip_local_port_range"
    narrow.write_text(f"{PORT_FLOOR - 100}\t60999\n")
    monkeypatch.setattr(local_ray, "EPHEMERAL_RANGE_FILE", str(narrow))
    assert local_ray._ephemeral_start() == PORT_FLOOR - 100
    ports = free_ports(3)
    assert len(set(ports)) == 3 and all(_bindable(p) for p in ports)
    monkeypatch.setattr(local_ray, "EPHEMERAL_RANGE_FILE", str(tmp_path / "missing"))
    assert local_ray._ephemeral_start() == 32768

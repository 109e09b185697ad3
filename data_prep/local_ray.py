"""Ray on this one machine: the environment an embedded Ray needs, and free loopback ports
(outside the ephemeral range, see ``free_ports``).

Shared by staging (``data_prep.stage``), its benchmark, the trainer's Ray launcher and the
tests, so the settings live in one place. Ray reads them when it is *imported* (and at init),
so ``use_local_ray_env`` must run before the first ``import ray``:
- ``RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0``: keep 127.0.0.1 (otherwise Ray silently replaces it
  with the host's routable address);
- ``RAY_AUTH_MODE=disabled``: no token auth for a cluster that only listens on loopback;
- ``RAY_USAGE_STATS_ENABLED=0``: an offline box does not try to report usage.
Kept free of torch and Ray imports (data_prep must not need torch).
"""

from __future__ import annotations

import contextlib
import os
import random
import socket
from pathlib import Path

LOCAL_RAY_ENV = {
    "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0",
    "RAY_AUTH_MODE": "disabled",
    "RAY_USAGE_STATS_ENABLED": "0",
}
PORT_FLOOR = 20000
EPHEMERAL_RANGE_FILE = "/proc/sys/net/ipv4/ip_local_port_range"


def use_local_ray_env() -> None:
    """Set ``LOCAL_RAY_ENV`` where the caller's environment does not say otherwise."""
    for key, val in LOCAL_RAY_ENV.items():
        os.environ.setdefault(key, val)


def _ephemeral_start() -> int:
    """The first port of the ephemeral range (read on Linux; elsewhere 32768, Linux's default)."""
    try:
        return int(Path(EPHEMERAL_RANGE_FILE).read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return 32768


def free_ports(n: int) -> list[int]:
    """``n`` distinct TCP ports free on 127.0.0.1 now, where nothing else is likely to take them
    before the process they are for binds them (Ray's GCS and dashboard start seconds later).

    Not ``bind(0)``: the OS hands those out of its ephemeral range, the range every outgoing
    connection on the machine also draws its local port from, so in the seconds until the real
    bind any ``connect()`` may take the port (CI saw Ray's dashboard fail with EADDRINUSE; Ray's
    own port picker avoids the same, ray-project/ray#8254). These are random ports between
    ``PORT_FLOOR`` (above Ray's default worker ports, 10002-19999) and the start of the
    ephemeral range, each checked by binding it; the sockets stay open until all ``n`` are
    found, so the ports differ. Where the ephemeral range leaves no room, ``bind(0)``."""
    top = _ephemeral_start() - 1
    rng = random.SystemRandom()  # not the global generator: callers seed that
    ports: list[int] = []
    with contextlib.ExitStack() as held:  # each found port's socket, open until all are found
        for _ in range(200 * n):
            s = socket.socket()
            try:
                s.bind(("127.0.0.1", rng.randint(PORT_FLOOR, top) if top > PORT_FLOOR else 0))
            except OSError:  # in use (or TIME_WAIT): draw again
                s.close()
                continue
            ports.append(held.enter_context(s).getsockname()[1])
            if len(ports) == n:
                return ports
    raise RuntimeError(f"found only {len(ports)} of {n} free ports on 127.0.0.1 "
                       f"between {PORT_FLOOR} and {top}")


def free_port() -> int:
    """One port of ``free_ports``."""
    return free_ports(1)[0]

"""Ray on this one machine: the environment an embedded Ray needs, and free loopback ports.

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

import os
import socket

LOCAL_RAY_ENV = {
    "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0",
    "RAY_AUTH_MODE": "disabled",
    "RAY_USAGE_STATS_ENABLED": "0",
}


def use_local_ray_env() -> None:
    """Set ``LOCAL_RAY_ENV`` where the caller's environment does not say otherwise."""
    for key, val in LOCAL_RAY_ENV.items():
        os.environ.setdefault(key, val)


def free_port() -> int:
    """A TCP port free on 127.0.0.1 right now (the OS picks it)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]

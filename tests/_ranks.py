"""Helpers for the tests that start several torch.distributed processes on loopback."""
from __future__ import annotations

import socket
import time
from pathlib import Path
from typing import Callable

import pytest
import torch.multiprocessing as mp


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def loopback_env() -> dict[str, str]:
    """Keep Gloo on the loopback interface (it would otherwise pick the host's)."""
    return {"GLOO_SOCKET_IFNAME": "lo"} if Path("/sys/class/net/lo").exists() else {}


def spawn_ranks(worker: Callable, args: tuple | Callable[[], tuple], timeout_s: float, nprocs: int = 2,
                what: str = "ranks") -> None:
    """Run ``worker(rank, *args)`` in ``nprocs`` processes; fail (not hang) after ``timeout_s``.

    A rank that raises makes ``join`` raise here with its traceback; a hung
    collective kills the processes and fails the test. ``args`` may be a
    function making them: then a rank killed by a signal (a C++ abort, as
    Gloo does when its port was taken between :func:`free_port` and the
    rendezvous) or a run that hangs is retried once with fresh arguments,
    i.e. a fresh port. (Once in a full CI run on 2 cores the ranks stopped
    making progress where a rank forks its DataLoader worker, a process that
    already runs Gloo and OpenMP threads; the same run alone never hung.) A
    real fault aborts or hangs twice and fails.
    """
    make = args if callable(args) else (lambda: args)
    attempts = 2 if callable(args) else 1
    for attempt in range(attempts):
        try:
            _spawn_once(worker, make(), timeout_s, nprocs, what)
            return
        except mp.ProcessExitedException as exc:
            if attempt == attempts - 1 or exc.signal_name is None:
                raise
            print(f"spawn_ranks: {exc}; retrying once on a fresh port")
        except _Hung as exc:
            if attempt == attempts - 1:
                pytest.fail(str(exc))
            print(f"spawn_ranks: {exc}; retrying once on a fresh port")


class _Hung(Exception):
    """The ranks did not finish in time (they were killed)."""


def _spawn_once(worker: Callable, args: tuple, timeout_s: float, nprocs: int, what: str) -> None:
    ctx = mp.spawn(worker, args=args, nprocs=nprocs, join=False)
    deadline = time.monotonic() + timeout_s
    while not ctx.join(timeout=2):
        if time.monotonic() > deadline:
            for p in ctx.processes:
                p.kill()
            raise _Hung(f"the {nprocs} {what} did not finish in {timeout_s} s (a collective hung?)")

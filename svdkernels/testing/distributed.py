"""A launcher for multi-process tests and benchmarks on one machine: ``N`` spawned
processes in one gloo process group on 127.0.0.1, each running ``fn(rank, world_size,
*args)``; the results come back in rank order, and a rank that raises, dies or hangs
ends the run with an error naming it instead of hanging the caller.

The rendezvous is a ``TCPStore`` served by the calling process on a port the OS picks
(port 0), so there is no race for a "free" port between choosing it and binding it.
"""
from __future__ import annotations

import datetime
import os
import pickle
import queue as queue_mod
import socket
import time
import traceback
from collections.abc import Callable
from typing import Any

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from ..errors import check_finite_number

_HOST = "127.0.0.1"
_POLL_S = 0.05
_GRACE_S = 0.5  # after the first failure, how long to wait for the other ranks' reports
_EXIT_S = 10.0  # after every result is in, how long each process gets to exit by itself


class DistributedError(RuntimeError):
    """A rank of :func:`run_distributed` raised, died or hung; ``ranks`` lists them."""

    def __init__(self, message: str, ranks: list[int]):
        super().__init__(message)
        self.ranks = ranks


class DistributedTimeout(DistributedError, TimeoutError):
    """The run did not finish within ``timeout``; ``ranks`` lists the unfinished ranks."""


def _loopback_interface() -> str | None:
    names = [name for _, name in socket.if_nameindex()]
    return "lo" if "lo" in names else None


def _worker(fn: Callable[..., Any], rank: int, world_size: int, args: tuple, port: int, threads: int,
            collective_timeout: float, results: Any) -> None:
    """One rank: join the group, run ``fn``, post ``(rank, ok, payload)``. The result is
    pickled here, not in the queue's feeder thread, so an unpicklable result is an error
    reported for this rank instead of a message lost on stderr."""
    torch.set_num_threads(threads)
    try:
        ifname = _loopback_interface()
        if ifname is not None:
            os.environ.setdefault("GLOO_SOCKET_IFNAME", ifname)  # gloo would otherwise resolve the hostname
        timeout = datetime.timedelta(seconds=collective_timeout)
        store = dist.TCPStore(_HOST, port, world_size, is_master=False, timeout=timeout)
        dist.init_process_group("gloo", store=store, rank=rank, world_size=world_size, timeout=timeout)
        payload = pickle.dumps(fn(rank, world_size, *args))
    except BaseException as exc:  # noqa: BLE001 - every failure goes back to the caller
        results.put((rank, False, f"{type(exc).__name__}: {exc}\n{traceback.format_exc()}"))
        return
    results.put((rank, True, payload))
    try:  # the peers may still be reading this rank's last messages: leave together
        dist.barrier()
        dist.destroy_process_group()
    except Exception:  # noqa: BLE001 - the result is already posted; a peer failed and is reported
        pass


def _check(fn: Callable[..., Any], world_size: int, timeout: float, threads: int,
           collective_timeout: float | None) -> tuple[float, float]:
    if not callable(fn):
        raise TypeError(f"fn: expected a module-level function, got {type(fn).__name__}")
    if "<locals>" in getattr(fn, "__qualname__", "") or getattr(fn, "__name__", "") == "<lambda>":
        raise TypeError(f"fn: expected a module-level function (spawned processes import it by name), "
                        f"got {fn.__qualname__}")
    for name, value in (("world_size", world_size), ("threads", threads)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"{name}: expected an int >= 1, got {value!r}")
    timeout = check_finite_number("timeout", timeout, low=0.0, low_inclusive=False)
    collective_timeout = check_finite_number("collective_timeout", collective_timeout, low=0.0,
                                             low_inclusive=False, allow_none=True)
    if collective_timeout is None:
        collective_timeout = 0.8 * timeout  # below the overall limit, so a stuck collective reports its rank
    return timeout, collective_timeout


def _describe(failures: dict[int, str], world_size: int) -> str:
    parts = [f"rank {r} of {world_size} {msg}" for r, msg in sorted(failures.items())]
    return "\n\n".join(parts)


def run_distributed(fn: Callable[..., Any], world_size: int, *args: Any, timeout: float = 120.0,
                    threads: int = 1, collective_timeout: float | None = None) -> list[Any]:
    """Run ``fn(rank, world_size, *args)`` in ``world_size`` spawned processes that share
    a gloo process group (``torch.distributed`` is initialised in each before ``fn``).

    ``fn`` must be a module-level function and ``args`` and each rank's return value
    picklable (return plain tensors, not DTensors). The processes are spawned: they
    import ``fn``'s module and the caller's main script, so a script must call this
    under ``if __name__ == "__main__":``. ``threads`` is each process's
    ``torch.set_num_threads``. ``timeout`` (seconds) bounds the whole run, start-up
    included; ``collective_timeout`` (default ``0.8 * timeout``) is the process group's
    timeout, so a collective that never completes raises in its rank.

    Returns the results in rank order. Raises :class:`DistributedError` naming the rank
    (and its traceback) when a rank raises or exits without a result, and
    :class:`DistributedTimeout` naming the unfinished ranks when ``timeout`` passes;
    every process is ended before either is raised.
    """
    timeout, collective_timeout = _check(fn, world_size, timeout, threads, collective_timeout)
    deadline = time.monotonic() + timeout
    ctx = mp.get_context("spawn")
    results = ctx.Queue()
    store = dist.TCPStore(_HOST, 0, world_size + 1, is_master=True, wait_for_workers=False,
                          timeout=datetime.timedelta(seconds=timeout))
    procs = [ctx.Process(target=_worker, daemon=True, name=f"run_distributed-rank{rank}",
                         args=(fn, rank, world_size, args, store.port, threads, collective_timeout, results))
             for rank in range(world_size)]
    try:
        for p in procs:
            p.start()
        return _collect(procs, results, world_size, timeout, deadline)
    finally:
        for p in procs:
            if p.is_alive():
                p.kill()
        for p in procs:
            p.join(5.0)
        results.close()
        del store


def _collect(procs: list, results: Any, world_size: int, timeout: float, deadline: float) -> list[Any]:
    done: dict[int, Any] = {}
    failures: dict[int, str] = {}
    first_failure: float | None = None
    dead_since: dict[int, float] = {}
    while len(done) + len(failures) < world_size:
        now = time.monotonic()
        if first_failure is not None and now - first_failure > _GRACE_S:
            break
        if now > deadline:
            waiting = [r for r in range(world_size) if r not in done and r not in failures]
            if failures:
                break
            raise DistributedTimeout(
                f"run_distributed: timed out after {timeout:g} s; rank(s) {waiting} of {world_size} "
                f"had not finished (finished: {sorted(done)})", waiting)
        try:
            rank, ok, payload = results.get(timeout=_POLL_S)
        except queue_mod.Empty:
            rank = None
        if rank is not None:
            if ok:
                done[rank] = pickle.loads(payload)
            else:
                failures[rank] = f"raised {payload}"
                first_failure = first_failure or time.monotonic()
            continue
        for rank, p in enumerate(procs):  # dead without a result: give its queued message a moment
            if rank in done or rank in failures or p.is_alive():
                continue
            dead_since.setdefault(rank, now)
            if now - dead_since[rank] > 10 * _POLL_S:
                failures[rank] = f"exited with code {p.exitcode} without a result (killed, os._exit or a crash)"
                first_failure = first_failure or now
    if failures:
        raise DistributedError("run_distributed: " + _describe(failures, world_size), sorted(failures))
    for p in procs:
        p.join(max(0.0, min(_EXIT_S, deadline - time.monotonic())))
    return [done[r] for r in range(world_size)]

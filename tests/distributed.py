"""Run a test function on world size 2 (or any) with real processes and the gloo backend."""

from __future__ import annotations

import os
import socket
import traceback
from typing import Any, Callable

import torch.distributed as dist
import torch.multiprocessing as mp


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(rank: int, world_size: int, port: int, fn: Callable, args: tuple, errors) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world_size)
    try:
        fn(rank, world_size, *args)
    except BaseException:
        errors.put(f"rank {rank}:\n{traceback.format_exc()}")
        raise
    finally:
        dist.destroy_process_group()


def run_distributed(fn: Callable[..., Any], *args: Any, world_size: int = 2) -> None:
    """Call fn(rank, world_size, *args) in `world_size` spawned processes; re-raise any failure.

    fn must be importable (module level) and args picklable. The process group is initialised
    (gloo, CPU) before fn runs and destroyed after.
    """
    ctx = mp.get_context("spawn")
    errors = ctx.SimpleQueue()
    port = free_port()
    procs = [ctx.Process(target=_worker, args=(r, world_size, port, fn, args, errors))
             for r in range(world_size)]  # fmt: skip
    for p in procs:
        p.start()
    for p in procs:
        p.join()
    failures = []
    while not errors.empty():
        failures.append(errors.get())
    if failures or any(p.exitcode != 0 for p in procs):
        codes = [p.exitcode for p in procs]
        raise AssertionError(f"distributed test failed (exit codes {codes}):\n" + "\n".join(failures))

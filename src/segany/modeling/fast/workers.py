"""Work spread over one-core worker threads, for CPU inference on busy machines.

With several threads per operation (torch's OpenMP intra-op parallelism) every operation ends when its
slowest thread does: when another process holds one of the cores, each of the many small operations of
a forward pass waits for it, and a 2-thread run became several times slower than a 1-thread one.
Independent pieces of work (prompts, rows of windows, head groups, token chunks) given to worker threads
that each run their operations on one core do not wait for each other; the results are the same.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import TypeVar

import torch

T = TypeVar("T")
R = TypeVar("R")

_POOLS: dict[int, ThreadPoolExecutor] = {}
_POOLS_LOCK = threading.Lock()
_NAME = "segany-worker"


def _one_thread() -> None:
    # OpenMP's and MKL's thread counts belong to the calling thread. torch sets a thread's count from its
    # process-wide default the first time the thread runs an operation: do that first, then set one.
    torch.get_num_threads()
    torch.set_num_threads(1)


def worker_pool(workers: int) -> ThreadPoolExecutor:
    """A lasting pool of ``workers`` threads that run torch operations on one core each."""
    with _POOLS_LOCK:
        pool = _POOLS.get(workers)
        if pool is None:
            pool = _POOLS[workers] = ThreadPoolExecutor(workers, _NAME, initializer=_one_thread)
        return pool


def available_workers(device: torch.device, max_workers: int | None = None) -> int:
    """How many one-core workers to use for CPU work: torch's thread count (1 inside a worker, and
    on other devices, where the work is queued, not computed, by the calling thread)."""
    if device.type != "cpu" or threading.current_thread().name.startswith(_NAME):
        return 1
    n = torch.get_num_threads()
    return min(n, max_workers) if max_workers else n


def _with_callers_settings(fn: Callable[..., R]) -> Callable[..., R]:
    """``fn`` run with the calling thread's autograd, inference-mode and CPU autocast settings (they are
    thread-local in torch)."""
    grad, inference = torch.is_grad_enabled(), torch.is_inference_mode_enabled()
    autocast, dtype = torch.is_autocast_enabled("cpu"), torch.get_autocast_dtype("cpu")

    def run(*args):
        with (
            torch.inference_mode(inference),
            torch.set_grad_enabled(grad),
            torch.autocast("cpu", dtype=dtype, enabled=autocast),
        ):
            return fn(*args)

    return run


def map_on_workers(
    fn: Callable[[T], R], items: Sequence[T], device: torch.device, max_workers: int | None = None
) -> list[R]:
    """``[fn(x) for x in items]``, the items shared dynamically among (at most ``max_workers``) one-core
    worker threads (in the calling thread when only one would be used).

    The caller's autograd, inference-mode and CPU autocast settings are carried into the workers;
    torch's process-wide thread count is restored afterwards (a new worker's setting writes it).
    """
    workers = min(available_workers(device, max_workers), len(items))
    if workers <= 1:
        return [fn(x) for x in items]
    threads = torch.get_num_threads()
    try:
        return list(worker_pool(workers).map(_with_callers_settings(fn), items))
    finally:
        torch.set_num_threads(threads)

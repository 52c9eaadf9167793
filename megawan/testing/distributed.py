"""Run a function on N local ranks, the way torchrun would, and collect results or failures.

The same test runs with gloo on CPU everywhere and with NCCL (one rank per GPU) when
``MEGAWAN_TEST_BACKEND=nccl`` is set on a machine with enough GPUs (see ``test_backend``).
A rank that raises fails the call with its traceback; a hang fails it after ``timeout_s``.
"""

from __future__ import annotations

import io
import os
import socket
import traceback

import torch
import torch.multiprocessing as mp


def test_backend(world_size: int) -> str:
    """'nccl' if requested via MEGAWAN_TEST_BACKEND=nccl and world_size GPUs exist, else 'gloo'."""
    want = os.environ.get("MEGAWAN_TEST_BACKEND", "gloo")
    if want == "nccl" and torch.cuda.is_available() and torch.cuda.device_count() >= world_size:
        return "nccl"
    return "gloo"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(rank, world_size, port, backend, fn, args, kwargs, queue):
    os.environ.update(
        RANK=str(rank), WORLD_SIZE=str(world_size), LOCAL_RANK=str(rank),
        MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), MEGAWAN_TEST_BACKEND=backend,
    )
    torch.set_num_threads(1)
    try:
        result = fn(*args, **kwargs)
        # Serialise to bytes: tensors sent through a Queue use shared memory that dies with this rank.
        buf = io.BytesIO()
        torch.save(result, buf)
        queue.put((rank, "ok", buf.getvalue()))
    except BaseException:  # noqa: BLE001 - report every failure to the parent
        queue.put((rank, "error", traceback.format_exc()))
    finally:
        import torch.distributed as dist

        if dist.is_initialized():
            dist.destroy_process_group()


def run_distributed(fn, world_size: int, *args, timeout_s: float = 600, **kwargs) -> list:
    """Call ``fn(*args, **kwargs)`` on ``world_size`` spawned ranks; return the per-rank results.

    ``fn`` must be importable (module level) and should call ``megawan.parallel_state.initialize``.
    """
    backend = test_backend(world_size)
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    port = _free_port()
    procs = [
        ctx.Process(target=_worker, args=(r, world_size, port, backend, fn, args, kwargs, queue), daemon=True)
        for r in range(world_size)
    ]
    for p in procs:
        p.start()
    results: dict[int, object] = {}
    errors: list[str] = []
    try:
        import queue as _q

        for _ in range(world_size):
            try:
                rank, status, payload = queue.get(timeout=timeout_s)
            except _q.Empty:
                errors.append(f"timed out after {timeout_s}s waiting for ranks "
                              f"{sorted(set(range(world_size)) - set(results))}")
                break
            if status == "ok":
                results[rank] = torch.load(io.BytesIO(payload), weights_only=False)
            else:
                errors.append(f"rank {rank} failed:\n{payload}")
                break  # the others may now block on a collective: stop them
    finally:
        for p in procs:
            p.join(timeout=5 if not errors else 0.5)
            if p.is_alive():
                p.kill()
    if errors:
        raise RuntimeError("\n".join(errors))
    return [results[r] for r in range(world_size)]

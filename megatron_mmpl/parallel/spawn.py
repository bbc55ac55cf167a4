"""Run a function in N local ranks (gloo on CPU): the harness behind every distributed test.

On CPU, ranks are forked from a forkserver that has already imported torch and megatron.core, so each rank
starts in well under a second instead of re-importing megatron (~7 s per process on 2 cores). With CUDA they
are spawned, one GPU per rank (LOCAL_RANK); `device` picks CPU ranks (CUDA hidden from them) or refuses a run
that needs more GPUs than there are.
"""

from __future__ import annotations

import contextlib
import importlib.util
import multiprocessing as mp
import os
import pickle
import queue as queue_mod
import time
import traceback

from megatron_mmpl.parallel.ports import free_port

_PRELOAD = ["torch", "megatron.core", "megatron.core.models.gpt", "transformers"]
_CTX = None


def _context():
    """forkserver with preloaded imports on CPU; plain spawn with CUDA (importing megatron initialises CUDA,
    and a CUDA context cannot cross a fork)."""
    global _CTX
    if _CTX is None:
        import torch

        if torch.cuda.is_available():  # also for CPU ranks on a GPU host: this process may already hold CUDA
            _CTX = mp.get_context("spawn")
        else:
            _CTX = mp.get_context("forkserver")
            _CTX.set_forkserver_preload([m for m in _PRELOAD if _importable(m)])
    return _CTX


def _importable(name: str) -> bool:

    try:
        return importlib.util.find_spec(name.split(".")[0]) is not None
    except ValueError:
        return False


def rank_device(world_size: int, device: str = "auto") -> str:
    """Where `world_size` ranks run: 'cuda' (one GPU each) or 'cpu' (gloo). 'auto': CUDA when there is a GPU
    for every rank, else CPU; 'cuda' with too few GPUs is refused, naming the counts."""
    import torch

    gpus = torch.cuda.device_count() if torch.cuda.is_available() else 0
    if device == "auto":
        return "cuda" if gpus >= world_size else "cpu"
    if device == "cuda" and gpus < world_size:
        raise RuntimeError(f"{world_size} ranks need {world_size} GPUs, this machine has {gpus}; "
                           "run fewer ranks or pass device='cpu' (gloo)")
    if device not in ("cuda", "cpu"):
        raise ValueError(f"device={device!r}: use 'auto', 'cuda' or 'cpu'")
    return device


def _rank_main(fn, rank, world_size, port, env, args_bytes, queue, threads):
    os.environ.update(env)
    os.environ.update(
        RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world_size), LOCAL_WORLD_SIZE=str(world_size),
        MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port),
    )
    import torch

    torch.set_num_threads(threads)
    try:
        queue.put((rank, True, pickle.dumps(fn(*pickle.loads(args_bytes)))))
    except BaseException:  # noqa: BLE001 - surfaced to the parent with its traceback
        queue.put((rank, False, traceback.format_exc()))
    finally:
        try:
            from megatron_mmpl.parallel.process_groups import destroy_parallel

            destroy_parallel()
        except Exception:  # noqa: BLE001
            pass


def run_distributed(fn, world_size: int, *args, timeout: float = 600.0, env: dict | None = None,
                    device: str | None = None) -> list:
    """Run `fn(*args)` in `world_size` ranks; return the per-rank results (rank order).

    `fn` must be importable by reference (a module-level function). A rank that raises fails the call with
    every failing rank's traceback; ranks still running at `timeout` seconds are killed. `device`: see
    `rank_device` (CPU ranks on a GPU host see no CUDA device at all, so megatron takes its CPU/gloo path);
    default: $MMPL_RANK_DEVICE, else "auto" (the test suite sets "cpu": its distributed tests are CPU fp32 checks
    on every machine, and tests/gpu asks for "cuda").
    """
    env = dict(env or {})
    if rank_device(world_size, device or os.environ.get("MMPL_RANK_DEVICE", "auto")) == "cpu":
        env["CUDA_VISIBLE_DEVICES"] = ""
    for attempt in range(_PORT_ATTEMPTS):
        try:
            return _run(fn, world_size, args, timeout, env, free_port())
        except RuntimeError as e:
            # The port was free when chosen and taken before rank 0 bound it (parallel test workers pick ports
            # too): the ranks failed at their rendezvous, so the function runs again on another port.
            if "EADDRINUSE" not in str(e) or attempt == _PORT_ATTEMPTS - 1:
                raise


_PORT_ATTEMPTS = 3


def _run(fn, world_size: int, args: tuple, timeout: float, env: dict, port: int) -> list:
    ctx = _context()
    queue = ctx.Queue()
    # Arguments and results travel as plain pickles (tensor data inline): multiprocessing's own reducer would
    # pass one file descriptor per tensor, which runs out with many tensors and dies with the sending process.
    args_bytes = pickle.dumps(args)
    # The ranks share the caller's thread budget (its torch threads: the machine's cores, or the share a test
    # runner gave this process), so parallel callers do not oversubscribe the cores.
    import torch

    threads = max(1, torch.get_num_threads() // world_size)
    procs = [
        ctx.Process(target=_rank_main, args=(fn, r, world_size, port, env, args_bytes, queue, threads))
        for r in range(world_size)
    ]
    with _environ(env):  # before the child starts: CUDA_VISIBLE_DEVICES is read at its first CUDA call
        for p in procs:
            p.start()
    results: dict[int, tuple[bool, object]] = {}

    deadline = time.monotonic() + timeout
    try:
        while len(results) < world_size:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                if any(not ok for ok, _ in results.values()):
                    break  # the failure's traceback is the useful report, not the hang it caused
                raise TimeoutError(
                    f"distributed run of {fn.__qualname__} exceeded {timeout:.0f}s; ranks finished: "
                    f"{sorted(results)}; failures so far:\n" + _failures(results)
                )
            try:
                rank, ok, payload = queue.get(timeout=min(remaining, 1.0))
                results[rank] = (ok, payload)
                if not ok:  # one failure usually leaves the others blocked in a collective: give them a moment
                    deadline = min(deadline, time.monotonic() + 20)
            except queue_mod.Empty:
                dead = [i for i, p in enumerate(procs) if p.exitcode not in (None, 0) and i not in results]
                if dead:
                    raise RuntimeError(
                        f"rank(s) {dead} of {fn.__qualname__} died with exit codes "
                        f"{[procs[i].exitcode for i in dead]} and no traceback (killed, segfault or OOM)\n"
                        + _failures(results)
                    ) from None
    finally:
        for p in procs:
            p.join(timeout=5)
            if p.is_alive():
                p.kill()
                p.join()
    if any(not ok for ok, _ in results.values()):
        raise RuntimeError(f"distributed run of {fn.__qualname__} failed:\n" + _failures(results))
    return [pickle.loads(results[r][1]) for r in range(world_size)]


@contextlib.contextmanager
def _environ(env: dict):
    """`env` set in this process while children start (spawned children inherit the environment)."""
    old = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    try:
        yield
    finally:
        for k, v in old.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def _failures(results) -> str:
    return "\n".join(f"--- rank {r} ---\n{payload}" for r, (ok, payload) in sorted(results.items()) if not ok)

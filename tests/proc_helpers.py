"""Run train_gpt.main in child processes (1 to 3 ranks) without paying torch's import each time.

Children fork from a multiprocessing forkserver that has imported torch, torch._dynamo and
train_gpt but never ran a torch op (so no OpenMP pool exists to break after fork). Each child
sets one intra-op thread, takes the torch.distributed variables torchrun would set (RANK,
WORLD_SIZE, LOCAL_RANK, MASTER_ADDR, MASTER_PORT), sends its stdout and stderr to a log file
and exits with main()'s return code.
"""

import io
import multiprocessing as mp
import os
import socket
import sys
import time

DIST_VARS = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")


def _ctx():
    ctx = mp.get_context("forkserver")
    ctx.set_forkserver_preload(["proc_helpers", "torch", "torch._dynamo", "train_gpt"])
    return ctx


def _child(argv, env, log_path, slow_disk):
    fd = os.open(log_path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
    os.dup2(fd, 1)
    os.dup2(fd, 2)
    sys.stdout = os.fdopen(1, "w", buffering=1, closefd=False)
    sys.stderr = os.fdopen(2, "w", buffering=1, closefd=False)
    for k in DIST_VARS:
        os.environ.pop(k, None)
    os.environ.update(env)
    os.environ["OMP_NUM_THREADS"] = "1"
    import torch
    torch.set_num_threads(1)
    if slow_disk:  # a slow disk: each torch.save into a file object takes slow_disk seconds, in 8 chunks
        real_save = torch.save

        def slow_save(obj, f, *a, **k):
            buf = io.BytesIO()
            real_save(obj, buf, *a, **k)
            data = buf.getvalue()
            for i in range(8):
                f.write(data[i * len(data) // 8: (i + 1) * len(data) // 8])
                f.flush()
                time.sleep(slow_disk / 8)
        torch.save = slow_save
    import train_gpt
    sys.stdout.flush()
    code = train_gpt.main(argv)
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


def start(argv, log_path, env=None, slow_disk=0.0):
    """Start one child running train_gpt.main(argv); returns the multiprocessing.Process."""
    p = _ctx().Process(target=_child, args=(list(argv), dict(env or {}), log_path, slow_disk), daemon=True)
    p.start()
    return p


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_ranks(world, argv, log_dir, argv_of_rank=None):
    """Start `world` ranks of main(argv) (world 1: no process group); returns (processes, log paths)."""
    os.makedirs(log_dir, exist_ok=True)
    port = free_port()
    procs, logs = [], []
    for r in range(world):
        env = {} if world == 1 else {"RANK": str(r), "WORLD_SIZE": str(world), "LOCAL_RANK": str(r),
                                     "LOCAL_WORLD_SIZE": str(world), "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port)}
        log = os.path.join(log_dir, f"rank{r}.log")
        if os.path.exists(log):
            os.remove(log)
        logs.append(log)
        procs.append(start(argv_of_rank(r) if argv_of_rank else argv, log, env))
    return procs, logs


def join_ranks(procs, logs, timeout=120):
    """Wait for every rank; kill them all and fail if they take longer than timeout (a hang).
    Returns (exit codes, log texts)."""
    deadline = time.monotonic() + timeout
    for p in procs:
        p.join(max(0.0, deadline - time.monotonic()))
    hung = [p for p in procs if p.exitcode is None]
    for p in hung:
        p.kill()
        p.join()
    texts = [open(f).read() if os.path.exists(f) else "" for f in logs]
    if hung:
        raise AssertionError(f"{len(hung)} of {len(procs)} ranks still running after {timeout}s (a hang):\n" + "\n".join(texts))
    return [p.exitcode for p in procs], texts


def run_ranks(world, argv, log_dir, timeout=120, argv_of_rank=None):
    """Run `world` ranks of main(argv) to the end; returns (exit codes, log texts)."""
    procs, logs = start_ranks(world, argv, log_dir, argv_of_rank)
    return join_ranks(procs, logs, timeout)

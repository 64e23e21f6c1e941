"""Shared fixtures: the repo on sys.path, the real Shakespeare shards, generated tiny shards."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
from hypothesis import settings

# Property tests draw the same examples on every run: CI is deterministic, a failure reproduces.
settings.register_profile("repo", derandomize=True, print_blob=True)
settings.load_profile("repo")

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)
torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))

from data.shards import write_shard  # noqa: E402


@pytest.fixture(scope="session")
def repo():
    return REPO


@pytest.fixture(scope="session")
def shakespeare_dir():
    """data/shakespeare_char, prepared from $SHAKESPEARE_TXT (or ../shared) if it is missing."""
    d = os.path.join(REPO, "data", "shakespeare_char")
    if not os.path.exists(os.path.join(d, "train_000000.bin")):
        src = os.environ.get("SHAKESPEARE_TXT") or os.path.join(REPO, "..", "shared", "data", "tinyshakespeare", "input.txt")
        if not os.path.isfile(src):
            pytest.fail("tiny Shakespeare shards are missing: run `make data` (or set SHAKESPEARE_TXT=/path/to/input.txt)")
        subprocess.run([sys.executable, os.path.join(REPO, "data", "shakespeare_char.py"), "--input", src], check=True)
    return d


def make_shards(root, vocab=64, n_train=20000, n_val=4000, seed=0, n_train_shards=1):
    """Write random-but-learnable token shards (a repeating pattern plus noise) under root."""
    rng = np.random.default_rng(seed)
    os.makedirs(root, exist_ok=True)

    def seq(n):
        base = np.arange(n) % vocab
        noise = rng.integers(0, vocab, n)
        return np.where(rng.random(n) < 0.2, noise, base)

    for i in range(n_train_shards):
        write_shard(os.path.join(root, f"train_{i:06d}.bin"), seq(n_train))
    write_shard(os.path.join(root, "val_000000.bin"), seq(n_val))
    return root


@pytest.fixture(scope="module")
def one_thread():
    """torch on one thread for a module whose tests start training subprocesses (no oversubscription)."""
    old = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(old)


@pytest.fixture
def tiny_shards(tmp_path):
    return make_shards(str(tmp_path / "data"))


def read_metrics(run_dir, key=None) -> list:
    """The records of run_dir/metrics.jsonl in order: all, or those with `key`. Eval records carry the
    train_loss too, so key="train_loss" gives the training lines only (those without a val_loss)."""
    with open(os.path.join(run_dir, "metrics.jsonl")) as fh:
        recs = [json.loads(line) for line in fh]
    return [r for r in recs if key is None or (key in r and (key != "train_loss" or "val_loss" not in r))]


def file_states(d):
    """{name: (bytes, mtime_ns)} of every file under d: what a refused run must leave as it was."""
    out = {}
    for root, _, names in os.walk(d):
        for n in names:
            p = os.path.join(root, n)
            with open(p, "rb") as fh:
                out[os.path.relpath(p, d)] = (fh.read(), os.stat(p).st_mtime_ns)
    return out


def tiny_args(data_dir, out_dir, **over):
    """Command-line args of a tiny fp32 CPU run on generated shards (a few seconds)."""
    cfg = dict(vocab_size=64, n_layer=2, n_head=2, d_model=32, seq_len=32, batch_tokens=256, micro_batch_tokens=128,
               num_steps=6, train_bin=os.path.join(data_dir, "train_*.bin"), val_bin=os.path.join(data_dir, "val_*.bin"),
               val_tokens=1024, eval_every=0, log_every=1, dtype="fp32", device="cpu", out_dir=out_dir,
               lr_head=0.05, momentum_warmup_steps=2)
    cfg.update(over)
    args = []
    for k, v in cfg.items():
        args += [f"--{k}", str(v)]
    return args

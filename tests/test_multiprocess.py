"""Multi-process training on CPU with gloo: 2 and 3 ranks against 1 process.

Every rank runs train_gpt.main in its own process (forked from a forkserver, see proc_helpers)
with the variables torchrun sets. --debug makes every step and every eval check that all ranks
hold bitwise identical weights (a mismatch stops every rank with an error, tested below).

Measured tolerances (tiny fp32 model, 6-10 steps, 2 CPU cores):
- 2 ranks vs 1 process (grad accumulation 1 x 2 vs 2 x 1): bitwise equal weights and losses for
  Muon and AdamW. Dividing by 2 is exact and a 2-term all-reduce sum is commutative.
- 3 ranks vs 1 process (accumulation 1 x 3 vs 3 x 1): the /3 of the gradient average and the 3-term
  sum round differently (1 ulp), and the difference grows a little per step (Newton-Schulz runs in
  fp32 under --dtype fp32; AdamW with eps 1e-10 is sign-like on tiny gradients). Measured over 6
  steps, seeds 0-3 (AdamW 0-2): |d train loss| <= 3.2e-7, |d val loss| <= 1.3e-7, per-tensor relative weight
  difference <= 2.9e-6 (Muon + soft_cap and AdamW + hard_cap alike). With one hidden matrix's
  gradient left un-averaged across ranks (blocks.1.mlp.fc) the same runs differ by >= 1.8e-5 in
  some train loss (Muon; 8e-4 AdamW), >= 5.7e-5 in the final val loss, >= 3.5e-2 in that matrix.
  The tests allow 5e-6 (loss) and 1e-4 (weights): ~15x and ~35x the noise, >= 3.6x and 350x below
  the broken gradient.
"""

import os
import re
import signal
import subprocess
import sys
import time

import pytest
import torch

import train_gpt
from conftest import REPO, make_shards, read_metrics, tiny_args
from proc_helpers import free_port, join_ranks, run_ranks, start_ranks


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return make_shards(str(tmp_path_factory.mktemp("mp") / "data"))


pytestmark = pytest.mark.usefixtures("one_thread")


def launch(world, data, out, **over):
    rcs, logs = run_ranks(world, tiny_args(data, out, **over), out + "_logs")
    assert rcs == [0] * world, "\n".join(logs)
    return logs


def train_losses(run_dir):
    return [r["train_loss"] for r in read_metrics(run_dir, "train_loss")]


def val_records(run_dir):
    return read_metrics(run_dir, "val_loss")


def weights(path):
    return train_gpt.load_checkpoint(path)["model"]


def max_diff(a, b):
    assert a.keys() == b.keys()
    return max(float((a[k] - b[k]).abs().max()) for k in a)


@pytest.fixture(scope="module")
def two_vs_one(data, tmp_path_factory):
    """One run of 1 and of 2 processes (same global batch), Muon + soft_cap, with saves."""
    root = str(tmp_path_factory.mktemp("two"))
    common = dict(num_steps=6, eval_every=2, save_every=3, keep_last=5, debug="true")
    launch(1, data, root + "/w1", **common)
    logs = launch(2, data, root + "/w2", **common)
    return root, logs


def test_two_ranks_equal_one_process(two_vs_one):
    root, logs = two_vs_one
    assert "grad_accum:1" in open(root + "/w2/log.txt").read() and "grad_accum:2" in open(root + "/w1/log.txt").read()
    assert train_losses(root + "/w2") == train_losses(root + "/w1")  # measured: bitwise equal
    assert max_diff(weights(root + "/w1/ckpt_final.pt"), weights(root + "/w2/ckpt_final.pt")) == 0.0
    for r1, r2 in zip(val_records(root + "/w1"), val_records(root + "/w2"), strict=True):
        assert r1["step"] == r2["step"] and abs(r1["val_loss"] - r2["val_loss"]) < 1e-6 and r1["val_acc"] == r2["val_acc"]
    assert "error" not in logs[1]


def test_val_metrics_count_every_rank(two_vs_one, data):
    """The 2-rank val loss is the loss over all windows, not over rank 0's half."""
    root, _ = two_vs_one
    model, cfg, _ = train_gpt.model_from_checkpoint(root + "/w2/ckpt_final.pt")
    val = train_gpt.load_val_tokens(cfg.val_bin, cfg.val_tokens, cfg.seq_len, cfg.vocab_size)
    rows = cfg.micro_batch_tokens // cfg.seq_len
    full = train_gpt.evaluate(model, val, cfg, torch.device("cpu"), torch.autocast("cpu", enabled=False), rows)
    logged = val_records(root + "/w2")[-1]
    assert abs(logged["val_loss"] - full["val_loss"]) < 1e-6 and abs(logged["val_acc"] - full["val_acc"]) < 1e-9
    # rank 0's windows alone give a different figure: the comparison above can tell them apart
    T = cfg.seq_len
    w = torch.arange(0, (val.numel() - 1) // T, 2)
    b = val[w[:, None] * T + torch.arange(T + 1)[None]]
    with torch.no_grad():
        loss0 = float(model(b[:, :-1], b[:, 1:]))
    assert abs(loss0 - full["val_loss"]) > 1e-4


def test_two_rank_checkpoint_resumes_in_one_process(two_vs_one, data):
    """The sharded optimizer state is collected from its owners: a 2-rank checkpoint resumes in
    1 process (and in 2) to the same weights as the uninterrupted run."""
    root, _ = two_vs_one
    ck = train_gpt.load_checkpoint(root + "/w2/ckpt_step000003.pt")
    entries = ck["optimizers"]["matrix"]["state"]
    assert len(entries) == 9 and all("momentum_buffer" in e for e in entries.values())  # 8 hidden + head, all owners
    launch(1, data, root + "/r1", num_steps=6, eval_every=2, resume=root + "/w2/ckpt_step000003.pt")
    assert train_losses(root + "/r1") == train_losses(root + "/w2")[3:]
    assert max_diff(weights(root + "/r1/ckpt_final.pt"), weights(root + "/w2/ckpt_final.pt")) == 0.0


def test_adamw_two_ranks_resume_exact(data, tmp_path_factory):
    """AdamW moments, step counts and power-iteration vectors (spectral_normalize) of a 2-rank
    run: resumed in 2 ranks it is bitwise exact; in 1 process within float tolerance."""
    root = str(tmp_path_factory.mktemp("adamw"))
    common = dict(num_steps=6, optimizer="adamw", constraint="spectral_normalize", head_spectral="false",
                  save_every=2, keep_last=5, debug="true")
    launch(2, data, root + "/full", **common)
    ck = train_gpt.load_checkpoint(root + "/full/ckpt_step000002.pt")
    entries = ck["optimizers"]["matrix"]["state"].values()
    assert all({"exp_avg", "exp_avg_sq", "v", "t"} <= set(e) and e["t"] == 2 for e in entries)
    launch(2, data, root + "/r2", **{**common, "resume": root + "/full/ckpt_step000002.pt"})
    assert train_losses(root + "/r2") == train_losses(root + "/full")[2:]
    assert max_diff(weights(root + "/r2/ckpt_final.pt"), weights(root + "/full/ckpt_final.pt")) == 0.0
    launch(1, data, root + "/r1", **{**common, "resume": root + "/full/ckpt_step000002.pt"})
    assert max_diff(weights(root + "/r1/ckpt_final.pt"), weights(root + "/full/ckpt_final.pt")) < 1e-4


THREE_RANK_LOSS_TOL, THREE_RANK_WEIGHT_TOL = 5e-6, 1e-4  # measured noise and mutation: see the top


@pytest.mark.parametrize("opt", [dict(), dict(optimizer="adamw", constraint="hard_cap")], ids=["muon", "adamw"])
def test_three_ranks_match_one_process(data, tmp_path_factory, opt):
    """3 ranks (a stack of 2 layers leaves rank 2 without a matrix to own) vs 1 process with
    accumulation 3, global batch 384 tokens: every train loss from step 2 on (step 1's sees only
    the zero-initialized head: log(vocab) whatever the gradients), the val losses and every
    weight agree within the measured noise described at the top; a wrong gradient average,
    owner or gather is far outside it."""
    root = str(tmp_path_factory.mktemp("three"))
    common = dict(num_steps=6, batch_tokens=384, eval_every=3, debug="true", **opt)
    launch(1, data, root + "/w1", **common)
    launch(3, data, root + "/w3", **common)
    l1, l3 = train_losses(root + "/w1"), train_losses(root + "/w3")
    assert len(l1) == len(l3) == 6
    assert max(abs(a - b) for a, b in zip(l1[1:], l3[1:])) < THREE_RANK_LOSS_TOL, (l1, l3)
    w1, w3 = weights(root + "/w1/ckpt_final.pt"), weights(root + "/w3/ckpt_final.pt")
    rel = {k: float((w1[k] - w3[k]).norm() / w1[k].norm()) for k in w1}
    assert max(rel.values()) < THREE_RANK_WEIGHT_TOL, rel
    v1, v3 = val_records(root + "/w1"), val_records(root + "/w3")
    assert [r["step"] for r in v1] == [r["step"] for r in v3] == [3, 6]
    assert max(abs(a["val_loss"] - b["val_loss"]) for a, b in zip(v1, v3)) < THREE_RANK_LOSS_TOL


def clipped_per_step(run_dir):
    """The qk_clipped:N field of each training line of log.txt (0 where the line has none)."""
    lines = [ln for ln in open(os.path.join(run_dir, "log.txt")) if ln.startswith("step:") and "train_loss:" in ln]
    return [int(m[1]) if (m := re.search(r" qk_clipped:(\d+)", ln)) else 0 for ln in lines]


def test_qk_clip_through_main_and_across_ranks(data, tmp_path, monkeypatch):
    """QK-Clip in real runs (tau 2: every head's max logit exceeds it at step 1, some later steps
    clip fewer). One process (in this process): each step scales the W_q and W_k rows of exactly
    the heads whose max logit exceeded tau by sqrt(tau / S_max), W_v untouched, and the log line
    counts them. 2 ranks all-reduce the max logits, so their weights stay identical (--debug) and
    equal the 1-process run's (accumulation 2: the max over the same two micro-batches)."""
    tau, over = 2.0, dict(qk_clip_tau=2.0, debug="true")
    real, counts = train_gpt.qk_clip, []

    def checked(model, t):
        S = [b.attn.max_logit.clone() for b in model.blocks]
        W = [b.attn.qkv.detach().clone() for b in model.blocks]
        n = real(model, t)
        for b, s, w in zip(model.blocks, S, W):
            g = torch.where(s > t, (t / s).sqrt(), torch.ones_like(s)).repeat_interleave(b.attn.head_dim)[:, None]
            torch.testing.assert_close(b.attn.qkv[:2], w[:2] * g, rtol=1e-6, atol=0)
            assert torch.equal(b.attn.qkv[2], w[2])
        counts.append(n)
        assert n == sum(int((s > t).sum()) for s in S)
        return n
    monkeypatch.setattr(train_gpt, "qk_clip", checked)
    assert train_gpt.main(tiny_args(data, str(tmp_path / "w1"), **over)) == 0
    monkeypatch.setattr(train_gpt, "qk_clip", real)
    assert len(counts) == 6 and counts[0] == 4 and min(counts) < 4, counts  # 2 layers x 2 heads at step 1
    assert clipped_per_step(str(tmp_path / "w1")) == counts
    launch(2, data, str(tmp_path / "w2"), **over)
    assert clipped_per_step(str(tmp_path / "w2")) == counts
    assert max_diff(weights(str(tmp_path / "w1/ckpt_final.pt")), weights(str(tmp_path / "w2/ckpt_final.pt"))) == 0.0


def test_error_on_one_rank_stops_every_rank(data, tmp_path):
    """A data error seen by rank 1 only (its shards are missing) stops both ranks with one
    'error:' line each: no rank waits forever in a collective."""
    out = str(tmp_path / "run")

    def argv(r):
        return tiny_args(data if r == 0 else str(tmp_path / "nowhere"), out)
    rcs, logs = run_ranks(2, None, str(tmp_path / "logs"), timeout=60, argv_of_rank=argv)
    assert rcs == [2, 2], logs
    assert "error: another rank stopped with an error" in logs[0]
    assert "error: no train shards match" in logs[1] and "nowhere" in logs[1]
    assert not os.path.exists(out)  # nothing written


def test_rank_mismatch_is_detected(data, tmp_path):
    """The --debug check can fail: rank 1's embedding learns at another rate, so its weights
    leave rank 0's at step 2 (the zero-initialized head gives the embedding no gradient at step
    1), and both ranks stop with an error naming the tensor."""
    out = str(tmp_path / "run")

    def argv(r):
        return tiny_args(data, out, debug="true", num_steps=3, seed=0) + (["--lr_embed", "0.2"] if r == 1 else [])
    rcs, logs = run_ranks(2, None, str(tmp_path / "logs"), timeout=60, argv_of_rank=argv)
    assert rcs == [2, 2], logs
    assert "error: step 2: weights are not identical across ranks" in logs[0]
    assert "embed.weight" in logs[1]


def test_sigterm_to_one_rank_stops_all_with_a_checkpoint(data, tmp_path):
    """SIGTERM to rank 0 only: the stop flag is all-reduced, both ranks save one checkpoint
    together and exit 0; --resume latest then finishes the run in 2 ranks."""
    out = str(tmp_path / "run")
    procs, logs = start_ranks(2, tiny_args(data, out, num_steps=100000, log_every=1), str(tmp_path / "logs"))
    metrics = os.path.join(out, "metrics.jsonl")
    deadline = time.monotonic() + 60
    while not (os.path.exists(metrics) and open(metrics).read().count("}\n") >= 3):
        assert all(p.is_alive() for p in procs) and time.monotonic() < deadline, [open(f).read() for f in logs]
        time.sleep(0.02)
    os.kill(procs[0].pid, signal.SIGTERM)
    rcs, texts = join_ranks(procs, logs, timeout=60)
    assert rcs == [0, 0], texts
    ckpts = train_gpt.list_checkpoints(out)
    assert len(ckpts) == 1 and "stopped by signal at step" in texts[0]
    k = train_gpt.load_checkpoint(ckpts[0])["step"]
    assert k >= 3
    launch(2, data, out, num_steps=k + 2, resume="latest", debug="true")
    assert train_gpt.load_checkpoint(os.path.join(out, "ckpt_final.pt"))["step"] == k + 2


def test_torchrun_launch(two_vs_one, data, tmp_path):
    """The real launcher: torchrun --standalone with 2 processes gives bitwise the weights of
    the same run started through the environment variables above."""
    root, _ = two_vs_one
    out = str(tmp_path / "run")
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
           os.path.join(REPO, "train_gpt.py")] + tiny_args(data, out, num_steps=6, eval_every=2, save_every=3,
                                                            keep_last=5, debug="true")
    r = subprocess.run(cmd, env=env, cwd=REPO, capture_output=True, text=True, timeout=180)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    assert max_diff(weights(out + "/ckpt_final.pt"), weights(root + "/w2/ckpt_final.pt")) == 0.0


AFTER_MAIN = """
import os, sys
sys.path.insert(0, {repo!r})
import train_gpt
rc = train_gpt.main(sys.argv[1:])
names = [open(f"/proc/self/task/{{t}}/comm").read().strip() for t in os.listdir("/proc/self/task")]
print("gloo threads after main:", sorted(n for n in names if "gloo" in n))
sys.exit(rc)
"""


@pytest.mark.skipif(not os.path.isdir("/proc/self/task"), reason="reads thread names from /proc (Linux)")
def test_main_ends_the_process_group_with_its_threads(data, tmp_path):
    """Two ranks as plain processes (not the forkserver children above, which preload torch._dynamo
    and leave through os._exit): when main returns, the process group is destroyed with its gloo
    threads. A group kept alive past destroy_process_group (torch._dynamo imported after it was
    created) leaves them running into interpreter shutdown, where one can abort the process: the
    SIGABRT a torchrun launch met under load after training had finished."""
    port, out = free_port(), str(tmp_path / "run")
    procs = []
    for r in range(2):
        env = {**os.environ, "RANK": str(r), "WORLD_SIZE": "2", "LOCAL_RANK": str(r), "LOCAL_WORLD_SIZE": "2",
               "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port), "OMP_NUM_THREADS": "1"}
        procs.append(subprocess.Popen([sys.executable, "-c", AFTER_MAIN.format(repo=REPO)] + tiny_args(data, out, num_steps=2),
                                      env=env, cwd=str(tmp_path), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True))
    texts = [p.communicate(timeout=180)[0] for p in procs]
    for p, text in zip(procs, texts):
        assert p.returncode == 0, text[-3000:]
        assert "gloo threads after main: []" in text, text[-3000:]

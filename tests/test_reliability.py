"""Reliability of the trainer: exact resume, no lost runs, clear errors.

One process on CPU in fp32 with a tiny model; most runs call train_gpt.main in this process,
the signal and kill -9 tests run it in child processes (tests/proc_helpers.py).

Measured: a run resumed at step k gives bitwise the same losses and final weights as the
uninterrupted run (tolerance 0), for Muon + soft_cap, Muon + spectral_hammer (power-iteration
vectors) and AdamW + spectral_normalize with an Adam head.
"""

import errno
import json
import os
import pickle
import random
import signal
import time

import numpy as np
import pytest
import torch

import train_gpt
from conftest import file_states, make_shards, read_metrics, tiny_args
from data import shards
from proc_helpers import start

TMP = shards.TMP_TAG


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return make_shards(str(tmp_path_factory.mktemp("rel") / "data"))


def go(capsys, data, out, **over):
    """main() in this process; returns (exit code, stderr)."""
    rc = train_gpt.main(tiny_args(data, out, **over))
    return rc, capsys.readouterr().err


def final_weights(run_dir, name="ckpt_final.pt"):
    return train_gpt.load_checkpoint(os.path.join(run_dir, name))["model"]


def same_weights(a, b):
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def losses(run_dir):
    return [(r["step"], r["train_loss"]) for r in read_metrics(run_dir, "train_loss")]


def one_error_line(err):
    lines = [ln for ln in err.strip().splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: ") and "Traceback" not in err, err
    return lines[0]


@pytest.fixture(scope="module")
def reference(data, tmp_path_factory):
    """Uninterrupted 6-step run of the default tiny config, with checkpoints at 2 and 4."""
    out = str(tmp_path_factory.mktemp("ref") / "run")
    assert train_gpt.main(tiny_args(data, out, save_every=2, keep_last=5)) == 0
    return out


# ---------------------------------------------------------------------------------------------
# Resume


RESUME_CASES = {
    "muon_soft_cap": {},
    "muon_spectral_hammer": dict(constraint="spectral_hammer"),
    "adamw_spectral_normalize_adam_head": dict(optimizer="adamw", constraint="spectral_normalize", head_spectral="false"),
}


@pytest.mark.parametrize("case", RESUME_CASES)
def test_resume_is_bitwise_exact(case, data, tmp_path, capsys):
    over = RESUME_CASES[case]
    a, b, c = (str(tmp_path / n) for n in "abc")
    assert go(capsys, data, a, **over)[0] == 0  # no checkpoints
    assert go(capsys, data, b, save_every=2, keep_last=3, **over)[0] == 0
    ck = train_gpt.load_checkpoint(os.path.join(b, "ckpt_step000002.pt"))
    assert ck["step"] == 2 and {"loader", "rng", "optimizers", "config", "checksum"} <= set(ck)
    state = ck["optimizers"]["matrix"]["state"]
    want = {"momentum_buffer"} if over.get("optimizer", "muon") == "muon" else {"exp_avg", "exp_avg_sq", "t"}
    if over.get("constraint") in train_gpt.NEEDS_POWER_ITERATION:
        want.add("v")
    assert state and all(want <= set(e) for e in state.values()), state["0"].keys()
    assert ck["optimizers"]["adam"]["state"]  # the embedding's Adam moments
    assert go(capsys, data, c, resume=os.path.join(b, "ckpt_step000002.pt"), **over)[0] == 0
    assert same_weights(final_weights(a), final_weights(b))  # saving changes nothing
    assert same_weights(final_weights(a), final_weights(c))  # resuming changes nothing
    assert losses(b) == losses(a) and losses(c) == losses(a)[2:]
    assert [r["val_loss"] for r in read_metrics(c, "val_loss")] == [r["val_loss"] for r in read_metrics(a, "val_loss")]


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_signal_saves_and_resume_latest_continues(sig, data, reference, tmp_path, capsys, monkeypatch):
    """A signal during step 3 saves ckpt_step000003.pt and exits 0; --resume latest in the same
    directory ends bitwise where the uninterrupted run ends."""
    out = str(tmp_path / "run")
    real, calls = train_gpt.project_rowwise, [0]

    def signal_during_step_3(model, cfg):
        real(model, cfg)
        calls[0] += 1
        if calls[0] == 3:
            signal.raise_signal(sig)
    monkeypatch.setattr(train_gpt, "project_rowwise", signal_during_step_3)
    rc, err = go(capsys, data, out, resume="latest")  # first launch with --resume latest: starts the run
    assert rc == 0 and err == ""
    assert [os.path.basename(p) for p in train_gpt.list_checkpoints(out)] == ["ckpt_step000003.pt"]
    assert not os.path.exists(os.path.join(out, "ckpt_final.pt"))
    assert "stopped by signal at step 3" in open(os.path.join(out, "log.txt")).read()
    monkeypatch.setattr(train_gpt, "project_rowwise", real)
    assert go(capsys, data, out, resume="latest")[0] == 0
    assert same_weights(final_weights(out), final_weights(reference))
    assert losses(out) == losses(reference)


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_signal_to_a_training_process(sig, data, tmp_path):
    """A real signal to a training process: it writes a checkpoint and exits with code 0."""
    out, log = str(tmp_path / "run"), str(tmp_path / "child.log")
    p = start(tiny_args(data, out, num_steps=100000, log_every=1), log)
    deadline = time.monotonic() + 60
    while not (os.path.exists(os.path.join(out, "metrics.jsonl")) and open(os.path.join(out, "metrics.jsonl")).read().count("}\n") >= 3):
        assert p.is_alive() and time.monotonic() < deadline, open(log).read()
        time.sleep(0.02)
    os.kill(p.pid, sig)
    p.join(30)
    assert p.exitcode == 0, open(log).read()
    text = open(log).read()
    ckpts = train_gpt.list_checkpoints(out)
    assert len(ckpts) == 1 and f"stopped by signal at step {train_gpt.step_of(ckpts[0])}" in text
    ck = train_gpt.load_checkpoint(ckpts[0])
    assert ck["step"] >= 3 and "optimizers" in ck


def test_second_sigint_exits_130_and_keeps_the_checkpoints(data, reference, tmp_path, capsys):
    """A second SIGINT while the first one's checkpoint is being written (a slow disk: each save
    takes 1 s, in 8 chunks) interrupts at once: exit code 130 and the 'interrupted twice' error
    line. The checkpoint the run resumed from is untouched, nothing half-written is listed, and
    --resume latest continues the run. (No periodic saves: the first signal's stop is the only
    write, so the second signal always lands in it, after the first was handled.)"""
    out, log = str(tmp_path / "run"), str(tmp_path / "child.log")
    os.makedirs(out)
    ck2 = os.path.join(out, "ckpt_step000002.pt")
    with open(os.path.join(reference, "ckpt_step000002.pt"), "rb") as src, open(ck2, "wb") as dst:
        dst.write(src.read())
    before = file_states(out)
    p = start(tiny_args(data, out, num_steps=100000, log_every=1, resume="latest"), log, slow_disk=1.0)
    deadline, metrics = time.monotonic() + 120, os.path.join(out, "metrics.jsonl")
    while not (os.path.exists(metrics) and open(metrics).read().count("}\n") >= 1):  # resumed and training
        assert p.is_alive() and time.monotonic() < deadline, open(log).read()
        time.sleep(0.01)
    os.kill(p.pid, signal.SIGINT)  # first: stop at the next step boundary, saving a checkpoint
    while not any(TMP in n for n in os.listdir(out)):  # that checkpoint is being written
        assert p.is_alive() and time.monotonic() < deadline, open(log).read()
        time.sleep(0.001)
    os.kill(p.pid, signal.SIGINT)  # second: now
    p.join(60)
    text = open(log).read()
    assert p.exitcode == 130, text
    assert "error: interrupted twice; the last checkpoint written is intact (resume with --resume latest)" in text
    assert "stopped by signal" not in text and not os.path.exists(os.path.join(out, "ckpt_final.pt"))
    assert train_gpt.list_checkpoints(out) == [ck2] and file_states(out)["ckpt_step000002.pt"] == before["ckpt_step000002.pt"]
    assert go(capsys, data, out, num_steps=4, resume="latest")[0] == 0
    assert train_gpt.load_checkpoint(os.path.join(out, "ckpt_final.pt"))["step"] == 4
    assert not [n for n in os.listdir(out) if TMP in n]


def test_resume_by_run_name_and_by_path(data, reference, tmp_path, capsys, monkeypatch):
    """The README's two ways to continue a run, typed in the working directory without --out_dir:
    --resume latest --run_name NAME finds logs/NAME; --resume PATH (a relative path) continues in
    PATH's directory. Both end bitwise where the uninterrupted run ends."""
    monkeypatch.chdir(tmp_path)
    real, calls = train_gpt.project_rowwise, [0]

    def signal_during_step_3(model, cfg):
        real(model, cfg)
        calls[0] += 1
        if calls[0] == 3:
            signal.raise_signal(signal.SIGTERM)
    monkeypatch.setattr(train_gpt, "project_rowwise", signal_during_step_3)
    assert go(capsys, data, "", run_name="named")[0] == 0  # stopped at step 3, in logs/named
    monkeypatch.setattr(train_gpt, "project_rowwise", real)
    assert [os.path.basename(c) for c in train_gpt.list_checkpoints(os.path.join("logs", "named"))] == ["ckpt_step000003.pt"]
    assert go(capsys, data, "", resume="latest", run_name="named")[0] == 0
    assert same_weights(final_weights(os.path.join("logs", "named")), final_weights(reference))
    assert losses(os.path.join("logs", "named")) == losses(reference)
    os.makedirs("elsewhere")
    with open(os.path.join(reference, "ckpt_step000004.pt"), "rb") as src, open(os.path.join("elsewhere", "ck.pt"), "wb") as dst:
        dst.write(src.read())
    assert go(capsys, data, "", resume=os.path.join("elsewhere", "ck.pt"))[0] == 0
    assert same_weights(final_weights("elsewhere"), final_weights(reference))
    assert losses("elsewhere") == losses(reference)[4:]
    assert os.listdir("logs") == ["named"]  # nothing written under a default run name


def test_keep_last(data, tmp_path, capsys):
    out = str(tmp_path / "run")
    assert go(capsys, data, out, num_steps=5, save_every=1, keep_last=2)[0] == 0
    assert sorted(os.listdir(out)) == ["certificate.json", "ckpt_final.pt", "ckpt_step000003.pt", "ckpt_step000004.pt",
                                       "config.json", "log.txt", "metrics.jsonl"]


def test_kill9_during_checkpoint_writes(data, tmp_path, capsys):
    """SIGKILL a training process 16 times, half of them while a checkpoint's temporary file
    exists (a slow disk: each checkpoint is written in 8 chunks over 40 ms, so kills land in
    the middle of writes), half at random moments. After every kill every listed checkpoint
    loads, the newest included; the run then resumes to the end and the stale temporary
    files are gone. (Writing straight to ckpt_step*.pt instead fails this test.)"""
    out = str(tmp_path / "run")
    args = tiny_args(data, out, num_steps=100000, save_every=1, keep_last=2, log_every=0, resume="latest")
    rng = random.Random(6)
    last_step, mid_write = -1, 0
    for i in range(16):
        log = str(tmp_path / f"child{i}.log")
        p = start(args, log, slow_disk=0.04)
        deadline = time.monotonic() + 60
        while True:
            assert p.is_alive() and time.monotonic() < deadline, open(log).read()
            names = os.listdir(out) if os.path.isdir(out) else []
            ckpts = train_gpt.list_checkpoints(out)
            newest = train_gpt.step_of(ckpts[-1]) if ckpts else -1
            if i % 2 == 0 and newest > last_step and any(n.startswith("ckpt_step") and TMP in n for n in names):
                break  # a checkpoint write is in progress: kill now
            if i % 2 == 1 and newest > last_step:
                time.sleep(rng.uniform(0.0, 0.06))  # anywhere in the next step or write
                break
            time.sleep(0.001)
        p.kill()
        p.join()
        mid_write += any(TMP in n for n in os.listdir(out))
        ckpts = train_gpt.list_checkpoints(out)
        assert 1 <= len(ckpts) <= 3  # keep_last 2, plus one if the kill fell between rename and pruning
        for path in ckpts:
            ck = train_gpt.load_checkpoint(path)
            assert "optimizers" in ck and ck["step"] == train_gpt.step_of(path)
        assert ck["step"] >= last_step
        last_step = ck["step"]
    assert mid_write >= 1  # some kills did land inside a write
    rc, _ = go(capsys, data, out, num_steps=last_step + 2, save_every=1, keep_last=2, resume="latest")
    assert rc == 0 and os.path.exists(os.path.join(out, "ckpt_final.pt"))
    assert not [n for n in os.listdir(out) if TMP in n]


def test_resume_refusals(data, reference, tmp_path, capsys):
    run = str(tmp_path / "run")
    assert go(capsys, data, run, num_steps=4, save_every=1, keep_last=5)[0] == 0
    cases = [
        (dict(out_dir=reference), "already holds a run"),
        (dict(out_dir=reference, resume="latest"), "has finished"),
        (dict(out_dir=run, resume=os.path.join(run, "ckpt_final.pt")), "holds no optimizer state"),
        (dict(out_dir=str(tmp_path / "new"), resume=os.path.join(run, "ckpt_step000003.pt"), num_steps=2),
         "past --num_steps 2"),
        (dict(out_dir=str(tmp_path / "x"), resume=str(tmp_path / "nope.pt")), "no such checkpoint"),
    ]
    before = {d: file_states(d) for d in (reference, run)}
    for over, msg in cases:
        rc, err = go(capsys, data, over.pop("out_dir"), **over)
        assert rc == 2 and msg in one_error_line(err), (over, err)
    os.remove(os.path.join(run, "ckpt_final.pt"))
    del before[run]["ckpt_final.pt"]
    rc, err = go(capsys, data, run, resume=os.path.join(run, "ckpt_step000001.pt"))
    assert rc == 2 and "holds a newer checkpoint (ckpt_step000003.pt)" in one_error_line(err)
    assert {d: file_states(d) for d in (reference, run)} == before  # refused: every file as it was (bytes, mtime)
    assert not os.path.exists(tmp_path / "new") and not os.path.exists(tmp_path / "x")


# ---------------------------------------------------------------------------------------------
# Faults


def test_nonfinite_weight_stops_with_step_tensor_and_checkpoint(data, tmp_path, capsys, monkeypatch):
    out = str(tmp_path / "run")
    real, calls = train_gpt.project_rowwise, [0]

    def poison_at_step_3(model, cfg):
        real(model, cfg)
        calls[0] += 1
        if calls[0] == 3:
            model.blocks[1].mlp.fc.data[0, 0] = float("nan")
    monkeypatch.setattr(train_gpt, "project_rowwise", poison_at_step_3)
    rc, err = go(capsys, data, out, save_every=2, keep_last=5)
    line = one_error_line(err)
    assert rc == 2 and "step 3: non-finite weight blocks.1.mlp.fc" in line
    assert f"Last good checkpoint: {os.path.join(out, 'ckpt_step000002.pt')}" in line
    assert sorted(n for n in os.listdir(out) if n.startswith("ckpt")) == ["ckpt_step000002.pt"]  # nothing else written
    ck = train_gpt.load_checkpoint(os.path.join(out, "ckpt_step000002.pt"))
    assert all(torch.isfinite(t).all() for t in ck["model"].values())


def test_nonfinite_loss_stops(data, tmp_path, capsys, monkeypatch):
    out = str(tmp_path / "run")
    real, calls = train_gpt.GPT.forward, [0]

    def nan_loss_in_step_4(self, idx, targets=None, acts=None, **kw):
        y = real(self, idx, targets, acts, **kw)
        if targets is not None:
            calls[0] += 1
            if calls[0] == 7:  # 2 micro-batches per step: step 4's first
                y = y * float("nan")
        return y
    monkeypatch.setattr(train_gpt.GPT, "forward", nan_loss_in_step_4)
    rc, err = go(capsys, data, out, save_every=3)
    line = one_error_line(err)
    assert rc == 2 and "step 4: non-finite loss" in line and "ckpt_step000003.pt" in line
    assert not os.path.exists(os.path.join(out, "ckpt_final.pt"))


def test_disk_full_keeps_the_previous_checkpoint(data, tmp_path, capsys, monkeypatch):
    out = str(tmp_path / "run")
    real, calls = torch.save, [0]

    def save_then_fill_disk(obj, f, *a, **k):
        calls[0] += 1
        if calls[0] == 2:
            f.write(b"PK\x03\x04 partial")
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return real(obj, f, *a, **k)
    monkeypatch.setattr(torch, "save", save_then_fill_disk)
    rc, err = go(capsys, data, out, save_every=2, keep_last=5)
    line = one_error_line(err)
    assert rc == 2 and "ckpt_step000004.pt: write failed" in line and "No space left on device" in line
    assert sorted(os.listdir(out)) == ["ckpt_step000002.pt", "config.json", "log.txt", "metrics.jsonl"]  # no tmp
    assert train_gpt.load_checkpoint(os.path.join(out, "ckpt_step000002.pt"))["step"] == 2


# ---------------------------------------------------------------------------------------------
# Bad input


@pytest.fixture
def no_data_or_compile(monkeypatch):
    """Reading data or compiling fails the test: config errors must come before."""
    def boom(*a, **k):
        raise AssertionError("data read or compile before the config error")
    for name in ("TrainLoader", "load_val_tokens", "read_shard", "find_shards"):
        monkeypatch.setattr(train_gpt, name, boom)
    monkeypatch.setattr(torch, "compile", boom)


CONFIG_CASES = {
    "w_max_zero": (dict(w_max="0"), "w_max must be > 0, got 0.0"),
    "w_max_negative": (dict(w_max="-1"), "w_max must be > 0"),
    "w_max_nan": (dict(w_max="nan"), "w_max must be > 0, got nan"),
    "qk_clip_nan": (dict(qk_clip_tau="nan"), "qk_clip_tau must be >= 0 and finite"),
    "constraint": (dict(constraint="spectral_magic"), "constraint='spectral_magic' is not one of"),
    "optimizer": (dict(optimizer="sgd"), "optimizer='sgd' is not one of muon, adamw"),
    "arch": (dict(arch="resnet"), "arch='resnet' is not one of lipschitz, plain_residual, baseline"),
    "wrong_type_int": (dict(n_layer="two"), "'n_layer' must be of type int, got 'two'"),
    "wrong_type_bool": (dict(debug="maybe"), "'debug' must be of type bool"),
    "batch_not_divisible": (dict(batch_tokens="320"), "batch_tokens=320 is not divisible by world_size x micro_batch_tokens = 1 x 128"),
    "micro_not_seq_multiple": (dict(micro_batch_tokens="100"), "micro_batch_tokens=100 must be a multiple of seq_len=32"),
    "soft_cap_adamw": (dict(optimizer="adamw"), "soft_cap needs a bound"),
}


@pytest.mark.parametrize("case", CONFIG_CASES)
def test_config_errors_come_before_data(case, data, tmp_path, capsys, no_data_or_compile):
    over, msg = CONFIG_CASES[case]
    rc, err = go(capsys, data, str(tmp_path / "run"), **over)
    assert rc == 2 and msg in one_error_line(err)
    assert not os.path.exists(tmp_path / "run")


@pytest.mark.parametrize("toml,msg", [
    ("n_layerz = 2\n", "unknown key 'n_layerz' (did you mean n_layer?)"),
    ("n_layer = 2.5\n", "'n_layer' must be of type int, got 2.5"),
    ("w_max = \"big\"\n", "'w_max' must be of type float"),
    ("[model]\nn_layer = 2\n", "unknown key 'model'"),
    ("w_max = 0\n", "w_max must be > 0"),
    ("n_layer = = 2\n", "not valid TOML"),
])
def test_config_file_errors(toml, msg, data, tmp_path, capsys, no_data_or_compile):
    path = tmp_path / "bad.toml"
    path.write_text(toml)
    rc = train_gpt.main(["--config", str(path), "--out_dir", str(tmp_path / "run")])
    assert rc == 2 and msg in one_error_line(capsys.readouterr().err)


def test_unknown_command_line_key(capsys):
    with pytest.raises(SystemExit) as e:
        train_gpt.main(["--n_layers", "3"])
    assert e.value.code == 2 and "error: unrecognized arguments: --n_layers 3" in capsys.readouterr().err


def test_world_size_and_rope_errors():
    cfg = train_gpt.config_from_dict(dict(batch_tokens=256, micro_batch_tokens=128, seq_len=32), "test")
    assert train_gpt.grad_accum_steps(cfg, 2) == 1
    with pytest.raises(train_gpt.ConfigError, match=r"world_size x micro_batch_tokens = 3 x 128 = 384"):
        train_gpt.grad_accum_steps(cfg, 3)
    model = train_gpt.GPT(train_gpt.config_from_dict(dict(vocab_size=64, n_layer=1, n_head=2, d_model=32, seq_len=32), "test"))
    with pytest.raises(ValueError, match=r"sequence of 33 tokens is longer than seq_len=32 \(the RoPE tables\)"):
        model(torch.zeros(1, 33, dtype=torch.long))


def test_vocab_mismatch_with_meta_json(tmp_path, capsys, no_data_or_compile):
    data = str(tmp_path / "data")
    os.makedirs(data)
    meta = os.path.join(data, "meta.json")
    with open(meta, "w") as fh:
        json.dump({"vocab_size": 100}, fh)
    rc, err = go(capsys, data, str(tmp_path / "run"))
    assert rc == 2 and f"vocab_size=64 in the config is smaller than vocab_size=100 of the data ({meta})" in one_error_line(err)
    with open(meta, "wb") as fh:
        pickle.dump({"vocab_size": 64}, fh)  # meta files are JSON only
    rc, err = go(capsys, data, str(tmp_path / "run"))
    assert rc == 2 and f"{meta}: not a readable JSON meta file" in one_error_line(err)


@pytest.mark.parametrize("change,msg", [(dict(n_layer=3), "n_layer: 2 -> 3"), (dict(seq_len=64, micro_batch_tokens=128), "seq_len: 32 -> 64"),
                                        (dict(d_model=64), "d_model: 32 -> 64"), (dict(constraint="hard_cap"), "constraint: soft_cap -> hard_cap")])
def test_resume_refuses_a_changed_architecture(change, msg, data, reference, tmp_path, capsys, no_data_or_compile):
    rc, err = go(capsys, data, str(tmp_path / "run"), resume=os.path.join(reference, "ckpt_step000002.pt"), **change)
    line = one_error_line(err)
    assert rc == 2 and "the config changes the model" in line and msg in line


def shard_bytes(tokens, magic=shards.SHARD_MAGIC, version=shards.SHARD_VERSION, n=None):
    header = np.zeros(shards.HEADER_INTS, dtype=np.int32)
    header[:3] = magic, version, len(tokens) if n is None else n
    return header.tobytes() + np.asarray(tokens, dtype=np.uint16).tobytes()


GOOD = list(np.arange(3000) % 64)
DATA_CASES = {
    "bad_magic": (dict(train=shard_bytes(GOOD, magic=1234)), "train", "bad magic 1234"),
    "wrong_version": (dict(train=shard_bytes(GOOD, version=7)), "train", "unsupported shard version 7"),
    "truncated_tokens": (dict(train=shard_bytes(GOOD)[:-10]), "train", "header says 3000 tokens"),
    "truncated_header": (dict(val=shard_bytes(GOOD)[:100]), "val", "truncated shard header (100 of 1024 bytes)"),
    "token_too_big_train": (dict(train=shard_bytes(GOOD[:1777] + [64] + GOOD[1778:])), "train", "token id 64 >= vocab_size 64"),
    "token_too_big_val": (dict(val=shard_bytes(GOOD[:900] + [65535] + GOOD[901:])), "val", "token id 65535 >= vocab_size 64"),
}


@pytest.mark.parametrize("case", DATA_CASES)
def test_data_errors_name_the_file(case, tmp_path, capsys):
    files, bad, msg = DATA_CASES[case]
    data = str(tmp_path / "data")
    os.makedirs(data)
    for kind in ("train", "val"):
        with open(os.path.join(data, f"{kind}_000000.bin"), "wb") as fh:
            fh.write(files.get(kind, shard_bytes(GOOD)))
    rc, err = go(capsys, data, str(tmp_path / "run"))
    line = one_error_line(err)
    assert rc == 2 and line.startswith(f"error: {os.path.join(data, bad + '_000000.bin')}: ") and msg in line


def test_missing_shards_name_the_pattern(tmp_path, capsys):
    rc, err = go(capsys, str(tmp_path / "nowhere"), str(tmp_path / "run"))
    assert rc == 2 and f"no train shards match '{tmp_path / 'nowhere' / 'train_*.bin'}'" in one_error_line(err)


class Evil:
    """Unpickling this runs a shell command: weights_only loading must refuse it."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


@pytest.mark.filterwarnings("ignore:Detected pickle protocol")
def test_code_running_pickles_are_refused(data, tmp_path, capsys):
    marker = tmp_path / "pwned"
    for i, dump in enumerate((lambda o, f: torch.save(o, f), lambda o, f: pickle.dump(o, open(f, "wb")))):
        path = str(tmp_path / f"evil{i}.pt")
        dump({"model": Evil(marker), "config": {}, "step": 1}, path)
        with pytest.raises(train_gpt.CheckpointError, match="not a loadable checkpoint"):
            train_gpt.load_checkpoint(path)
        with pytest.raises(train_gpt.CheckpointError):
            train_gpt.model_from_checkpoint(path)
        rc, err = go(capsys, data, str(tmp_path / "run"), resume=path)
        assert rc == 2 and path in one_error_line(err)
    assert not marker.exists()


def test_checkpoints_with_wrong_content_are_refused(reference, data, tmp_path, capsys):
    """Well-formed files whose content does not fit (edited by hand, another model): one
    'error:' line naming the file, not a traceback from load_state_dict or the optimizer."""
    good = train_gpt.load_checkpoint(os.path.join(reference, "ckpt_step000002.pt"))

    edits = {
        "missing_weight": lambda ck: ck["model"].pop("head"),
        "momentum_shape": lambda ck: ck["optimizers"]["matrix"]["state"]["0"].update(momentum_buffer=torch.zeros(5)),
        "loader_state": lambda ck: ck["loader"].update(gen=torch.zeros(3)),
        "adam_state": lambda ck: ck["optimizers"].update(adam={"state": {}, "param_groups": []}),
        "config_type": lambda ck: ck["config"].update(n_layer="two"),
        "step_negative": lambda ck: ck.update(step=-4),
    }
    for name, fn in edits.items():
        ck = pickle.loads(pickle.dumps(good))
        fn(ck)
        ck["checksum"] = train_gpt.content_checksum(ck)
        path = str(tmp_path / f"{name}.pt")
        torch.save(ck, path)
        rc, err = go(capsys, data, str(tmp_path / f"run_{name}"), resume=path)
        assert rc == 2 and path in one_error_line(err), (name, err)


def test_fuzz_random_bytes(reference, data, tmp_path, capsys):
    """Random bytes, truncations and bit flips as shards, checkpoints, TOML configs and meta
    files: each is refused with the repo's own error (naming the file) or, for a flip that
    changes nothing the loader reads, loads with unchanged content. A 60 s alarm catches hangs."""
    rng = random.Random(2025)
    good = {
        "shard": shard_bytes(GOOD[:600]),
        "ckpt": open(os.path.join(reference, "ckpt_step000002.pt"), "rb").read(),
        "toml": b"n_layer = 2\nd_model = 32\nn_head = 2\nvocab_size = 64\nw_max = 1.5\nconstraint = \"hard_cap\"\n",
        "meta": json.dumps({"vocab_size": 64, "chars": ["a", "b"]}).encode(),
    }
    ref_sum = train_gpt.content_checksum(train_gpt.load_checkpoint(os.path.join(reference, "ckpt_step000002.pt")))

    def variants(b, n):
        for _ in range(n):
            kind = rng.randrange(4)
            if kind == 0:
                yield bytes(rng.getrandbits(8) for _ in range(rng.randrange(0, 2 * len(b) if len(b) < 4096 else 4096)))
            elif kind == 1:
                yield b[: rng.randrange(len(b))]
            else:
                x = bytearray(b)
                for _ in range(rng.randint(1, 8)):
                    i = rng.randrange(len(x))
                    x[i] ^= 1 << rng.randrange(8)
                yield bytes(x)

    def check(kind, path):
        try:
            if kind == "shard":
                toks = shards.read_shard(path)
                shards.check_token_range(toks, 64, path)
                assert len(toks) == (os.path.getsize(path) - 1024) // 2
            elif kind == "ckpt":
                ck = train_gpt.load_checkpoint(path)
                assert train_gpt.content_checksum(ck) == ref_sum  # loads only if its content is intact
            elif kind == "toml":
                train_gpt.parse_config(["--config", path])
            else:
                train_gpt.check_data_meta(train_gpt.config_from_dict({"vocab_size": 64, "train_bin": os.path.join(os.path.dirname(path), "x_*.bin")}, "t"))
            return "ok"
        except (train_gpt.ConfigError, train_gpt.DataError, train_gpt.CheckpointError) as e:
            msg = str(e)
            assert "\n" not in msg.strip() or kind == "toml", msg
            assert kind == "toml" or path in msg, msg  # config *values* errors name the key instead
            return type(e).__name__

    def on_alarm(signum, frame):
        raise TimeoutError("fuzz case hung")
    old = signal.signal(signal.SIGALRM, on_alarm)
    signal.alarm(60)
    outcomes = {}
    try:
        for kind, b in good.items():
            for j, blob in enumerate(variants(b, 60)):
                d = tmp_path / f"{kind}{j}"
                d.mkdir()
                path = str(d / ("meta.json" if kind == "meta" else f"f.{kind}"))
                with open(path, "wb") as fh:
                    fh.write(blob)
                r = check(kind, path)
                outcomes[(kind, r)] = outcomes.get((kind, r), 0) + 1
        # the same through main(): one line, exit code 2 (a flip in bytes the loader skips, such as the
        # zip's alignment padding, leaves the content intact: that checkpoint resumes)
        for j, blob in enumerate(list(variants(good["ckpt"], 4)) + [os.urandom(300)]):
            path = str(tmp_path / f"resume{j}.pt")
            with open(path, "wb") as fh:
                fh.write(blob)
            intact = check("ckpt", path) == "ok"
            rc, err = go(capsys, data, str(tmp_path / f"r{j}"), resume=path)
            assert rc == 0 if intact else rc == 2 and path in one_error_line(err)
        path = str(tmp_path / "random.toml")
        with open(path, "wb") as fh:
            fh.write(bytes(rng.getrandbits(8) for _ in range(200)))
        assert train_gpt.main(["--config", path]) == 2 and path in one_error_line(capsys.readouterr().err)
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, old)
    assert outcomes.get(("ckpt", "CheckpointError"), 0) >= 40, outcomes  # most corruptions are caught
    assert outcomes.get(("shard", "DataError"), 0) >= 30, outcomes


def test_checksum_catches_flips_in_the_weights(reference, tmp_path):
    """torch.load does not check CRCs: without the content checksum, a flipped bit in a weight loads silently."""
    src = os.path.join(reference, "ckpt_step000002.pt")
    b = bytearray(open(src, "rb").read())
    ck = train_gpt.load_checkpoint(src)
    head = ck["model"]["head"].numpy().tobytes()
    i = bytes(b).find(head[64:96])  # a stretch of the head's bytes inside the zip
    assert i > 0
    b[i + 3] ^= 0x40
    path = str(tmp_path / "flipped.pt")
    open(path, "wb").write(bytes(b))
    raw = torch.load(path, weights_only=True)
    assert not torch.equal(raw["model"]["head"], ck["model"]["head"])  # torch itself does not notice
    with pytest.raises(train_gpt.CheckpointError, match="checksum mismatch"):
        train_gpt.load_checkpoint(path)

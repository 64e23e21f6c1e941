"""The trainer: config, model invariants, Muon's update norm, constraints after steps,
a short real-data run."""

import ast
import dataclasses
import math
import os
import re
import subprocess
import sys
from dataclasses import fields

import pytest
import torch

import train_gpt as tg
from conftest import REPO, file_states, read_metrics, tiny_args
from data import shards


def small_cfg(**over):
    return dataclasses.replace(tg.Config(vocab_size=50, n_layer=2, n_head=2, d_model=32, seq_len=16, device="cpu", dtype="fp32"),
                               **over)


# ---- config and CLI

def test_help_lists_every_key_with_default():
    """Each option's own help entry shows its type and the Config default (COLUMNS is wide, so
    argparse does not wrap the help; a default shown in another option's entry does not count)."""
    env = dict(os.environ, COLUMNS="100000")
    out = subprocess.run([sys.executable, os.path.join(REPO, "train_gpt.py"), "--help"], capture_output=True, text=True,
                         check=True, env=env).stdout
    entries = re.split(r"\n(?=  -)", out.split("\noptions:\n")[1])  # an option's line and its help (next line if long)
    shown = {}
    for e in entries:
        m = re.fullmatch(r"  --(\w+) (\S+)\s+.*\(default: (.*)\)", e.strip("\n"), re.S)
        if m:
            shown[m[1]] = (m[2], m[3])
    assert set(shown) == {f.name for f in fields(tg.Config)}
    for f in fields(tg.Config):
        metavar, default = shown[f.name]
        assert metavar == ("|".join(tg.choices_of(f)) or f.type.upper()), f.name  # the choices, where a field has them
        assert default == repr(f.default) and ast.literal_eval(default) == f.default, (f.name, default, f.default)


def test_command_line_beats_file_beats_default(tmp_path):
    toml = tmp_path / "c.toml"
    toml.write_text('w_max = 3\nconstraint = "hard_cap"\nn_layer = 5\n')
    cfg = tg.parse_config(["--config", str(toml), "--w_max", "2.5"])
    assert cfg.w_max == 2.5 and cfg.constraint == "hard_cap" and cfg.n_layer == 5
    assert cfg.d_model == tg.Config().d_model == 768


@pytest.mark.parametrize("text,needle", [
    ("wmax = 2\n", "unknown key 'wmax'"),
    ('n_layer = "three"\n', "'n_layer' must be of type int"),
    ("w_max = 0\n", "w_max must be > 0"),
    ('constraint = "spectral"\n', "constraint='spectral' is not one of"),
    ('optimizer = "sgd"\n', "optimizer='sgd' is not one of"),
    ('arch = "llama"\n', "arch='llama' is not one of"),
    ("micro_batch_tokens = 1000\n", "multiple of seq_len"),
    ('optimizer = "adamw"\nconstraint = "soft_cap"\n', "soft_cap needs a bound"),
    ('arch = "baseline"\n', "arch=baseline has no weight constraints"),
])
def test_config_errors_are_clear(tmp_path, text, needle):
    toml = tmp_path / "c.toml"
    toml.write_text(text)
    with pytest.raises(tg.ConfigError, match=needle.replace("(", r"\(").replace(")", r"\)")):
        tg.parse_config(["--config", str(toml)])


def test_constraint_choices_are_the_constraint_table():
    """--constraint offers exactly the methods of CONSTRAINTS: each name parses, and a method added to the
    table is a valid choice with no second list to update."""
    field = next(f for f in fields(tg.Config) if f.name == "constraint")
    assert tg.choices_of(field) == tuple(tg.CONSTRAINTS)
    for name in tg.CONSTRAINTS:
        extra = ["--wd", "0.1"] if name in ("weight_decay", "spectral_wd") else []
        assert tg.parse_config(["--constraint", name] + extra).constraint == name


def test_a_start_validates_the_config_once(tiny_shards, tmp_path, monkeypatch):
    """main: the settings in force are validated once (file and command line merged first), not per layer
    of parsing and again by the run; and a Config cannot be made invalid: construction validates."""
    calls = []
    real = tg.validate_config
    monkeypatch.setattr(tg, "validate_config", lambda cfg: (calls.append(cfg), real(cfg))[1])
    toml = tmp_path / "c.toml"
    toml.write_text('optimizer = "adamw"\n')  # invalid alone (soft_cap needs Muon), valid with the command line's constraint
    args = tiny_args(tiny_shards, str(tmp_path / "run"), constraint="hard_cap", num_steps=2, eval_every=0)
    assert tg.main(["--config", str(toml)] + args) == 0
    run_cfg = calls[0]  # the first validation is of the settings in force (later ones: the certificate reading ckpt_final.pt)
    assert (run_cfg.optimizer, run_cfg.constraint) == ("adamw", "hard_cap")
    assert sum(c is run_cfg for c in calls) == 1
    with pytest.raises(tg.ConfigError, match="soft_cap needs a bound"):
        dataclasses.replace(run_cfg, constraint="soft_cap")


def test_batch_that_does_not_divide_names_the_numbers():
    cfg = tg.Config(batch_tokens=3 * 49152)
    assert tg.grad_accum_steps(cfg, 1) == 3 and tg.grad_accum_steps(cfg, 3) == 1
    with pytest.raises(tg.ConfigError, match=r"batch_tokens=147456 is not divisible by world_size x micro_batch_tokens = 2 x 49152"):
        tg.grad_accum_steps(cfg, 2)


# ---- data format

def test_shard_round_trip(tmp_path):
    toks = torch.randint(0, 65535, (12345,)).numpy()
    p = str(tmp_path / "s.bin")
    shards.write_shard(p, toks)
    back = shards.read_shard(p)
    assert back.dtype.name == "uint16" and (back == toks).all()
    with open(p, "rb") as fh:
        header = torch.frombuffer(bytearray(fh.read(1024)), dtype=torch.int32)
    assert header[:3].tolist() == [20240520, 1, 12345]


def test_shakespeare_shards_match_the_exact_file(shakespeare_dir):
    import json
    meta = json.load(open(os.path.join(shakespeare_dir, "meta.json")))
    assert meta["vocab_size"] == 65 and meta["sha256"].startswith("86c4e6aa")
    n_train = len(shards.read_shard(os.path.join(shakespeare_dir, "train_000000.bin")))
    n_val = len(shards.read_shard(os.path.join(shakespeare_dir, "val_000000.bin")))
    assert n_train + n_val == 1115394 and n_train == int(0.9 * 1115394)


# ---- model invariants

def test_lipschitz_model_has_no_norms_and_convex_residuals(monkeypatch):
    cfg = small_cfg(n_layer=3)
    model = tg.GPT(cfg)
    assert not any(isinstance(m, (torch.nn.LayerNorm, torch.nn.RMSNorm)) for m in model.modules())
    monkeypatch.setattr(tg.F, "rms_norm", lambda *a, **k: (_ for _ in ()).throw(AssertionError("norm called")))
    idx = torch.randint(0, cfg.vocab_size, (2, cfg.seq_len))
    acts = []
    logits = model(idx, acts=acts)
    a = tg.residual_weight(3)
    assert all((b.skip, b.branch) == (1 - a, a) and a == 1 / 6 for b in model.blocks)
    # output projections are zero at init, so each sub-block only shrinks x by (1 - a)
    for i, x in enumerate(acts):
        torch.testing.assert_close(x, acts[0] * (1 - a) ** i)
    # zero head: uniform logits, loss log(vocab)
    assert torch.count_nonzero(logits) == 0
    with torch.no_grad():
        loss = model(idx, idx)
    assert abs(loss.item() - math.log(cfg.vocab_size)) < 1e-6


def test_init_norms_follow_the_paper():
    model = tg.GPT(small_cfg(w_max=2.0))
    for b in model.blocks:
        for W in list(b.attn.qkv) + [b.mlp.fc]:
            s = torch.linalg.svdvals(W.double()) / tg.rms_scale(W)
            torch.testing.assert_close(s, torch.ones_like(s), atol=1e-5, rtol=0)  # orthogonal, RMS->RMS norm 1
        assert torch.count_nonzero(b.attn.proj) == 0 and torch.count_nonzero(b.mlp.proj) == 0
    rms = model.embed.weight.pow(2).mean(-1).sqrt()
    assert rms.max() <= 1.0 + 1e-6


def test_gelu_constant_is_the_max_slope():
    x = torch.linspace(-5, 5, 200001, dtype=torch.float64, requires_grad=True)
    torch.nn.functional.gelu(x).sum().backward()
    assert abs(x.grad.max().item() - tg.GELU_MAX_SLOPE) < 1e-9
    assert abs(tg.GELU_MAX_SLOPE - 1.1289) < 1e-4


# ---- optimizer

def rms_norm_svd(W):
    return torch.linalg.matrix_norm(W.double(), ord=2) / tg.rms_scale(W)


@pytest.mark.parametrize("shape", [(64, 64), (128, 32), (32, 128)])
def test_muon_update_has_rms_to_rms_norm_lr(shape):
    torch.manual_seed(0)
    W = torch.nn.Parameter(torch.randn(*shape) * 0.1)
    W.grad = torch.randn(*shape)
    lr = 0.05
    opt = tg.MatrixOptimizer([dict(params=[W], lr=lr)], tg.Config(constraint="none", w_max=1.0, momentum=0.0))
    before = W.detach().clone()
    opt.step()
    s = torch.linalg.svdvals((W.detach() - before).double()) / tg.rms_scale(W) / lr
    assert s.max() <= opt.max_update_norm(1.0)  # the budget per unit lr that the soft-cap coupling uses
    assert s.min() >= 0.8  # orthogonalized: every direction moves by about lr


@pytest.mark.parametrize("constraint", ["spectral_normalize", "soft_cap"])
def test_norms_stay_below_w_max_after_steps(constraint):
    torch.manual_seed(1)
    params = [torch.nn.Parameter(torch.randn(3, 48, 48) * 0.01), torch.nn.Parameter(torch.zeros(96, 48)),
              torch.nn.Parameter(torch.zeros(48, 96))]
    w_max = 1.5
    opt = tg.MatrixOptimizer([dict(params=params, lr=0.2)], tg.Config(constraint=constraint, w_max=w_max, momentum=0.9))
    for step in range(25):
        for p in params:
            p.grad = torch.randn_like(p) + 0.5  # a persistent direction pushes the norm up
        opt.step()
        for p in params:
            assert rms_norm_svd(p).max() <= w_max * (1 + 2e-3), (constraint, step, p.shape)
    assert max(rms_norm_svd(p).max() for p in params) > 0.95 * w_max  # the cap was active


# ---- end to end

@pytest.mark.usefixtures("one_thread")  # training in this process: no OpenMP spinning under load
def test_tiny_run_writes_a_self_describing_run_dir(tiny_shards, tmp_path):
    """Caps that bind: the hidden matrices start at w_max 0.3 (init gain min(1, w_max)) and Muon
    pushes them up; the zero-initialized head steps 0.03 x stretch a step towards head_w_max 0.15.
    Every logged norm stays at or under its cap and the largest reach it (soft cap: within 10%)."""
    out = str(tmp_path / "run")
    caps = dict(w_max=0.3, head_w_max=0.15, lr_head=0.03, eval_every=2)
    assert tg.main(tiny_args(tiny_shards, out, **caps)) == 0
    for f in ("config.json", "log.txt", "metrics.jsonl", "ckpt_final.pt", "certificate.json"):
        assert os.path.exists(os.path.join(out, f)), f
    model, cfg, ck = tg.model_from_checkpoint(os.path.join(out, "ckpt_final.pt"))
    assert cfg.d_model == 32 and ck["step"] == 6 and (cfg.w_max, cfg.head_w_max) == (0.3, 0.15)
    evals = read_metrics(out, "norms")
    m = evals[-1]
    assert [e["step"] for e in evals] == [2, 4, 6]
    assert {"step", "train_loss", "val_loss", "val_acc", "max_act_entry", "max_act_rms", "norms"} <= set(m)
    for e in evals:
        n = e["norms"]
        hidden = [v for k, v in n.items() if k.startswith("blocks")]
        assert len(hidden) == 12 and max(hidden) <= 0.3 * (1 + 1e-5), n
        assert n["head"] <= 0.15 * (1 + 1e-5) and n["embed.max_row_rms"] <= 1.0 + 1e-6, n
    assert min(v for k, v in m["norms"].items() if k.startswith("blocks") and not k.endswith("proj")) >= 0.9 * 0.3
    assert m["norms"]["head"] >= 0.9 * 0.15 and m["norms"]["embed.max_row_rms"] >= 0.99  # the caps bind
    # the norms logged are the checkpoint's: the exact RMS->RMS norms of the final weights
    assert m["norms"]["head"] == pytest.approx(float(tg.spectral_norm_exact(model.head)) / tg.rms_scale(model.head), rel=1e-9)
    # the same run dir is never overwritten: refused with exit code 2, every file as it was
    before = file_states(out)
    assert tg.main(tiny_args(tiny_shards, out, **caps)) == 2
    assert file_states(out) == before


def test_thirty_steps_on_shakespeare_lower_the_val_loss(shakespeare_dir, tmp_path):
    out = str(tmp_path / "shake")
    args = ["--config", os.path.join(REPO, "configs", "quickstart.toml"), "--num_steps", "30", "--eval_every", "0",
            "--batch_tokens", "2048", "--micro_batch_tokens", "2048", "--val_tokens", "8192", "--dtype", "fp32",
            "--out_dir", out, "--train_bin", os.path.join(shakespeare_dir, "train_*.bin"),
            "--val_bin", os.path.join(shakespeare_dir, "val_*.bin")]
    cfg = tg.parse_config(args)
    metrics = tg.train(cfg)
    assert metrics["val_loss"] < math.log(65) - 0.5, metrics["val_loss"]  # uniform at step 0 (zero head)


def test_missing_shards_say_which_flag_to_fix(tmp_path):
    with pytest.raises(tg.DataError, match=r"no val shards match .* or fix --val_bin$"):
        tg.find_shards(str(tmp_path / "nothing_*.bin"), "val")


# ---- schedules

@pytest.mark.parametrize("num_steps,cooldown,final,expect", [
    # t = step / num_steps; flat while t < 1 - cooldown, then w = (1 - t) / cooldown and w + (1 - w) final
    (10, 0.4, 0.1, {0: 1.0, 5: 1.0, 6: 1.0, 7: 0.775, 8: 0.55, 9: 0.325, 10: 0.1}),
    (8, 0.5, 0.0, {0: 1.0, 3: 1.0, 4: 1.0, 5: 0.75, 6: 0.5, 7: 0.25}),
    (4, 1.0, 0.5, {0: 1.0, 1: 0.875, 2: 0.75, 3: 0.625}),
    (5, 0.0, 0.1, {0: 1.0, 4: 1.0}),  # no cooldown (never called at step num_steps: no step follows)
])
def test_lr_factor_by_hand(num_steps, cooldown, final, expect):
    cfg = small_cfg(num_steps=num_steps, cooldown_frac=cooldown, final_lr_frac=final)
    assert {s: tg.lr_factor(s, cfg) for s in expect} == pytest.approx(expect, abs=1e-12)


@pytest.mark.parametrize("warmup,expect", [
    (300, {0: 0.85, 30: 0.86, 150: 0.90, 299: 0.95 - 0.1 / 300, 300: 0.95, 1000: 0.95}),
    (0, {0: 0.95, 7: 0.95}),  # no warm-up
])
def test_momentum_warmup_by_hand(warmup, expect):
    cfg = small_cfg(momentum_warmup_start=0.85, momentum=0.95, momentum_warmup_steps=warmup)
    assert {s: tg.momentum_at(s, cfg) for s in expect} == pytest.approx(expect, abs=1e-12)


@pytest.mark.usefixtures("one_thread")  # training in this process: no OpenMP spinning under load
def test_the_trainer_steps_with_the_scheduled_lr_and_momentum(tiny_shards, tmp_path, monkeypatch):
    """Through main: the learning rate of every optimizer group and Muon's momentum as each step's
    optimizer sees them, and the logged lr_frac, against the schedule computed by hand."""
    seen, real = [], tg.optimizer_step

    def record(model, mat_opt, adam, cfg):
        seen.append(([g["lr"] for g in mat_opt.param_groups], [g["momentum"] for g in mat_opt.param_groups],
                     [g["lr"] for g in adam.param_groups]))
        return real(model, mat_opt, adam, cfg)
    monkeypatch.setattr(tg, "optimizer_step", record)
    out = str(tmp_path / "run")
    assert tg.main(tiny_args(tiny_shards, out, num_steps=6, cooldown_frac=0.5, final_lr_frac=0.2, momentum_warmup_steps=4,
                             momentum_warmup_start=0.85, momentum=0.95, lr_hidden=0.04, lr_head=0.02, lr_embed=0.1)) == 0
    # t = 0, 1/6, 2/6 flat; t = 3/6: w = 1; t = 4/6: w = 2/3, 2/3 + 1/3 x 0.2; t = 5/6: w = 1/3, 1/3 + 2/3 x 0.2
    frac = [1.0, 1.0, 1.0, 1.0, 11 / 15, 7 / 15]
    mom = [0.85, 0.875, 0.9, 0.925, 0.95, 0.95]
    assert len(seen) == 6
    for step, (mat_lrs, moms, adam_lrs) in enumerate(seen):
        assert mat_lrs == pytest.approx([0.04 * frac[step], 0.02 * frac[step]], abs=1e-12), step  # hidden, head
        assert moms == pytest.approx([mom[step]] * 2, abs=1e-12), step
        assert adam_lrs == pytest.approx([0.1 * frac[step]], abs=1e-12), step  # the embedding
    logged = read_metrics(out, "lr_frac")
    assert [r["lr_frac"] for r in logged] == pytest.approx(frac, abs=1e-12)

"""lipschitz_bound.py: hand-computed bounds, soundness against an empirical search, checkpoint errors."""

import json
import math
import os
import pickle
import subprocess
import sys

import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import lipschitz_bound as lb  # noqa: E402
import train_gpt as tg  # noqa: E402

SEARCH = dict(lengths=(2, 4), scales=(1e-4, 0.5), starts=6, steps=40)


def tiny_cfg(**kw):
    base = dict(vocab_size=16, n_layer=1, n_head=1, d_model=16, seq_len=16, softmax_scale=1.0, constraint="none")
    base.update(kw)
    return tg.Config(**base)


def identity_model(cfg, w=1.0, mlp=0.0):
    """q = k = v = o = w I, MLP zero (or fc, proj = mlp x [I; 0]), head = I: every norm known."""
    torch.manual_seed(0)
    m = tg.GPT(cfg)
    d = cfg.d_model
    with torch.no_grad():
        for b in m.blocks:
            for i in range(3):
                b.attn.qkv[i].copy_(torch.eye(d) * w)
            b.attn.proj.copy_(torch.eye(d) * w)
            b.mlp.fc.zero_()
            b.mlp.proj.zero_()
            b.mlp.fc[:d].copy_(torch.eye(d) * mlp)
            b.mlp.proj[:, :d].copy_(torch.eye(d) * mlp)
        m.head.copy_(torch.eye(d))
    return m


def random_model(cfg, w_max, seed):
    """Gaussian matrices rescaled to RMS->RMS norm w_max; head at norm 1."""
    g = torch.Generator().manual_seed(seed)
    m = tg.GPT(cfg)
    with torch.no_grad():
        for p in m.hidden_matrices() + [m.head]:
            cap = 1.0 if p is m.head else w_max
            for W in (p if p.dim() == 3 else [p]):
                W.copy_(torch.randn(W.shape, generator=g))
                W.mul_(cap * tg.rms_scale(W) / tg.spectral_norm_exact(W).float())
    return m


def trained_model(cfg, w_max, steps=8, seed=0):
    """A few Muon + hard-cap steps on random tokens (weights move off their init)."""
    cfg = tg.Config(**{**tg.dataclasses.asdict(cfg), "constraint": "hard_cap", "w_max": w_max, "lr_hidden": 0.2,
                       "lr_head": 0.1, "seed": seed})
    torch.manual_seed(seed)
    m = tg.GPT(cfg)
    mat, adam = tg.build_optimizers(m, cfg)
    for g in mat.param_groups + adam.param_groups:
        g["lr"] = g["base_lr"]
    for _ in range(steps):
        x = torch.randint(0, cfg.vocab_size, (4, 9))
        m(x[:, :-1], x[:, 1:]).backward()
        mat.step()
        adam.step()
        tg.project_rowwise(m, cfg)
        m.zero_grad(set_to_none=True)
    return m, cfg


def bound(m, cfg, mode="tight"):
    return lb.certify(m.state_dict(), cfg, mode)["log10_bound"]


def emp(m, r0=1.0, seed=0, **kw):
    return lb.empirical_lower_bound(m, r0, seed=seed, **{**SEARCH, **kw})["log10_empirical_lower"]


# ---- hand-computed bounds


@pytest.mark.parametrize("w,s", [(1.0, 1.0), (0.5, 2.0), (2.0, 24.0)])
def test_one_layer_one_head_by_hand(w, s):
    """alpha = 1/2; attention L = w^2 (1 + 2 s a^2 w^2) / 3 at a = 1; MLP zero; head 1."""
    cfg = tiny_cfg(softmax_scale=s)
    m = identity_model(cfg, w)
    a2 = lb.certify(m.state_dict(), cfg, "tight")["radius"] ** 2  # 1 up to the embedding rows' rounding
    assert a2 == pytest.approx(1.0, abs=1e-6)
    att = w * w * (1 + 2 * s * a2 * w * w) / 3
    expect = (0.5 + 0.5 * att) * 0.5
    for mode in ("tight", "paper"):
        assert 10 ** bound(m, cfg, mode) == pytest.approx(expect, rel=1e-8)
    code = (0.5 + 0.5 * s * w * w * (1 + 2 * a2 * w * w) / 3) * 0.5
    assert 10 ** bound(m, cfg, "paper_code") == pytest.approx(code, rel=1e-8)


def test_mlp_and_final_scale_by_hand():
    """Attention zero, MLP fc = proj = c [I; 0] (RMS->RMS norms c/2 and 2c), final_scale 3."""
    cfg = tiny_cfg(final_scale=3.0)
    m = identity_model(cfg, 0.0, mlp=1.5)
    cert = lb.certify(m.state_dict(), cfg, "all")
    prod = (1.5 / 2) * (1.5 * 2)
    assert 10 ** cert["modes"]["tight"]["log10_bound"] == pytest.approx(0.5 * (0.5 + 0.5 * prod) * 3, rel=1e-7)
    paper = 0.5 * (0.5 + 0.5 * prod / tg.GELU_MAX_SLOPE) * 3
    assert 10 ** cert["modes"]["paper"]["log10_bound"] == pytest.approx(paper, rel=1e-7)
    assert 10 ** cert["modes"]["paper_code"]["log10_bound"] == pytest.approx(paper / 3, rel=1e-7)


def test_norms_are_upper_bounds_and_match_trainer_log():
    cfg = tiny_cfg(n_layer=2, n_head=4, d_model=32, vocab_size=24)
    m = random_model(cfg, 1.7, seed=3)
    cert = lb.certify(m.state_dict(), cfg, "tight")
    logged = tg.matrix_norms(m)
    assert set(logged) == set(cert["norms"])
    for k, v in logged.items():
        assert v <= cert["norms"][k] <= v * (1 + 1e-9), k
    for name, p in m.named_parameters():  # against an independent float64 SVD
        if name.endswith("mlp.fc"):
            sv = torch.linalg.svdvals(p.double())[0].item() / tg.rms_scale(p)
            assert sv <= cert["norms"][name] <= sv * (1 + 1e-9)


def test_rope_offsets_against_explicit_rotations():
    """m_h over offsets equals sigma((R_t W_q)^T (R_s W_k)) with R built from the trainer's apply_rope,
    for several (t, s) with the same t - s; and the float64 tables match the trainer's."""
    dh, d, T = 4, 12, 9
    cos32, sin32 = tg.rope_tables(T, dh)
    cos, sin = lb.rope_tables64(T, dh)
    assert torch.allclose(cos.float(), cos32, atol=1e-6) and torch.allclose(sin.float(), sin32, atol=1e-6)
    g = torch.Generator().manual_seed(1)
    Wq, Wk = torch.randn(dh, d, generator=g, dtype=torch.float64), torch.randn(dh, d, generator=g, dtype=torch.float64)
    per = lb.qk_offset_norms(Wq, Wk, T)
    eye = torch.eye(dh, dtype=torch.float64)
    R = tg.apply_rope(eye.expand(T, dh, dh).permute(1, 0, 2).unsqueeze(2), cos, sin).squeeze(2)  # R[j, t] = R_t e_j
    for t, s in [(3, 0), (7, 4), (8, 5), (5, 5), (8, 0)]:
        Rt, Rs = R[:, t].T, R[:, s].T
        M = (Rt @ Wq).T @ (Rs @ Wk)
        assert torch.linalg.svdvals(M)[0].item() == pytest.approx(per[t - s].item(), rel=1e-10)
    assert per.max() <= torch.linalg.svdvals(Wq)[0] * torch.linalg.svdvals(Wk)[0] * (1 + 1e-12)


# ---- paper vs tight, and the paper's flaws


def test_tight_not_above_paper_with_one_head():
    for seed, w in [(0, 0.5), (1, 2.0), (2, 8.0)]:
        cfg = tiny_cfg(n_layer=2, softmax_scale=4.0)
        m = random_model(cfg, w, seed)
        c = lb.certify(m.state_dict(), cfg, "all")["modes"]
        assert c["tight"]["log10_bound"] <= c["paper"]["log10_bound_mlp_corrected"] + 1e-12
        # with the MLP constant as published the paper can only be lower by GELU_MAX_SLOPE per MLP
        assert c["paper"]["log10_bound"] >= c["paper"]["log10_bound_mlp_corrected"] - cfg.n_layer * math.log10(tg.GELU_MAX_SLOPE)


def test_multi_head_model_breaks_paper_not_tight():
    """q = k = v = o = I with 8 heads: the search beats the published bound (a head's slice holds the
    whole vector), never the tight one. With one head both hold."""
    for H, s in [(8, 4.0), (1, 4.0)]:
        cfg = tiny_cfg(n_head=H, softmax_scale=s)
        m = identity_model(cfg)
        c = lb.certify(m.state_dict(), cfg, "all")["modes"]
        e = emp(m, lengths=(4, 8), starts=8, steps=60) if H > 1 else emp(m, lengths=(2, 4), starts=4, steps=30)
        assert e <= c["tight"]["log10_bound"]
        if H == 8:
            assert e > c["paper"]["log10_bound"] + math.log10(2.0)  # more than 2x the published bound
        else:
            assert e <= c["paper"]["log10_bound"]


def test_paper_mlp_constant_is_not_an_upper_bound():
    """fc = all-ones columns on x_1, proj = e_1 rows: at gelu's steepest point the MLP Jacobian is
    |W_out||W_in| while the published formula allows |W_out||W_in| / 1.1289."""
    cfg = tiny_cfg()
    m = identity_model(cfg, 0.0)
    with torch.no_grad():
        m.blocks[0].mlp.fc.zero_()[:, 0] = 1.0
        m.blocks[0].mlp.proj.zero_()[0, :] = 0.25
    c = lb.certify(m.state_dict(), cfg, "all")["modes"]
    e = emp(m, lengths=(1, 2), scales=(1e-4,), starts=8, steps=150)
    assert c["paper"]["log10_bound"] < e <= c["tight"]["log10_bound"]


# ---- soundness over a grid, and monotonicity


GRID = [  # (kind, w_max, n_layer, n_head, softmax_scale)
    ("random", 0.5, 1, 1, 1.0), ("random", 1.0, 2, 2, 24.0), ("random", 4.0, 3, 4, 8.0), ("random", 16.0, 4, 8, 1.0),
    ("identity", 0.5, 2, 8, 24.0), ("identity", 2.0, 1, 4, 2.0), ("identity", 16.0, 1, 2, 0.5),
    ("trained", 1.0, 1, 2, 24.0), ("trained", 2.0, 2, 8, 4.0), ("trained", 8.0, 4, 1, 1.0),
]


@pytest.mark.parametrize("kind,w_max,L,H,s", GRID)
def test_empirical_never_exceeds_tight(kind, w_max, L, H, s):
    cfg = tiny_cfg(n_layer=L, n_head=H, softmax_scale=s)
    if kind == "random":
        m = random_model(cfg, w_max, seed=L * 10 + H)
    elif kind == "identity":
        m = identity_model(cfg, w_max ** 0.5, mlp=w_max ** 0.5)
    else:
        m, cfg = trained_model(cfg, w_max, seed=H)
    cert = lb.certify(m.state_dict(), cfg, "tight")
    r0 = cert["radius"]
    e = emp(m, r0=r0, seed=H)
    assert math.isfinite(cert["log10_bound"])
    assert e <= cert["log10_bound"] + 1e-9, (e, cert["log10_bound"])


def test_monotone_in_w_max():
    cfg = tiny_cfg(n_layer=3, n_head=4, softmax_scale=8.0)
    base = random_model(cfg, 1.0, seed=5)
    prev = -math.inf
    for w in (0.5, 1.0, 2.0, 4.0, 8.0, 16.0):
        m = random_model(cfg, 1.0, seed=5)
        with torch.no_grad():
            for p, q in zip(m.hidden_matrices(), base.hidden_matrices()):
                p.copy_(q * w)
        cur = bound(m, cfg)
        assert cur >= prev
        prev = cur


def test_deep_wide_bound_stays_in_log_space():
    """Bounds far beyond float range are carried as log10, and the JSON never holds inf."""
    cfg = tiny_cfg(n_layer=12, n_head=2, softmax_scale=24.0)
    m = random_model(cfg, 60.0, seed=0)
    cert = lb.certify(m.state_dict(), cfg, "all")
    assert cert["log10_bound"] > 320 and cert["bound"] is None
    assert "10^" in lb.summary_line(cert)
    json.dumps(lb._jsonable(cert), allow_nan=False)


# ---- checkpoints and the command line


def save_ckpt(m, cfg, path):
    tg.atomic_torch_save({"model": m.state_dict(), "config": tg.dataclasses.asdict(cfg), "step": 0,
                          "format_version": 1}, str(path))


def run_cli(*args):
    return subprocess.run([sys.executable, os.path.join(ROOT, "lipschitz_bound.py"), *map(str, args)],
                          capture_output=True, text=True, cwd=ROOT, timeout=300)


class Foreign:
    pass


def test_checkpoint_cli_json_and_errors(tmp_path, monkeypatch):
    cfg = tiny_cfg(n_head=2)
    m = random_model(cfg, 1.0, seed=0)
    good = tmp_path / "ckpt_final.pt"
    save_ckpt(m, cfg, good)
    calls = []
    real = torch.load
    monkeypatch.setattr(torch, "load", lambda *a, **k: calls.append(k) or real(*a, **k))
    cert = lb.certify_checkpoint(str(good))
    assert calls and all(k.get("weights_only") is True for k in calls)
    assert cert["log10_bound"] == pytest.approx(lb.certify(m.state_dict(), tg.dataclasses.asdict(cfg), "all")["log10_bound"])
    assert lb.summary_line(cert).startswith("certificate: tight ")
    monkeypatch.undo()

    r = run_cli(good, "--json", "--empirical", "--effort", "0.2")
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout)
    for k in ("mode", "bound", "log10_bound", "per_block", "norms", "empirical_lower", "log10_empirical_lower"):
        assert k in out
    assert [row["block"] for row in out["per_block"]] == ["attn 0", "mlp 0", "head"]
    assert out["log10_empirical_lower"] <= out["log10_bound"]

    truncated = tmp_path / "truncated.pt"
    truncated.write_bytes(good.read_bytes()[:200])
    corrupt = tmp_path / "corrupt.pt"
    corrupt.write_bytes(b"not a checkpoint at all" * 10)
    foreign = tmp_path / "foreign.pt"
    with open(foreign, "wb") as fh:
        pickle.dump({"model": Foreign(), "config": {}}, fh)
    wrong = tmp_path / "wrong.pt"
    torch.save({"weights": {}}, wrong)
    for path, needle in [(tmp_path / "missing.pt", "no such checkpoint"), (truncated, "not a loadable checkpoint"),
                         (corrupt, "not a loadable checkpoint"), (foreign, "not a loadable checkpoint"),
                         (wrong, "not a checkpoint of this repo")]:
        r = run_cli(path)
        assert r.returncode == 2 and needle in r.stderr and "Traceback" not in r.stderr, (path, r.stderr)
        with pytest.raises(tg.CheckpointError):
            lb.certify_checkpoint(str(path))

    sd = m.state_dict()
    del sd["blocks.0.mlp.fc"]
    with pytest.raises(lb.CertificateError, match="blocks.0.mlp.fc"):
        lb.certify(sd, cfg)
    sd = m.state_dict()
    sd["head"][0, 0] = float("nan")
    with pytest.raises(lb.CertificateError, match="non-finite"):
        lb.certify(sd, cfg)

    base = tmp_path / "baseline.pt"
    save_ckpt(tg.GPT(tiny_cfg(arch="baseline")), tiny_cfg(arch="baseline"), base)
    assert lb.certify_checkpoint(str(base))["certified"] is False
    assert "none" in lb.summary_line(lb.certify_checkpoint(str(base)))
    r = run_cli(base)
    assert r.returncode == 2 and "baseline" in r.stderr

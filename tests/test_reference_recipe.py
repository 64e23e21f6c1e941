"""The reference code's recipe as options of the one trainer: Modula step sizes, EMA momentum, the
row-normalized embedding update, the reference soft-cap coupling, the plain-residual forward pass,
the reference's validation slice, baseline dropout."""

import dataclasses
import math
import os

import pytest
import torch
import torch.nn.functional as F

import lipschitz_bound as lb
import train_gpt as tg
from conftest import read_metrics, tiny_args


def cfg_of(**over):
    return dataclasses.replace(tg.Config(vocab_size=50, n_layer=1, n_head=2, d_model=32, seq_len=16, device="cpu", dtype="fp32"),
                               **over)


# ---- Modula's masses and sensitivities

def test_modula_shares_one_layer_by_hand():
    """L = 1 (a = 1/2), blocks_mass 6 (every matrix mass 1, total mass 8), s = 2, final scale 2.
    Sensitivities: attention (1/3)(1 + 2s) = 5/3, its residual 1/2 + 5/6 = 4/3, the MLP's 1.
    embed: (1/8) / (4/3 * 1 * 1 * 2) = 3/64. Attention residual: (4/8) / (1 * 1 * 2) = 1/4, divided by
    a -> 1/2 for attention; W_o 1/2 * 1/4; (v, scores) 1/2 * 3/4 / (1/3) = 9/8: v 3/8, scores 3/4,
    q = k = 3/4 / s / 2. MLP residual: (2/8) / 2 = 1/8 -> 1/4, each matrix 1/8. head: (1/8) / 2."""
    sh = tg.modula_shares(cfg_of(lr_alloc="modula", blocks_mass=6.0, softmax_scale=2.0, final_scale=2.0))
    want = {"embed.weight": 3 / 64, "blocks.0.attn.q": 3 / 16, "blocks.0.attn.k": 3 / 16, "blocks.0.attn.v": 3 / 8,
            "blocks.0.attn.proj": 1 / 8, "blocks.0.mlp.fc": 1 / 8, "blocks.0.mlp.proj": 1 / 8, "head": 1 / 16}
    assert sh.keys() == want.keys()
    for k, v in want.items():
        assert sh[k] == pytest.approx(v, rel=1e-12), k


def test_modula_shares_plain_residual_by_hand():
    """Same model with plain residuals and no 1/3: attention sensitivity 1 + 2s = 5, residuals 6 and 2.
    embed (1/8) / (6 * 2 * 2); attention residual (4/8) / (2 * 2) = 1/8: W_o 1/32, (v, scores) 3/32:
    v 1/32, q = k = (1/16) / s / 2; MLP (2/8) / 2 = 1/8, each matrix 1/16; head 1/16."""
    sh = tg.modula_shares(cfg_of(arch="plain_residual", lr_alloc="modula", blocks_mass=6.0, softmax_scale=2.0,
                                 final_scale=2.0))
    want = {"embed.weight": 1 / 192, "blocks.0.attn.q": 1 / 64, "blocks.0.attn.k": 1 / 64, "blocks.0.attn.v": 1 / 32,
            "blocks.0.attn.proj": 1 / 32, "blocks.0.mlp.fc": 1 / 16, "blocks.0.mlp.proj": 1 / 16, "head": 1 / 16}
    for k, v in want.items():
        assert sh[k] == pytest.approx(v, rel=1e-12), k


# Measured on the reference code itself (Arongil/lipschitz-transformers at 158692e, the notebook's
# Shakespeare GPT: 3 blocks, blocks_mass 16, softmax and final scale 1; and at aec5357, where Mul's
# sensitivity is 1, blocks_mass 32): the multiplier of lr in each atom's dualized update.
REFERENCE_SHARES = {
    ("lipschitz", 16.0): {"embed.weight": 1 / 18, "head": 1 / 18, "blocks.0.attn.q": 8 / 9, "blocks.2.attn.v": 8 / 9,
                          "blocks.1.attn.proj": 8 / 27, "blocks.0.mlp.fc": 8 / 27, "blocks.2.mlp.proj": 8 / 27},
    ("plain_residual", 32.0): {"embed.weight": 1 / 34 / 512, "head": 1 / 34, "blocks.2.mlp.proj": 16 / 17 / 18,
                               "blocks.2.attn.q": 16 / 17 / 36, "blocks.0.attn.q": 16 / 17 / 36 / 64,
                               "blocks.0.mlp.fc": 16 / 17 / 18 / 64},
}


@pytest.mark.parametrize("arch,mass", REFERENCE_SHARES)
def test_modula_shares_match_the_reference_code(arch, mass):
    sh = tg.modula_shares(cfg_of(arch=arch, lr_alloc="modula", blocks_mass=mass, n_layer=3, softmax_scale=1.0,
                                 final_scale=1.0))
    for k, v in REFERENCE_SHARES[(arch, mass)].items():
        assert sh[k] == pytest.approx(v, rel=1e-9), k


def test_modula_output_change_budget_is_one():
    """Modula's invariant: with every part stepping at its share, the first-order bound on the output's
    change (each part's share times the sensitivities after it) adds up to the budget, 1."""
    def change(n, sh):
        if n[0] == "atom":
            return sh[n[1]]
        if n[0] == "scale":
            return 0.0
        if n[0] == "par":
            return sum(change(c, sh) for c in n[1])
        return sum(change(c, sh) * math.prod(tg._sensitivity(d) for d in n[1][i + 1:]) for i, c in enumerate(n[1]))
    for arch in ("lipschitz", "plain_residual"):
        cfg = cfg_of(arch=arch, lr_alloc="modula", n_layer=3, blocks_mass=7.0, softmax_scale=3.0, final_scale=0.5)
        assert change(tg.modula_tree(cfg), tg.modula_shares(cfg)) == pytest.approx(1.0, rel=1e-12)


def _one_step(cfg, seed=0):
    torch.manual_seed(seed)
    model = tg.GPT(cfg)
    for W in [b.attn.proj for b in model.blocks] + [b.mlp.proj for b in model.blocks] + [model.head]:
        W.data.normal_()  # non-zero outputs, so every matrix gets a gradient
    before = {k: v.detach().clone() for k, v in model.named_parameters()}
    mat, adam = tg.build_optimizers(model, cfg)
    for g in mat.param_groups:
        g["momentum"] = cfg.momentum
    idx = torch.randint(0, cfg.vocab_size, (4, cfg.seq_len))
    model(idx[:, :-1], idx[:, 1:]).backward()
    grads = {k: v.grad.detach().clone() for k, v in model.named_parameters()}
    tg.optimizer_step(model, mat, adam, cfg)
    return model, before, grads


def test_one_modula_step_moves_each_matrix_by_lr_times_its_share():
    """RMS->RMS norm of every matrix's update (float64 SVD) = lr x share; converged fp32 Newton-Schulz."""
    cfg = cfg_of(lr_alloc="modula", n_layer=2, blocks_mass=5.0, softmax_scale=2.0, final_scale=1.5, constraint="none",
                 lr_hidden=0.01, lr_head=0.01, lr_embed=0.01, embed_update="rownorm", emb_w_max=1e6,
                 momentum=0.0, nesterov=False, ns_steps=12)
    model, before, grads = _one_step(cfg)
    sh = tg.modula_shares(cfg)
    seen = 0
    for name, p in model.named_parameters():
        d = (p.detach() - before[name]).double()
        mats = {name[:-3] + n: d[i] for i, n in enumerate("qkv")} if name.endswith("qkv") else {name: d}
        for key, D in mats.items():
            if key == "embed.weight":  # each row moved by RMS lr x share x min(1, 16 RMS(its gradient row))
                g_rms = grads[name].double().pow(2).mean(-1).sqrt()
                want = 0.01 * sh[key] * torch.clamp(16 * g_rms, max=1.0)
                assert int((want > 0).sum()) > 5 and (want < want.max()).any()  # some rows at the inflation cap
                assert torch.allclose(D.pow(2).mean(-1).sqrt(), want, rtol=1e-3, atol=1e-9)
            else:
                norm = torch.linalg.svdvals(D)[0] / tg.rms_scale(D)
                assert float(norm) == pytest.approx(0.01 * sh[key], rel=2e-2), key
            seen += 1
    assert seen == 2 * 6 + 2


def test_ema_momentum_orthogonalizes_the_buffer_not_the_lookahead():
    W = torch.nn.Parameter(torch.zeros(8, 12))
    g1, g2 = torch.randn(8, 12), torch.randn(8, 12)
    mu, lr = 0.9, 0.1
    for nesterov in (False, True):
        W.data.zero_()
        opt = tg.MatrixOptimizer([dict(params=[W], lr=lr)],
                                 tg.Config(constraint="none", w_max=1.0, momentum=mu, nesterov=nesterov, dtype="fp32"))
        for g in (g1, g2):
            W.grad = g.clone()
            opt.step()
        buf1, buf2 = (1 - mu) * g1, mu * (1 - mu) * g1 + (1 - mu) * g2
        look = [(1 - mu) * g1 + mu * buf1, (1 - mu) * g2 + mu * buf2]
        used = look if nesterov else [buf1, buf2]
        want = -lr * tg.rms_scale(W) * sum(tg.msign(m, 5, torch.float32) for m in used)
        assert torch.allclose(W.detach(), want, atol=1e-6), nesterov


def test_normalize_rows():
    G = torch.tensor([[3.0, 4.0], [0.0, 0.0], [1e-3, 0.0], [0.3, 0.4]])
    out = tg.normalize_rows(G, 16.0)
    rms = out.pow(2).mean(-1).sqrt()
    assert rms[0] == pytest.approx(1.0) and rms[3] == pytest.approx(1.0)  # to RMS 1
    assert torch.equal(out[1], torch.zeros(2))                             # absent tokens stay put
    assert torch.allclose(out[2], G[2] * 16)                               # inflation capped at 16


def test_rownorm_embedding_leaves_unseen_tokens_and_caps_rows():
    cfg = cfg_of(embed_update="rownorm", lr_embed=5.0, emb_w_max=1.0, constraint="none", momentum=0.0)
    torch.manual_seed(0)
    model = tg.GPT(cfg)
    with torch.no_grad():
        model.head.normal_()  # a zero head passes no gradient to the embedding
    before = model.embed.weight.detach().clone()
    mat, adam = tg.build_optimizers(model, cfg)
    assert adam is None  # the head is spectral and the embedding is Modula's: nothing left for Adam
    idx = torch.randint(0, 10, (2, cfg.seq_len))  # tokens 0..9 only
    model(idx[:, :-1], idx[:, 1:]).backward()
    tg.optimizer_step(model, mat, adam, cfg)
    E = model.embed.weight.detach()
    assert torch.equal(E[10:], before[10:])
    assert not torch.equal(E[:10], before[:10])
    assert float(E.pow(2).mean(-1).sqrt().max()) <= 1.0 + 1e-6


def test_reference_coupling_is_the_reference_codes():
    W = torch.nn.Parameter(torch.zeros(4, 4))
    exact = tg.MatrixOptimizer([W], tg.Config(constraint="soft_cap", w_max=2.0))
    ref = tg.MatrixOptimizer([W], tg.Config(constraint="soft_cap", w_max=2.0, soft_cap_coupling="reference"))
    assert exact.max_update_norm(0.1, 2.0) == pytest.approx(0.1 * tg.ns_max_stretch(5) * (1 + tg.BF16_NS_MARGIN))
    assert ref.max_update_norm(0.1, 2.0) == pytest.approx(0.05) and ref.max_update_norm(0.1, 0.5) == pytest.approx(0.2)


def test_soft_cap_with_one_alpha_per_matrix_equals_each_alone():
    torch.manual_seed(0)
    M = torch.randn(3, 6, 10) * 0.4
    mun = torch.tensor([0.01, 0.05, 0.2])[:, None, None]
    stacked = tg.constraint_args("soft_cap", M, 1.0, 0.0, 0.0, None, 0, mun)
    out = tg.c_soft_cap(M, stacked)
    for i in range(3):
        alone = tg.c_soft_cap(M[i:i + 1], tg.constraint_args("soft_cap", M[i:i + 1], 1.0, 0.0, 0.0, None, 0, float(mun[i])))
        assert torch.allclose(out[i:i + 1], alone, atol=1e-6)


# ---- forward passes

def test_plain_residual_block_is_x_plus_f():
    cfg = cfg_of(arch="plain_residual")
    torch.manual_seed(0)
    model = tg.GPT(cfg)
    blk = model.blocks[0]
    blk.attn.proj.data.normal_()
    blk.mlp.proj.data.normal_()
    x = torch.randn(2, 8, cfg.d_model)
    cos, sin = model.rope_cos, model.rope_sin
    h = x + blk.attn(x, cos, sin)
    assert torch.allclose(blk(x, cos, sin), h + blk.mlp(h), atol=1e-6)
    assert blk.attn.out_factor == 1.0 and tg.residual_coeffs(cfg) == (1.0, 1.0)
    assert tg.residual_coeffs(cfg_of(n_layer=2)) == (0.75, 0.25) and tg.attn_out_factor(cfg_of()) == tg.ATTN_OUT_FACTOR


def test_certificate_covers_plain_residual():
    """The tight bound with skip = branch = 1 holds against the empirical search (and a convex-residual
    certificate of the same weights would be far below it, so the arch is really read)."""
    cfg = cfg_of(arch="plain_residual", n_layer=2, n_head=2, d_model=16, seq_len=8, vocab_size=20, w_max=1.5)
    torch.manual_seed(1)
    model = tg.GPT(cfg)
    with torch.no_grad():  # every matrix orthogonal at RMS->RMS norm 1
        for W in [w for p in model.hidden_matrices() + [model.head] for w in (p if p.dim() == 3 else [p])]:
            torch.nn.init.orthogonal_(W)
            W.mul_(tg.rms_scale(W))
    sd = model.state_dict()
    cert = lb.certify(sd, cfg, mode="tight", empirical=True, effort=1.0)
    assert cert["empirical_lower"] <= 10 ** cert["log10_bound"]
    convex = lb.certify(sd, cfg_of(n_layer=2, n_head=2, d_model=16, seq_len=8, vocab_size=20, w_max=1.5), mode="tight")
    assert convex["log10_bound"] < cert["log10_bound"] - 0.5
    assert cert["empirical_lower"] > 10 ** convex["log10_bound"]  # the convex formula would be wrong here


def test_baseline_dropout_only_while_training():
    cfg = cfg_of(arch="baseline", constraint="none", dropout=0.5)
    torch.manual_seed(0)
    model = tg.GPT(cfg)
    with torch.no_grad():
        model.head.normal_()
    idx = torch.randint(0, cfg.vocab_size, (2, 8))
    model.eval()
    assert torch.equal(model(idx), model(idx))
    model.train()
    assert not torch.equal(model(idx), model(idx))


# ---- the reference's validation slice

def test_val_slice_scores_stride_one_windows(tiny_shards, tmp_path):
    cfg = cfg_of(vocab_size=64, seq_len=32, val_bin=os.path.join(tiny_shards, "val_*.bin"), val_slice_windows=40)
    torch.manual_seed(0)
    model = tg.GPT(cfg)
    with torch.no_grad():
        model.head.normal_()
    toks = tg.load_val_slice(cfg)
    assert toks.numel() == 40 + 32
    got = tg.evaluate(model, toks, cfg, torch.device("cpu"), torch.autocast("cpu", enabled=False), 7, torch.arange(40))
    model.eval()
    with torch.no_grad():
        losses = [F.cross_entropy(model(toks[i:i + 32][None]).view(32, -1), toks[i + 1:i + 33], reduction="sum") for i in range(40)]
    assert got["val_loss"] == pytest.approx(float(sum(losses)) / (40 * 32), rel=1e-6)


def test_val_slice_longer_than_the_split_is_refused(tiny_shards):
    cfg = cfg_of(vocab_size=64, seq_len=32, val_bin=os.path.join(tiny_shards, "val_*.bin"), val_slice_windows=10 ** 6)
    with pytest.raises(tg.DataError, match="val_slice_windows=1000000"):
        tg.load_val_slice(cfg)


@pytest.mark.parametrize("over,needle", [
    (dict(dropout=0.2), "dropout=0.2 is for arch=baseline only"),
    (dict(arch="baseline", constraint="none", dropout=1.0), "dropout must be in"),
    (dict(arch="baseline", constraint="none", lr_alloc="modula"), "lr_alloc=modula derives"),
    (dict(optimizer="adamw", constraint="none", embed_update="rownorm"), "embed_update=rownorm"),
    (dict(embed_update="rownorm", embed_max_inflation=0.5), "embed_max_inflation must be >= 1"),
    (dict(constraint="hard_cap", soft_cap_coupling="reference"), "soft_cap_coupling=reference is only used"),
    (dict(blocks_mass=0.0), "blocks_mass must be > 0"),
    (dict(val_slice_windows=-1), "val_slice_windows must be >= 0"),
])
def test_recipe_config_errors(over, needle):
    with pytest.raises(tg.ConfigError, match=needle):
        cfg_of(**over)


def test_reference_configs_train_and_score_both_protocols(tiny_shards, tmp_path, repo):
    """Both reference configs run end to end (on tiny shards) and log the slice next to the split."""
    import json
    for name in ("shakespeare_reference", "shakespeare_reference_sweep"):
        out = str(tmp_path / name)
        args = ["--config", os.path.join(repo, "configs", "paper", f"{name}.toml")] + tiny_args(
            tiny_shards, out, val_slice_windows=16, eval_every=3, num_steps=6, ns_steps=6)
        assert tg.main(args) == 0
        rec = read_metrics(out, "val_loss")
        assert [r["step"] for r in rec] == [3, 6] and all(math.isfinite(r["slice_val_loss"]) for r in rec)
        cfg = json.load(open(os.path.join(out, "config.json")))
        assert cfg["lr_alloc"] == "modula" and cfg["embed_update"] == "rownorm" and not cfg["nesterov"]

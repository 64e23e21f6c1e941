"""arch = "speedrun": the modded-nanogpt record of 2025-02-01 in the one trainer (issue 22).

The forward pass against a second implementation written here from the record's description
(float64, functional: its own RoPE as a complex rotation, attention from explicit scores under a
mask built token by token, the U-net as a stack); the optimizer groups and one Muon step against
float64 arithmetic; the config and its errors; a tiny run that resumes bitwise. The side-by-side
with the record's own script (run outside the repo) is on docs/results/nanogpt.md.
"""

import math
import os

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import train_gpt as tg
from conftest import read_metrics
from test_nanogpt_pipeline import DOC, doc_shards, pipeline_args  # noqa: F401 (fixture)

pytestmark = [pytest.mark.usefixtures("one_thread"),
              pytest.mark.filterwarnings("ignore:flex_attention called without torch.compile")]


def tiny_cfg(**over):
    d = dict(arch="speedrun", constraint="none", head_spectral=False, vocab_size=64, n_layer=8, n_head=2, d_model=32,
             seq_len=384, micro_batch_tokens=384, batch_tokens=384, num_steps=10, doc_token=DOC, window_schedule="reference",
             layer_pattern="LSSLSSSL", rope="half_truncated", ns_coeffs="speedrun", muon_scale="speedrun", dtype="fp32")
    d.update(over)
    return tg.config_from_dict(d, "test")


def scrambled_model(cfg, seed=0):
    """A SpeedrunGPT whose every parameter is random and nonzero (zero-initialized projections, head and
    mixing weights included), so that no piece of the forward pass can hide behind a zero."""
    torch.manual_seed(seed)
    m = tg.make_model(cfg)
    with torch.no_grad():
        for name, p in m.named_parameters():
            if p.ndim < 2:
                p.uniform_(0.3, 1.2)
            elif name == "head":
                p.normal_(0, 0.5)
            elif p.abs().max() == 0:
                p.normal_(0, 1 / math.sqrt(p.size(-1)))
    return m


def record_forward(sd, idx, tgt, cfg, window):
    """The record's forward pass for one sequence idx (T,), float64, from its description: (loss, logits)."""
    P = {k: v.double() for k, v in sd.items()}
    L, H, d = cfg.n_layer, cfg.n_head, cfg.d_model
    hd, T = d // H, len(idx)

    def norm(x):
        return x / torch.sqrt(x.pow(2).mean(-1, keepdim=True) + torch.finfo(torch.float32).eps)

    freq = torch.cat([(1 / 1024) ** torch.linspace(0, 1, hd // 4, dtype=torch.float64), torch.zeros(hd // 4, dtype=torch.float64)])
    rot = torch.exp(-1j * torch.arange(T, dtype=torch.float64)[:, None] * freq[None])   # (T, hd / 2)

    def rope(x):  # pairs (x_i, x_{i + hd/2}) as x_i + i x_{i + hd/2}, turned by -theta
        z = torch.complex(x[:, :hd // 2], x[:, hd // 2:]) * rot
        return torch.cat([z.real, z.imag], -1)

    doc, docs = 0, []
    for t in idx.tolist():
        doc += t == cfg.doc_token
        docs.append(doc)
    pattern = cfg.layer_pattern
    masks = {}
    for w in {window, max(1, window // 2)}:
        m = torch.zeros(T, T, dtype=torch.bool)
        for t in range(T):
            for s in range(t + 1):
                m[t, s] = docs[s] == docs[t] and t // 128 - s // 128 < w
        masks[w] = m
    emb = lambda name: P[name][idx]
    x = x0 = norm(emb("embed.weight"))
    ves = [emb(f"value_embeds.{j}.weight") for j in range(3)]
    stack = []
    for i in range(L):
        if i >= L // 2:
            x = x + P["skip_weights"][i - L // 2] * stack.pop()
        lam = P[f"blocks.{i}.lambdas"]
        x = lam[0] * x + lam[1] * x0
        if i != 7:
            a = f"blocks.{i}.attn."
            h = norm(x)
            q, k, v = (h @ P[a + "qkv"][n].T for n in range(3))
            ve = ves[i] if i < 3 else ves[i - (L - 3)] if i >= L - 3 else None
            v = P[a + "lambdas"][0] * v + (P[a + "lambdas"][1] * ve if ve is not None else 0)
            mask = masks[window if pattern[i] == "L" else max(1, window // 2)]
            heads = []
            for hh in range(H):
                sl = slice(hh * hd, (hh + 1) * hd)
                scores = 0.12 * rope(norm(q[:, sl])) @ rope(norm(k[:, sl])).T
                heads.append(scores.masked_fill(~mask, -math.inf).softmax(-1) @ v[:, sl])
            x = x + torch.cat(heads, -1) @ P[a + "proj"].T
        f = f"blocks.{i}.mlp."
        x = x + torch.relu(norm(x) @ P[f + "fc"].T).pow(2) @ P[f + "proj"].T
        if i < L // 2:
            stack.append(x)
    logits = 30 * torch.sigmoid((norm(x) @ P["head"].T) / 7.5)
    return F.cross_entropy(logits, tgt), logits


@pytest.mark.parametrize("step", [0, 1, 10])  # windows of 1, 2 and 14 blocks over 3 blocks of tokens
def test_forward_is_the_records(step):
    cfg = tiny_cfg()
    m = scrambled_model(cfg)
    rng = np.random.default_rng(step)
    toks = torch.from_numpy(np.r_[DOC, rng.integers(0, 64, 384)]).long()
    toks[rng.choice(np.arange(1, 385), 3, replace=False)] = DOC   # four documents
    idx, tgt = toks[:-1], toks[1:]
    want, want_logits = record_forward(m.state_dict(), idx, tgt, cfg, tg.window_blocks(step, cfg))
    for train in (True, False):
        m.train(train)
        with torch.no_grad():
            got = float(m(idx[None], tgt[None], step=step))
            logits = m.logits(m.features(idx[None], step=step))[0]
        assert got == pytest.approx(float(want), abs=1e-5), (train, got, float(want))
        assert (logits.double() - want_logits).abs().max() < 1e-4
    assert want_logits.std() > 1 and abs(float(want) - math.log(64)) > 0.5  # scrambled weights: far from uniform


def test_architecture_pieces():
    cfg = tiny_cfg(n_layer=12, layer_pattern="LSSSLSSLSSSL")
    m = tg.make_model(cfg)
    assert isinstance(m, tg.SpeedrunGPT)
    assert [b.attn is None for b in m.blocks] == [i == 7 for i in range(12)]
    assert tg.value_embedding_layers(12) == [0, 1, 2] + [None] * 6 + [0, 1, 2]
    assert m.skip_weights.shape == (6,) and bool((m.skip_weights == 1).all())
    assert torch.equal(m.head, torch.zeros_like(m.head))
    fc = m.blocks[0].mlp.fc  # uniform of std 0.5 / sqrt(d_in): bound sqrt(3) x that
    bound = math.sqrt(3) * 0.5 / math.sqrt(32)
    assert float(fc.abs().max()) <= bound and float(fc.abs().max()) > 0.9 * bound
    assert float(fc.std()) == pytest.approx(0.5 / math.sqrt(32), rel=0.1)
    z = torch.linspace(-80, 80, 101)  # the record's 30 sigmoid(z / 7.5) is 15 tanh(z / 15) + 15
    assert torch.allclose(30 * torch.sigmoid(z / 7.5), 15 * torch.tanh(z / 15) + 15, atol=1e-5)


def test_optimizer_groups_and_one_muon_step():
    cfg = tiny_cfg(lr_hidden=0.05, lr_head=0.008, lr_embed=0.6, lr_scalar=0.04)
    m = scrambled_model(cfg)
    mat, adam = tg.build_optimizers(m, cfg)
    muon = [p for g in mat.param_groups for p in g["params"]]
    assert {id(p) for p in muon} == {id(p) for b in m.blocks for p in
                                      ([b.attn.qkv, b.attn.proj] if b.attn is not None else []) + [b.mlp.fc, b.mlp.proj]}
    lr_of = {id(p): g["lr"] for g in adam.param_groups for p in g["params"]}
    named = dict(m.named_parameters())
    assert len(lr_of) + len(muon) == len(named)  # every parameter in exactly one optimizer
    for name, p in named.items():
        want = None if id(p) in {id(q) for q in muon} else (0.008 if name == "head" else 0.6 if "embed" in name else 0.04)
        assert lr_of.get(id(p)) == want, name
    # one Muon step at step 0 (momentum 0.85, Nesterov), against float64 arithmetic
    a, b, c = 3.4445, -4.7750, 2.0315
    torch.manual_seed(1)
    for p in m.parameters():
        p.grad = torch.randn_like(p)
    fc, proj = m.blocks[0].mlp.fc, m.blocks[0].mlp.proj
    before = {n: (w.detach().double().clone(), w.grad.double().clone()) for n, w in (("fc", fc), ("proj", proj))}
    tg.set_schedule(mat, adam, 0, cfg)
    mat.step()
    for n, w in (("fc", fc), ("proj", proj)):
        W0, G = before[n]
        M = 0.15 * G + 0.85 * (0.15 * G)              # Nesterov look-ahead of a fresh buffer
        X = M.T if M.size(0) > M.size(1) else M
        X = X / (torch.linalg.matrix_norm(X) + 1e-7)
        for _ in range(5):
            A = X @ X.T
            X = a * X + (b * A + c * A @ A) @ X
        X = X.T if M.size(0) > M.size(1) else X
        scale = max(1.0, W0.size(0) / W0.size(1)) ** 0.5   # 2 for fc (4d x d), 1 for proj (d x 4d)
        assert torch.allclose(w.detach().double(), W0 - 0.05 * scale * X, atol=1e-6), n
    assert tg.muon_step_scale(proj, "speedrun") == 1.0 and tg.muon_step_scale(proj, "rms") == 0.5


def test_speedrun_config_and_errors():
    cfg = tg.parse_config(["--config", os.path.join(os.path.dirname(__file__), "..", "configs", "paper", "speedrun_baseline.toml")])
    assert (cfg.arch, cfg.ns_coeffs, cfg.muon_scale, cfg.loader, cfg.layer_pattern) == \
        ("speedrun", "speedrun", "speedrun", "sequential", "LSSSLSSLSSSL")
    for over, needle in [(dict(n_layer=6, layer_pattern="LSSLSL"), "even n_layer >= 8"),
                         (dict(constraint="soft_cap"), "no weight constraints"),
                         (dict(head_spectral=True), "head_spectral = false"),
                         (dict(lr_alloc="modula"), "lr_alloc=modula")]:
        with pytest.raises(tg.ConfigError, match=needle):
            tiny_cfg(**over)


def test_speedrun_run_resumes_bitwise_and_logs_activations(doc_shards, tmp_path, capsys):  # noqa: F811
    over = dict(arch="speedrun", constraint="none", head_spectral="false", n_layer=8, layer_pattern="LSSLSSSL",
                ns_coeffs="speedrun", muon_scale="speedrun", lr_embed=0.6, lr_head=0.008)
    a, b, c = (str(tmp_path / n) for n in "abc")
    assert tg.main(pipeline_args(doc_shards, a, **over)) == 0
    assert tg.main(pipeline_args(doc_shards, b, stop_after=4, save_every=2, **over)) == 0
    assert tg.main(pipeline_args(doc_shards, c, resume=os.path.join(b, "ckpt_step000002.pt"), **over)) == 0
    full = {(r["step"], k): r[k] for r in read_metrics(a) for k in ("train_loss", "val_loss") if r.get(k) is not None}
    resumed = {(r["step"], k): r[k] for r in read_metrics(c) for k in ("train_loss", "val_loss") if r.get(k) is not None}
    assert {s for s, _ in resumed} >= {3, 6} and all(full[key] == v for key, v in resumed.items())
    last = [r for r in read_metrics(a) if r.get("val_loss") is not None][-1]
    assert math.isfinite(last["val_loss"]) and last["max_act_entry"] > 0 and 0 < last["max_logit"] < 30  # logits in (0, 2c)
    model, cfg, _ = tg.model_from_checkpoint(os.path.join(a, "ckpt_final.pt"))
    assert isinstance(model, tg.SpeedrunGPT)
    capsys.readouterr()

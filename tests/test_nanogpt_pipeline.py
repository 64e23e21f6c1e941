"""The 145M reference pipeline as configuration of the one trainer (issue 21).

Attention masks (documents, block-wise window, long/short layers) against a brute-force loop and a
re-implementation of the reference scripts' FlexAttention block selection; the sequential loader
against the reference loader's token layout; exact resume; the eval protocol; the options for the
smaller differences (RoPE, Newton-Schulz coefficients, init, embedding cap, soft-cap precision);
init_weights and stop_after. All on CPU in fp32 with tiny models.
"""

import dataclasses
import math
import os

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import train_gpt as tg
from conftest import read_metrics, tiny_args
from data.shards import write_shard

pytestmark = [pytest.mark.usefixtures("one_thread"),
              pytest.mark.filterwarnings("ignore:flex_attention called without torch.compile")]
B = tg.ATTN_BLOCK
DOC = 63  # the document token of the generated shards (vocab 64)


def random_docs(rng, n, vocab=64, doc=DOC, mean_len=150):
    """n tokens of documents of varied length (geometric), each starting with the doc token."""
    toks = rng.integers(0, vocab - 1, n)
    starts = np.cumsum(rng.geometric(1 / mean_len, n)) - 1
    toks[starts[starts < n]] = doc
    return toks


# -----------------------------------------------------------------------------
# Attention masks


def brute_force_attention(q, k, v, toks, doc, window, scale):
    """float64 loop: query t of row b sees key s iff s <= t, no doc token in (s, t], and block(t) - block(s) < window."""
    Bn, H, T, D = q.shape
    out = torch.zeros(Bn, H, T, D, dtype=torch.float64)
    for b in range(Bn):
        seq = toks[b].tolist()
        for t in range(T):
            keys = []
            for s in range(t, -1, -1):
                if window is not None and t // B - s // B >= window:
                    break
                keys.append(s)
                if seq[s] == doc:  # s begins t's document: nothing before it is visible
                    break
            keys = torch.tensor(keys)
            att = (q[b, :, t:t + 1].double() @ k[b, :, keys].double().mT) * scale   # (H, 1, n)
            out[b, :, t] = (att.softmax(-1) @ v[b, :, keys].double())[:, 0]
    return out


@pytest.mark.parametrize("window", [None, 1, 2, 3])
def test_dense_and_flex_masks_match_brute_force(window):
    rng = np.random.default_rng(window or 0)
    T, H, D = 4 * B, 2, 8
    toks = torch.from_numpy(np.stack([random_docs(rng, T), random_docs(rng, T, mean_len=40)]))
    q, k, v = (torch.randn(2, H, T, D, generator=torch.Generator().manual_seed(i)) for i in range(3))
    ref = brute_force_attention(q, k, v, toks, DOC, window, 0.3)
    docs = tg.doc_ids(toks, DOC)
    dense = tg.attend(q, k, v, 0.3, tg.dense_mask(docs, window))
    assert (dense.double() - ref).abs().max() < 1e-5
    flex = tg.attend(q, k, v, 0.3, tg.flex_block_mask(docs, window))  # FlexAttention forward (no backward on CPU)
    assert (flex.double() - ref).abs().max() < 1e-5


def reference_visible_blocks(docs, W):
    """Key blocks each query block reads under the reference scripts' BlockMask: per query block, the
    full blocks (causal, both blocks inside one document) and the partial ones (overlapping documents,
    or the diagonal), each list nearest first; the first min(n_full, W - 1) full blocks and the first
    min(n_partial, max(W - n_full, 1)) partial ones (negative counts read nothing)."""
    n = len(docs) // B
    lo, hi = docs.view(n, B)[:, 0].tolist(), docs.view(n, B)[:, -1].tolist()
    out = []
    for i in range(n):
        full = [j for j in range(i - 1, -1, -1) if lo[i] == hi[j] and hi[i] == lo[j]]
        part = [j for j in range(i, -1, -1) if lo[i] <= hi[j] and hi[i] >= lo[j] and j not in full]
        take_full = max(0, min(len(full), W - 1))
        take_part = max(0, min(len(part), max(W - len(full), 1)))
        out.append(set(full[:take_full]) | set(part[:take_part]))
    return out


@pytest.mark.parametrize("seed", range(3))
def test_window_blocks_follow_the_reference_block_selection(seed):
    """Our rule (last max(W, 1) blocks, within the document) selects the reference's key blocks for every
    window the schedule produces, short layers' W // 2 = 0 included."""
    rng = np.random.default_rng(seed)
    toks = torch.from_numpy(random_docs(rng, 16 * B, mean_len=[60, 300, 900][seed]))
    docs = tg.doc_ids(toks, DOC)[None]
    for W in range(0, 15):
        dense = tg.dense_mask(docs, max(1, W))[0, 0]
        blocks = dense.view(16, B, 16, B).any(dim=(1, 3))
        ours = [set(torch.nonzero(blocks[i]).flatten().tolist()) for i in range(16)]
        assert ours == reference_visible_blocks(docs[0], W), W
        bm = tg.flex_block_mask(docs, max(1, W)).to_dense()[0, 0].bool()
        assert torch.equal(bm, blocks), W


def reference_window_tokens(step, num_steps):
    """The scripts' window: the smallest multiple of 128 (at least 128) >= 1728 x step / num_steps."""
    v = 1728 * (step / num_steps)
    return next(x for x in range(128, int(v) + 1 + 128, 128) if x >= v)


def test_window_schedule_and_layer_pattern():
    cfg = tg.Config(window_schedule="reference", layer_pattern="LSSSLSSLSSSL", num_steps=1770)
    for n in (1770, 6200, 7):
        cfg = dataclasses.replace(cfg, num_steps=n)
        assert [tg.window_blocks(s, cfg) * B for s in range(n + 1)] == [reference_window_tokens(s, n) for s in range(n + 1)]
    cfg = dataclasses.replace(cfg, num_steps=6200)
    assert tg.window_blocks(0, cfg) * B == 128 and tg.window_blocks(6200, cfg) * B == 1792
    assert tg.layer_windows(6200, cfg) == [14, 7, 7, 7, 14, 7, 7, 14, 7, 7, 7, 14]
    assert tg.layer_windows(0, cfg) == [1] * 12
    assert tg.layer_windows(500, cfg) == [2, 1, 1, 1, 2, 1, 1, 2, 1, 1, 1, 2]
    assert tg.layer_windows(3, tg.Config()) == [None] * 12


def test_model_uses_the_dense_masks_and_matches_per_document_runs():
    """With documents and no window, each document's logits equal those of the document alone
    (RoPE is relative; doc starts at position 0 vs later give the same logits)."""
    cfg = tg.Config(vocab_size=64, n_layer=2, n_head=2, d_model=32, seq_len=2 * B, doc_token=DOC, dtype="fp32",
                    constraint="none")
    torch.manual_seed(0)
    m = tg.GPT(cfg)
    with torch.no_grad():
        for b in m.blocks:
            b.attn.proj.normal_(0, 0.2)
            b.mlp.proj.normal_(0, 0.2)
        m.head.normal_(0, 0.2)
    toks = torch.from_numpy(random_docs(np.random.default_rng(1), 2 * B, mean_len=70))[None]
    starts = torch.nonzero(toks[0] == DOC).flatten().tolist()
    whole = m(toks)
    for s, e in zip(starts, starts[1:] + [2 * B]):
        alone = m(toks[:, s:e])
        assert (whole[:, s:e] - alone).abs().max() < 1e-4


# -----------------------------------------------------------------------------
# RoPE, Newton-Schulz, init, embedding cap, soft-cap precision


def test_half_truncated_rope_tables():
    cos, sin = tg.rope_tables(50, 16, torch.float64, "half_truncated")
    freq = np.concatenate([(1 / 1024.0) ** np.linspace(0, 1, 4), np.zeros(4)])
    ang = np.arange(50)[:, None] * freq[None]
    assert np.allclose(cos.numpy(), np.cos(ang), atol=1e-12) and np.allclose(sin.numpy(), np.sin(ang), atol=1e-12)
    x = torch.randn(1, 50, 1, 16, dtype=torch.float64)
    y = tg.apply_rope(x, cos, sin)
    assert torch.equal(y[..., 4:8], x[..., 4:8]) and torch.equal(y[..., 12:], x[..., 12:])  # zero frequencies: unrotated
    assert torch.allclose(y.norm(dim=-1), x.norm(dim=-1))
    full = tg.rope_tables(50, 16, torch.float64)[0]
    assert not torch.allclose(full, cos)


def test_reference_newton_schulz_is_the_composite_polynomial():
    G = torch.randn(24, 40, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    out = tg.msign(G, 5, torch.float32, "reference")
    s_in = torch.linalg.svdvals(G) / (torch.linalg.matrix_norm(G) + tg.NANOGPT_NS_EPS)
    want, _ = tg.quintic_composite(s_in.numpy(), tg.NANOGPT_NS)
    got = torch.linalg.svdvals(out.double()).numpy()
    assert np.allclose(np.sort(got), np.sort(want), atol=1e-5)
    peak = tg.quintic_composite(np.linspace(0, 1, 1_000_001), tg.NANOGPT_NS)[0].max()
    assert peak == pytest.approx(tg.NANOGPT_NS_STRETCH, abs=1e-5)  # the scripts' constant is this polynomial's peak
    assert tg.NANOGPT_NS_STRETCH < tg.ns_max_stretch(5, "reference") < tg.NANOGPT_NS_STRETCH + 1e-3
    assert tg.max_update_norm(0.05, 5, "nanogpt") == pytest.approx(0.05 * 1.14502 * 1.05)


def test_ns_uniform_init_is_the_reference_map():
    cfg = tg.Config(vocab_size=64, n_layer=2, n_head=2, d_model=32, hidden_init="ns_uniform", dtype="fp32")
    m = tg.GPT(cfg)
    lo = float(tg.quintic_composite(np.array([1 / math.sqrt(32)]), tg.NANOGPT_NS)[0][0])  # a flat spectrum's image
    for W in list(m.blocks[0].attn.qkv) + [m.blocks[0].mlp.fc]:
        s = torch.linalg.svdvals(W.double()) / tg.rms_scale(W)
        assert s.max() <= tg.NANOGPT_NS_STRETCH + 1e-4 and s.min() > 0.5
        assert s.max() > 1.0 and (s - 1).abs().max() > 0.01  # not orthogonal: the NS map's ripple
    assert 0.5 < lo < 1.15


def test_embedding_lookup_cap_is_nn_embedding_max_norm():
    cfg = tg.Config(vocab_size=64, n_layer=1, n_head=2, d_model=32, embed_cap="lookup", emb_w_max=1.0)
    m = tg.GPT(cfg)
    with torch.no_grad():
        m.embed.weight.mul_(3.0)
    ref = torch.nn.Embedding(64, 32, max_norm=math.sqrt(32))
    ref.weight.data.copy_(m.embed.weight)
    idx = torch.tensor([[1, 5, 5, 9]])
    assert torch.equal(m.embed_tokens(idx), ref(idx))
    assert torch.equal(m.embed.weight, ref.weight)
    rms = m.embed.weight.pow(2).mean(-1).sqrt()
    assert torch.allclose(rms[[1, 5, 9]], torch.ones(3), atol=1e-5) and (rms[[0, 2, 3]] > 2).all()  # only looked-up rows


def test_soft_cap_bf16_rounds_the_weights_to_bf16():
    M = torch.randn(2, 16, 24, generator=torch.Generator().manual_seed(0)) / 5
    p32 = tg.ProjArgs(w_max=1.0, alpha=0.05)
    p16 = tg.ProjArgs(w_max=1.0, alpha=0.05, dtype=torch.bfloat16)
    out32, out16 = tg.c_soft_cap(M, p32), tg.c_soft_cap(M, p16)
    assert out16.dtype == torch.float32 and torch.equal(out16.to(torch.bfloat16).float(), out16)
    assert not torch.equal(out32.to(torch.bfloat16).float(), out32)
    assert (out16 - out32).abs().max() < 0.02


# -----------------------------------------------------------------------------
# Sequential loader


def reference_stream(files, batch, rank, world):
    """The reference scripts' loader, re-implemented: shards in order; before each read, move to the
    next shard (from 0) when pos + batch + 1 >= its length; rank r reads [pos + r L, pos + (r + 1) L + 1)."""
    L = batch // world
    it = iter(files)
    toks, pos = np.fromfile(next(it), dtype=np.uint16, offset=1024), 0
    while True:
        if pos + batch + 1 >= len(toks):
            toks, pos = np.fromfile(next(it), dtype=np.uint16, offset=1024), 0
        yield toks[pos + rank * L:][:L + 1].astype(np.int64)
        pos += batch


@pytest.fixture
def doc_shards(tmp_path):
    rng = np.random.default_rng(0)
    d = tmp_path / "docs"
    d.mkdir()
    for i, n in enumerate([3000, 2100, 2600]):
        write_shard(str(d / f"train_{i:06d}.bin"), random_docs(rng, n, mean_len=90))
    write_shard(str(d / "val_000000.bin"), random_docs(rng, 4 * 1024 + 1, mean_len=90))
    return str(d)


def test_sequential_loader_is_the_reference_layout(doc_shards):
    """world 2 x accum 2 reads what the reference reads with 4 ranks, every token once, shards in order."""
    files = sorted(os.path.join(doc_shards, f) for f in os.listdir(doc_shards) if f.startswith("train"))
    L, world, accum = 128, 2, 2
    batch = L * world * accum
    steps = sum(tg.steps_in_shard(len(tg.read_shard(f)), batch) for f in files)
    assert steps == 5 + 4 + 5  # (n - 514) // 512 + 1 for n = 3000, 2100, 2600
    loaders = [tg.SequentialLoader(os.path.join(doc_shards, "train_*.bin"), batch, L, 64, steps) for _ in range(world)]
    refs = [reference_stream(files, batch, r, world * accum) for r in range(world * accum)]
    for _ in range(steps):
        want = [next(g) for g in refs]
        for rank in range(world):
            for a, (x, y) in enumerate(loaders[rank].next_batch(1, rank, world, accum, torch.device("cpu"))):
                seq = want[a * world + rank]
                assert torch.equal(x[0], torch.from_numpy(seq[:-1])) and torch.equal(y[0], torch.from_numpy(seq[1:]))
    with pytest.raises(tg.DataError, match="cover 14 steps"):
        loaders[0].next_batch(1, 0, world, accum, torch.device("cpu"))


def test_sequential_loader_refuses_too_few_shards_with_the_count(doc_shards, tmp_path, capsys):
    args = pipeline_args(doc_shards, str(tmp_path / "run"), num_steps=40)
    assert tg.main(args) == 2
    err = capsys.readouterr().err
    assert "cover 14 steps" in err and "needs 40 steps" in err and "that is 8 shards" in err
    assert not os.path.exists(str(tmp_path / "run"))  # refused before anything was written


# -----------------------------------------------------------------------------
# The pipeline in the trainer: resume, eval protocol, stop_after, init_weights


def pipeline_args(data, out, **over):
    """A tiny run of the reference pipeline: documents, window, long/short layers, sequential loader."""
    cfg = dict(vocab_size=64, n_layer=2, n_head=2, d_model=32, seq_len=256, micro_batch_tokens=256, batch_tokens=512,
               num_steps=6, loader="sequential", doc_token=DOC, window_schedule="reference", layer_pattern="LS",
               rope="half_truncated", val_seq_len=512, val_tokens=2048, eval_at_start="true", eval_every=3,
               train_bin=os.path.join(data, "train_*.bin"), val_bin=os.path.join(data, "val_*.bin"))
    cfg.update(over)
    return tiny_args(data, out, **cfg)


def test_sequential_resume_is_bitwise_exact(doc_shards, tmp_path, capsys):
    a, b = str(tmp_path / "a"), str(tmp_path / "b")
    assert tg.main(pipeline_args(doc_shards, a)) == 0
    assert tg.main(pipeline_args(doc_shards, b, stop_after=4, save_every=2)) == 0
    c = str(tmp_path / "c")
    assert tg.main(pipeline_args(doc_shards, c, resume=os.path.join(b, "ckpt_step000002.pt"))) == 0
    full = {(r["step"], k): r[k] for r in read_metrics(a) for k in ("train_loss", "val_loss") if r.get(k) is not None}
    resumed = {(r["step"], k): r[k] for r in read_metrics(c) for k in ("train_loss", "val_loss") if r.get(k) is not None}
    assert resumed and all(full[key] == v for key, v in resumed.items())
    assert {s for s, _ in resumed} >= {3, 4, 5, 6}
    wa, wc = (tg.load_checkpoint(os.path.join(d, "ckpt_final.pt"))["model"] for d in (a, c))
    assert all(torch.equal(wa[k], wc[k]) for k in wa)
    # stop_after: the same first 4 steps as the full run (schedules follow num_steps), an eval and a final checkpoint at 4
    early = {(r["step"], k): r[k] for r in read_metrics(b) for k in ("train_loss", "val_loss") if r.get(k) is not None}
    assert early[(4, "val_loss")] and all(full[key] == v for key, v in early.items() if key != (4, "val_loss"))
    assert tg.load_checkpoint(os.path.join(b, "ckpt_final.pt"))["step"] == 4
    capsys.readouterr()


def test_two_ranks_read_the_reference_layout_and_equal_one_process(doc_shards, tmp_path):
    """2 ranks x accum 1 and 1 process x accum 2 train on the same sequences (rank r = micro-step r):
    bitwise the same losses and weights (as the random loader, tests/test_multiprocess.py)."""
    from proc_helpers import run_ranks
    one, two = str(tmp_path / "w1"), str(tmp_path / "w2")
    assert tg.main(pipeline_args(doc_shards, one, num_steps=4, debug="true")) == 0
    rcs, logs = run_ranks(2, pipeline_args(doc_shards, two, num_steps=4, debug="true"), two + "_logs")
    assert rcs == [0, 0], "\n".join(logs)
    train = lambda d: [(r["step"], r["train_loss"]) for r in read_metrics(d) if "val_loss" not in r]  # noqa: E731
    val = lambda d: [(r["step"], r["val_loss"]) for r in read_metrics(d) if "val_loss" in r]  # noqa: E731
    assert train(one) == train(two) and len(train(one)) == 4
    assert [s for s, _ in val(one)] == [s for s, _ in val(two)] == [0, 3, 4]  # float64 sums over ranks: order may differ
    assert all(a == pytest.approx(b, rel=1e-12) for (_, a), (_, b) in zip(val(one), val(two)))
    wa, wb = (tg.load_checkpoint(os.path.join(d, "ckpt_final.pt"))["model"] for d in (one, two))
    assert all(torch.equal(wa[k], wb[k]) for k in wa)


def test_eval_protocol_scores_long_masked_sequences(doc_shards, tmp_path, capsys):
    """Step 0 is evaluated; val_loss is the mean over val_seq_len sequences under the masks of that step,
    recomputed here sequence by sequence; max_logit is the largest |logit|."""
    out = str(tmp_path / "r")
    assert tg.main(pipeline_args(doc_shards, out, num_steps=60, stop_after=3)) == 0
    capsys.readouterr()
    recs = [r for r in read_metrics(out) if "val_loss" in r]
    assert [r["step"] for r in recs] == [0, 3]
    ck = tg.load_checkpoint(os.path.join(out, "ckpt_final.pt"))
    cfg = tg.config_from_checkpoint(ck)
    m = tg.GPT(cfg)
    m.load_state_dict(ck["model"])
    m.eval()
    val = torch.from_numpy(tg.read_shard(os.path.join(doc_shards, "val_000000.bin"))[:2049].astype(np.int64))
    losses, top = [], 0.0
    with torch.no_grad():
        for s in range(0, 2048, 512):
            x, y = val[s:s + 512][None], val[s + 1:s + 513][None]
            logits = m(x, step=3)
            losses.append(F.cross_entropy(logits[0], y[0]).item())
            top = max(top, logits.abs().max().item())
            assert not torch.allclose(logits, m(x, step=60))  # step 3: a window of 1 block, not the final 14
    assert recs[-1]["val_loss"] == pytest.approx(np.mean(losses), rel=1e-6)
    assert recs[-1]["max_logit"] == pytest.approx(top, rel=1e-6)


def test_init_weights_are_loaded_before_step_0(doc_shards, tmp_path, capsys):
    cfg = tg.parse_config(pipeline_args(doc_shards, str(tmp_path / "x")))
    torch.manual_seed(123)
    src = tg.GPT(cfg)
    with torch.no_grad():
        src.head.normal_(0, 0.05)
    sd = {k: v.clone() for k, v in src.state_dict().items()}
    torch.save({"model": sd}, str(tmp_path / "init.pt"))
    out = str(tmp_path / "r")
    assert tg.main(pipeline_args(doc_shards, out, init_weights=str(tmp_path / "init.pt"), stop_after=1)) == 0
    capsys.readouterr()
    step0 = [r for r in read_metrics(out) if r.get("step") == 0][0]
    val = tg.load_val_tokens(cfg.val_bin, cfg.val_tokens, 512, 64)
    want = tg.evaluate(src, val, cfg, torch.device("cpu"), torch.autocast("cpu", enabled=False), 1, seq_len=512, step=0)
    assert step0["val_loss"] == want["val_loss"]
    torch.save(sd, str(tmp_path / "plain.pt"))  # a plain state dict works too
    assert tg.main(pipeline_args(doc_shards, str(tmp_path / "p"), init_weights=str(tmp_path / "plain.pt"), stop_after=1)) == 0
    assert [r for r in read_metrics(str(tmp_path / "p")) if r.get("step") == 0][0]["val_loss"] == want["val_loss"]
    capsys.readouterr()
    bad = dict(sd)
    bad["head"] = bad["head"][:, :16]
    del bad["blocks.1.mlp.fc"]
    torch.save(bad, str(tmp_path / "bad.pt"))
    for path, needle in ((str(tmp_path / "nope.pt"), "no such file"),
                         (str(tmp_path / "bad.pt"), "missing blocks.1.mlp.fc (128, 32); head has shape (64, 16), the model (64, 32)")):
        run = str(tmp_path / f"e{len(needle)}")
        assert tg.main(pipeline_args(doc_shards, run, init_weights=path)) == 2
        assert needle in capsys.readouterr().err
        assert not os.path.exists(os.path.join(run, "metrics.jsonl"))


@pytest.mark.parametrize("over,needle", [
    (dict(layer_pattern="LSL"), "must be 2 letters L or S"),
    (dict(layer_pattern="LS", window_schedule="none"), "no window to halve"),
    (dict(seq_len=128), "set seq_len=256"),
    (dict(ns_coeffs="reference", ns_steps=4), "set ns_steps=5"),
    (dict(stop_after=7), "past num_steps=6"),
    (dict(val_seq_len=300), "val_seq_len=300 must be a multiple of 128"),
    (dict(doc_token=64), "doc_token=64 must be -1"),
])
def test_pipeline_config_errors(over, needle, doc_shards, tmp_path, capsys):
    assert tg.main(pipeline_args(doc_shards, str(tmp_path / "r"), **over)) == 2
    assert needle in capsys.readouterr().err


# -----------------------------------------------------------------------------
# The FineWeb configs


def test_fineweb_configs_use_the_reference_pipeline_and_name_their_script(repo):
    paper = os.path.join(repo, "configs", "paper")
    names = [os.path.join(paper, f) for f in sorted(os.listdir(paper)) if f.startswith("w")]
    assert len(names) == 6
    for path in names + [os.path.join(repo, "configs", "nanogpt_145m.toml")]:
        cfg = tg.parse_config(["--config", path])
        assert (cfg.loader, cfg.doc_token, cfg.window_schedule, cfg.layer_pattern) == ("sequential", 50256, "reference", "LSSSLSSLSSSL")
        assert (cfg.seq_len, cfg.micro_batch_tokens, cfg.batch_tokens, cfg.val_seq_len, cfg.val_tokens) == (49152, 49152, 393216, 262144, 10485760)
        assert cfg.eval_at_start and cfg.eval_every == 125
        assert (cfg.rope, cfg.ns_coeffs, cfg.hidden_init, cfg.embed_cap) == ("half_truncated", "reference", "ns_uniform", "lookup")
        if cfg.constraint == "soft_cap":
            assert (cfg.soft_cap_coupling, cfg.soft_cap_dtype) == ("nanogpt", "bf16")
        header = open(path).read().split("\n\n")[0]
        assert "train_spectral_" in header and ("Script: nanogpt/train_spectral_" in header or "No published script. Assumptions:" in header) \
            or path.endswith("nanogpt_145m.toml"), path
    sn = tg.parse_config(["--config", os.path.join(paper, "w8_spectral_normalize.toml")])
    assert sn.head_w_max == sn.w_max == 8.0  # the spectral-normalize script caps the head at w_max
    # 254 steps per 100M-token FineWeb shard: the shard counts the headers name
    per = tg.steps_in_shard(100_000_000, 393216)
    assert per == 254 and [-(-n // per) for n in (1770, 6200, 7080)] == [7, 25, 28]
    # the Shakespeare configs keep their pipeline
    for name in ("quickstart.toml", "shakespeare_char.toml", os.path.join("paper", "shakespeare_lipschitz.toml")):
        cfg = tg.parse_config(["--config", os.path.join(repo, "configs", name)])
        assert (cfg.loader, cfg.doc_token, cfg.window_schedule, cfg.rope, cfg.embed_cap) == ("random", -1, "none", "full", "project")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="FlexAttention's backward needs CUDA (scripts/gpu_check.sh runs this)")
def test_flex_attention_on_cuda_matches_dense_masks_with_gradients():
    """On CUDA the model attends through FlexAttention BlockMasks: loss and gradients equal those under
    the dense masks (fp32), eager and compiled, at several windows, without a recompile per step."""
    cfg = tg.Config(vocab_size=64, n_layer=2, n_head=2, d_model=64, seq_len=4 * B, doc_token=DOC, window_schedule="reference",
                    layer_pattern="LS", num_steps=20, constraint="none", dtype="fp32")
    torch.manual_seed(0)
    m = tg.GPT(cfg).cuda()
    with torch.no_grad():
        for b in m.blocks:
            b.attn.proj.normal_(0, 0.2)
            b.mlp.proj.normal_(0, 0.2)
        m.head.normal_(0, 0.2)
    toks = torch.from_numpy(random_docs(np.random.default_rng(0), 4 * B + 1, mean_len=100)).cuda()[None]
    x, y = toks[:, :-1], toks[:, 1:]
    compiled = torch.compile(m)

    def loss_and_grads(fwd, masks):
        m.zero_grad(set_to_none=True)
        loss = fwd(x, y, masks=masks)
        loss.backward()
        return loss.detach(), [p.grad.clone() for p in m.parameters()]

    torch._dynamo.reset()
    graphs = []
    for step in (0, 3, 10, 20):
        flex = m.attention_masks(x, step)
        assert not torch.is_tensor(flex[0])  # BlockMasks on CUDA
        dense = [tg.dense_mask(tg.doc_ids(x, DOC), w) for w in tg.layer_windows(step, cfg)]
        ld, gd = loss_and_grads(m, dense)
        for fwd in (m, compiled):
            lf, gf = loss_and_grads(fwd, flex)
            assert (lf - ld).abs() < 1e-5
            assert all((a - b).abs().max() < 1e-4 * (1 + b.abs().max()) for a, b in zip(gf, gd))
        graphs.append(torch._dynamo.utils.counters["stats"]["unique_graphs"])
    assert graphs[0] > 0 and graphs[1:] == graphs[:1] * 3  # compiled at the first window, not again for the next ones


def test_certificate_rotates_with_the_configs_rope():
    """lipschitz_bound's per-offset q.k norms use the config's RoPE: against explicit rotations built
    from the trainer's apply_rope with the half-truncated tables (and unlike the full ones)."""
    import lipschitz_bound as lb
    g = torch.Generator().manual_seed(0)
    dh, d, T = 8, 12, 40
    Wq, Wk = torch.randn(dh, d, generator=g, dtype=torch.float64), torch.randn(dh, d, generator=g, dtype=torch.float64)
    cos, sin = tg.rope_tables(T, dh, torch.float64, "half_truncated")
    eye = torch.eye(dh, dtype=torch.float64)
    R = tg.apply_rope(eye.expand(T, dh, dh).permute(1, 0, 2).unsqueeze(2), cos, sin).squeeze(2)  # R[j, t] = R_t e_j
    want = torch.stack([torch.linalg.matrix_norm((R[:, t].mT @ Wq).mT @ Wk, ord=2) for t in range(T)])
    got = lb.qk_offset_norms(Wq, Wk, T, "half_truncated")
    assert torch.allclose(got, want, rtol=1e-9)
    assert not torch.allclose(lb.qk_offset_norms(Wq, Wk, T, "full"), want, rtol=1e-3)

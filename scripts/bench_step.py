"""Benchmark of one training step: ours (forward, backward, Muon, constraint) against the plain recipe.

    python scripts/bench_step.py --config configs/shakespeare_char.toml --dtype bf16   # CPU: ~2-3 min
    python scripts/bench_step.py --config configs/nanogpt_145m.toml --dtype bf16 --compile --plain_dtypes bf16
    python scripts/bench_step.py --config configs/shakespeare_char.toml --constraints soft_cap --steps 20 --batch 16

One step is one micro-batch (micro_batch_tokens of the config, or --batch rows of seq_len) through
forward and backward, then the optimizer. Ours is built from train_gpt pieces exactly as train()
runs them: GPT, build_optimizers (Muon + the constraint for the matrices, Adam for the embedding),
autocast, torch.compile (--compile), train_gpt.optimizer_step and the per-step non-finite check.
It is timed in four parts (CUDA events on a GPU, so the parts add no synchronization):
forward+backward, the updates (train_gpt.optimizer_step: Muon and Adam, embedding-row projection,
zeroed gradients) without the constraint, the constraint (power iteration, soft-cap coupling,
projection: timed through MatrixOptimizer.mark), and the bookkeeping (the non-finite check). The plain recipe is nanoGPT's model written plainly: pre-norm
LayerNorm (no bias), the same RoPE positions, 1/sqrt(d_head) causal SDPA, GELU MLP, plain
residuals, untied head, torch.optim.AdamW (fused on CUDA, foreach on CPU, decay on matrices),
no gradient clipping (which would only slow it down), same width, depth, heads, context, batch
and vocabulary, so its matmul FLOPs equal ours. Inputs are random tokens made before timing:
the data loader is not timed.

Model FLOPs per token (PaLM's convention, forward + backward = 3 x forward):
    6 N + 12 L T d,   N = L (3 d^2 + d^2 + 2 r d^2) + V d
(N: matmul weights including the head, not the embedding; L layers, width d, MLP ratio r,
context T, vocabulary V; 12 L T d counts q k^T and (attention) v over all T keys, causal or not).
The matmul ceiling is the median rate of torch.matmul of the model's main shape,
(tokens x d) @ (d x 4d), in the step's dtype on this device: MFU is against this machine.

Targets (CPU, 2 cores, configs/shakespeare_char.toml, batch 64 x 256):
our bf16 step >= 1.5x the tokens/s of the plain fp32 recipe and >= 1.1x the plain bf16 recipe;
updates + constraint + bookkeeping <= 10% of our step.
"""

import argparse
import dataclasses
import gc
import json
import math
import os
import statistics
import sys
import time

import torch
import torch.nn as nn
import torch.nn.functional as F

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)
import train_gpt as tg  # noqa: E402

DEFAULT_CONSTRAINTS = "soft_cap,spectral_normalize,hard_cap"
DTYPES = tg.DTYPES
# CPU targets of our bf16 step (configs/shakespeare_char.toml, batch 64 x 256, as in the docstring):
# tokens/s against the plain recipe in fp32 and bf16, and the optimizer's share of the step.
TARGET_VS_PLAIN_FP32, TARGET_VS_PLAIN_BF16, TARGET_OPT_FRACTION = 1.5, 1.1, 0.10
# A compiled/bf16 loss and the eager fp32 loss of the same weights and batch must agree to this
# relative error (bf16 has an 8-bit mantissa: 2^-8 = 0.4% per rounding; 2% leaves room for sums).
BF16_LOSS_RTOL = 0.02


# -----------------------------------------------------------------------------
# The plain recipe (nanoGPT's model, with our RoPE so that FLOPs match)


class PlainBlock(nn.Module):
    def __init__(self, d: int, n_head: int, mlp_ratio: int):
        super().__init__()
        self.n_head = n_head
        self.ln1, self.ln2 = nn.LayerNorm(d, bias=False), nn.LayerNorm(d, bias=False)
        self.qkv = nn.Linear(d, 3 * d, bias=False)
        self.attn_proj = nn.Linear(d, d, bias=False)
        self.fc = nn.Linear(d, mlp_ratio * d, bias=False)
        self.mlp_proj = nn.Linear(mlp_ratio * d, d, bias=False)

    def forward(self, x, cos, sin):
        B, L, C = x.shape
        q, k, v = self.qkv(self.ln1(x)).view(B, L, 3, self.n_head, C // self.n_head).unbind(2)
        q, k = tg.apply_rope(q, cos, sin), tg.apply_rope(k, cos, sin)
        y = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), is_causal=True)
        x = x + self.attn_proj(y.transpose(1, 2).reshape(B, L, C))
        return x + self.mlp_proj(F.gelu(self.fc(self.ln2(x))))


class PlainGPT(nn.Module):
    def __init__(self, cfg: tg.Config):
        super().__init__()
        d = cfg.d_model
        self.embed = nn.Embedding(cfg.vocab_size, d)
        self.blocks = nn.ModuleList(PlainBlock(d, cfg.n_head, cfg.mlp_ratio) for _ in range(cfg.n_layer))
        self.ln_f = nn.LayerNorm(d, bias=False)
        self.head = nn.Linear(d, cfg.vocab_size, bias=False)
        cos, sin = tg.rope_tables(cfg.seq_len, d // cfg.n_head)
        self.register_buffer("rope_cos", cos, persistent=False)
        self.register_buffer("rope_sin", sin, persistent=False)
        self.n_layer = cfg.n_layer
        self.reset_parameters()

    @torch.no_grad()
    def reset_parameters(self):
        """nanoGPT's init: N(0, 0.02), residual output projections N(0, 0.02 / sqrt(2 L))."""
        for name, p in self.named_parameters():
            if p.dim() == 1:
                p.fill_(1.0)
            else:
                std = 0.02 / math.sqrt(2 * self.n_layer) if name.endswith("_proj.weight") else 0.02
                p.normal_(0.0, std)

    def forward(self, idx, targets):
        x = self.embed(idx)
        for b in self.blocks:
            x = b(x, self.rope_cos, self.rope_sin)
        logits = self.head(self.ln_f(x))
        return F.cross_entropy(logits.view(-1, logits.size(-1)), targets.reshape(-1))


def plain_optimizer(model: PlainGPT, device) -> torch.optim.AdamW:
    decay = [p for p in model.parameters() if p.dim() >= 2]
    no_decay = [p for p in model.parameters() if p.dim() < 2]
    kind = {"fused": True} if device.type == "cuda" else {"foreach": True}
    return torch.optim.AdamW([dict(params=decay, weight_decay=0.1), dict(params=no_decay, weight_decay=0.0)],
                             lr=6e-4, betas=(0.9, 0.95), **kind)


# -----------------------------------------------------------------------------
# Figures: FLOPs, the matmul ceiling, timing


def flops_per_token(cfg: tg.Config) -> float:
    d, L, r = cfg.d_model, cfg.n_layer, cfg.mlp_ratio
    n_matmul = L * (3 * d * d + d * d + 2 * r * d * d) + cfg.vocab_size * d
    return 6.0 * n_matmul + 12.0 * L * cfg.seq_len * d


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def matmul_rate(tokens: int, d: int, r: int, dtype: torch.dtype, device, clock=time.perf_counter, min_time: float = 0.5) -> float:
    """Median FLOP/s of (tokens x d) @ (d x r d) in dtype: the ceiling a step's matmuls can reach here."""
    g = torch.Generator().manual_seed(0)
    a = torch.randn(tokens, d, generator=g).to(device, dtype)
    b = torch.randn(d, r * d, generator=g).to(device, dtype)
    out = torch.empty(tokens, r * d, device=device, dtype=dtype)
    for _ in range(3):
        torch.matmul(a, b, out=out)
    sync(device)
    ts, t_all = [], time.perf_counter()
    while len(ts) < 5 or (time.perf_counter() - t_all < min_time and len(ts) < 200):
        t0 = clock()
        torch.matmul(a, b, out=out)
        sync(device)
        ts.append(clock() - t0)
    return 2.0 * tokens * d * r * d / statistics.median(ts)


# CPU clocks: wall time, or this process's CPU time (all threads), which other processes' load
# barely changes: with --threads 1 it is the step's work, for A/B comparisons on a busy machine.
CLOCKS = {"wall": time.perf_counter, "process": time.process_time}


class Marks:
    """Named time stamps within one step: CUDA events on a GPU (no added synchronization),
    the chosen clock on a CPU. spans() synchronizes once and returns {name: seconds since the
    previous mark}, summed over repeated names."""

    def __init__(self, device, clock=time.perf_counter):
        self.cuda = device.type == "cuda"
        self.clock = clock
        self.marks: list = []

    def mark(self, name: str):
        if self.cuda:
            e = torch.cuda.Event(enable_timing=True)
            e.record()
            self.marks.append((name, e))
        else:
            self.marks.append((name, self.clock()))

    def spans(self) -> dict:
        if self.cuda:
            torch.cuda.synchronize()
        out = {}
        for (_, a), (name, b) in zip(self.marks, self.marks[1:]):
            dt = a.elapsed_time(b) / 1000.0 if self.cuda else b - a
            out[name] = out.get(name, 0.0) + dt
        self.marks = []
        return out


def run_steps(step, device, warmup: int, steps: int, clock=time.perf_counter) -> list[dict]:
    """Call step(marks) warmup + steps times; per timed step: seconds (synchronized, as train()
    measures it) and the spans of its parts."""
    marks = Marks(device, clock)
    out = []
    for i in range(warmup + steps):
        sync(device)
        t0 = clock()
        step(marks)
        sync(device)
        wall = clock() - t0
        parts = marks.spans()
        if i >= warmup:
            out.append(dict(parts, wall=wall))
    return out


def summarize(name: str, rec: list[dict], tokens: int, fpt: float, ceiling: float, device, extra=None) -> dict:
    med = {k: statistics.median(r[k] for r in rec) for k in rec[0]}
    wall = med["wall"]
    s = {"name": name, "step_s": wall, "step_s_min": min(r["wall"] for r in rec), "step_s_max": max(r["wall"] for r in rec),
         "tokens_per_s": tokens / wall, "flop_per_s": fpt * tokens / wall, "mfu": fpt * tokens / wall / ceiling,
         "parts_s": {k: v for k, v in med.items() if k != "wall"}, "steps": len(rec)}
    if device.type == "cuda":
        s["peak_mem_gib"] = torch.cuda.max_memory_allocated(device) / 2**30
    s.update(extra or {})
    return s


def make_batches(cfg: tg.Config, rows: int, device, n: int = 2):
    g = torch.Generator().manual_seed(1234)
    out = []
    for _ in range(n):
        b = torch.randint(0, cfg.vocab_size, (rows, cfg.seq_len + 1), generator=g).to(device)
        out.append((b[:, :-1], b[:, 1:]))
    return out


def loss_check(model, fwd, autocast_ctx, x, y) -> dict:
    """The configured forward (autocast dtype, compiled or not) against eager fp32 on the same
    weights and batch. Grad mode stays on in the configured pass so a compiled model reuses its
    training graph instead of compiling an inference one."""
    with autocast_ctx:
        got = float(fwd(x, y).detach())
    with torch.no_grad():
        ref = float(model(x, y))
    rel = abs(got - ref) / max(abs(ref), 1e-12)
    return {"loss_fp32_eager": ref, "loss_configured": got, "loss_rel_diff": rel, "loss_ok": rel <= BF16_LOSS_RTOL}


def free(device):
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)


# -----------------------------------------------------------------------------
# The two steps


def bench_ours(cfg: tg.Config, constraints: list[str], rows: int, device, compile_: bool, args, fpt, ceiling) -> list[dict]:
    torch.manual_seed(cfg.seed)
    model = tg.GPT(cfg).to(device)
    fwd = torch.compile(model) if compile_ else model
    autocast_ctx = torch.autocast(device.type, dtype=DTYPES[cfg.dtype], enabled=cfg.dtype == "bf16")
    batches = make_batches(cfg, rows, device)
    tokens = rows * cfg.seq_len
    results = []
    for c in constraints:
        ccfg = dataclasses.replace(cfg, constraint=c, wd=(cfg.wd or 0.1) if c in ("weight_decay", "spectral_wd") else 0.0)
        model.reset_parameters()  # model.cfg stays: a compiled forward would recompile for a new one
        free(device)
        mat_opt, adam = tg.build_optimizers(model, ccfg)
        it = [0]

        def step(marks):
            mat_opt.mark = marks.mark  # the constraint's share, marked around each projection in MatrixOptimizer._update
            x, y = batches[it[0] % len(batches)]
            it[0] += 1
            marks.mark("start")
            with autocast_ctx:
                loss = fwd(x, y)
            loss.backward()
            marks.mark("fwd_bwd")
            tg.optimizer_step(model, mat_opt, adam, ccfg)  # the trainer's own: updates, constraint, row caps
            marks.mark("update")
            bad = tg.nonfinite_tensor(model, loss.detach())
            marks.mark("bookkeeping")
            if bad:
                raise tg.TrainingDiverged(f"benchmark step of {c}: non-finite {bad}")

        rec = run_steps(step, device, args.warmup, args.steps, CLOCKS[args.clock])
        with torch.no_grad():  # a head at its cap, so that logits (and the check) are not ~0 after few steps
            model.head.copy_(torch.nn.init.orthogonal_(torch.empty_like(model.head)) * ccfg.head_w_max * tg.rms_scale(model.head))
        check = loss_check(model, fwd, autocast_ctx, *batches[0])
        s = summarize(f"ours {c} {cfg.dtype}" + (" compiled" if compile_ else ""), rec, tokens, fpt, ceiling, device, check)
        s.update(kind="ours", constraint=c, dtype=cfg.dtype)
        results.append(s)
        print_row(s, flush=True)
        del mat_opt, adam
    del model, fwd
    if compile_:
        torch._dynamo.reset()
    free(device)
    return results


def bench_plain(cfg: tg.Config, dtypes: list[str], rows: int, device, compile_: bool, args, fpt, ceilings) -> list[dict]:
    torch.manual_seed(cfg.seed)
    model = PlainGPT(cfg).to(device)
    fwd = torch.compile(model) if compile_ else model
    batches = make_batches(cfg, rows, device)
    tokens = rows * cfg.seq_len
    results = []
    for dt in dtypes:
        model.reset_parameters()
        free(device)
        opt = plain_optimizer(model, device)
        autocast_ctx = torch.autocast(device.type, dtype=DTYPES[dt], enabled=dt == "bf16")
        it = [0]

        def step(marks):
            x, y = batches[it[0] % len(batches)]
            it[0] += 1
            marks.mark("start")
            with autocast_ctx:
                loss = fwd(x, y)
            loss.backward()
            marks.mark("fwd_bwd")
            opt.step()
            opt.zero_grad(set_to_none=True)
            marks.mark("update")

        rec = run_steps(step, device, args.warmup, args.steps, CLOCKS[args.clock])
        check = loss_check(model, fwd, autocast_ctx, *batches[0])
        s = summarize(f"plain AdamW {dt}" + (" compiled" if compile_ else ""), rec, tokens, fpt, ceilings[dt], device, check)
        s.update(kind="plain", dtype=dt)
        results.append(s)
        print_row(s, flush=True)
        del opt
    del model, fwd
    if compile_:
        torch._dynamo.reset()
    free(device)
    return results


# -----------------------------------------------------------------------------
# Report


HEADER = (f"{'variant':<38}{'step ms':>9}{'(min-max)':>16}{'tok/s':>10}{'TFLOP/s':>9}{'MFU':>7}"
          f"{'fwd+bwd':>9}{'update':>8}{'constr.':>8}{'bookk.':>8}{'opt %':>7}{'mem GiB':>9}{'loss rel':>10}")


def print_row(s: dict, flush=False):
    p = s["parts_s"]
    opt = sum(v for k, v in p.items() if k != "fwd_bwd")
    tot = opt + p["fwd_bwd"]
    mem = f"{s['peak_mem_gib']:>9.2f}" if "peak_mem_gib" in s else f"{'-':>9}"
    ms = lambda v: f"{1000 * v:>8.1f}"  # noqa: E731
    span = f"({1000 * s['step_s_min']:.0f}-{1000 * s['step_s_max']:.0f})"
    print(f"{s['name']:<38}{1000 * s['step_s']:>9.1f}{span:>16}"
          f"{s['tokens_per_s']:>10.0f}{s['flop_per_s'] / 1e12:>9.3f}{100 * s['mfu']:>6.1f}%"
          f"{1000 * p['fwd_bwd']:>9.1f}{ms(p.get('update', 0.0))}{ms(p.get('constraint', 0.0))}{ms(p.get('bookkeeping', 0.0))}"
          f"{100 * opt / tot:>6.1f}%{mem}{s['loss_rel_diff']:>10.1e}" + ("" if s["loss_ok"] else "  <-- loss off"), flush=flush)


def targets(results: list[dict], dtype: str) -> list[str]:
    plain = {s["dtype"]: s for s in results if s["kind"] == "plain"}
    lines = []
    for s in results:
        if s["kind"] != "ours":
            continue
        p = s["parts_s"]
        opt = sum(v for k, v in p.items() if k != "fwd_bwd")
        frac = opt / (opt + p["fwd_bwd"])
        parts = [f"{s['constraint']} ({s['dtype']})"]
        for dt, target in (("fp32", TARGET_VS_PLAIN_FP32), ("bf16", TARGET_VS_PLAIN_BF16)):
            if dt in plain:
                r = s["tokens_per_s"] / plain[dt]["tokens_per_s"]
                s[f"vs_plain_{dt}"] = r
                ok = "ok" if r >= target else "MISSED"
                parts.append(f"{r:.2f}x plain {dt} (target >= {target}x: {ok})")
        s["opt_fraction"] = frac
        parts.append(f"updates+constraint+bookkeeping {100 * frac:.1f}% of step "
                     f"(constraint alone {100 * p.get('constraint', 0.0) / (opt + p['fwd_bwd']):.1f}%; "
                     f"target <= {100 * TARGET_OPT_FRACTION:.0f}%: {'ok' if frac <= TARGET_OPT_FRACTION else 'MISSED'})")
        lines.append(": ".join([parts[0], ", ".join(parts[1:])]))
    if dtype != "bf16":
        lines.append("(the targets are for our bf16 step; this run used --dtype " + dtype + ")")
    return lines


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", default=os.path.join(REPO, "configs", "shakespeare_char.toml"), help="TOML config of the model and batch")
    ap.add_argument("--dtype", default="bf16", choices=sorted(DTYPES), help="autocast dtype of our step")
    ap.add_argument("--plain_dtypes", default="fp32,bf16", help="comma-separated dtypes of the plain recipe ('' for none)")
    ap.add_argument("--constraints", default=DEFAULT_CONSTRAINTS, help=f"comma-separated constraints of our step, from {'|'.join(tg.CONSTRAINTS)}")
    ap.add_argument("--steps", type=int, default=10, help="timed steps per variant (the median is reported)")
    ap.add_argument("--warmup", type=int, default=3, help="untimed steps first (compilation, cold power iteration)")
    ap.add_argument("--batch", type=int, default=0, help="rows of seq_len tokens per step (default: micro_batch_tokens / seq_len)")
    ap.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N")
    ap.add_argument("--compile", action="store_true", help="torch.compile both models (as train() does on CUDA)")
    ap.add_argument("--threads", type=int, default=0, help="CPU threads (default: torch's choice)")
    ap.add_argument("--clock", default="wall", choices=sorted(CLOCKS),
                    help="CPU only: wall time, or process CPU time (robust to other load; use with --threads 1)")
    ap.add_argument("--json", default="", help="also write every figure to this JSON file")
    args = ap.parse_args(argv)
    if args.steps < 1 or args.warmup < 0 or args.batch < 0:
        ap.error(f"--steps must be >= 1 and --warmup, --batch >= 0; got {args.steps}, {args.warmup}, {args.batch}")
    args.constraints = [c for c in args.constraints.split(",") if c]
    bad = [c for c in args.constraints if c not in tg.CONSTRAINTS]
    if bad:
        ap.error(f"unknown constraint(s) {', '.join(bad)}; choose from {'|'.join(tg.CONSTRAINTS)}")
    args.plain_dtypes = [d for d in args.plain_dtypes.split(",") if d]
    bad = [d for d in args.plain_dtypes if d not in DTYPES]
    if bad:
        ap.error(f"unknown --plain_dtypes {', '.join(bad)}; choose from {', '.join(DTYPES)}")
    if not args.constraints and not args.plain_dtypes:
        ap.error("nothing to run: give --constraints or --plain_dtypes")
    if args.device == "auto":
        args.device = "cuda" if torch.cuda.is_available() else "cpu"
    if args.clock != "wall" and not args.device.startswith("cpu"):
        ap.error("--clock process measures CPU time: only for --device cpu")
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        ap.error(f"--device {args.device} but CUDA is not available here; use --device cpu")
    return args


def main(argv=None):
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    if device.type == "cuda":
        torch.cuda.set_device(device)
    try:
        cfg = tg.parse_config(["--config", args.config, "--dtype", args.dtype, "--device", str(device)])
    except tg.ConfigError as e:
        sys.exit(f"error: {e}")
    rows = args.batch or cfg.micro_batch_tokens // cfg.seq_len
    tokens = rows * cfg.seq_len
    fpt = flops_per_token(cfg)
    print(tg.system_info())
    print(f"device {device}, torch threads {torch.get_num_threads()}, compile {args.compile}, clock {args.clock}")
    print(f"config {args.config}: d {cfg.d_model}, layers {cfg.n_layer}, heads {cfg.n_head}, context {cfg.seq_len}, "
          f"vocab {cfg.vocab_size}; batch {rows} x {cfg.seq_len} = {tokens} tokens per step; "
          f"{args.warmup} warm-up + {args.steps} timed steps per variant")
    print(f"model FLOPs per token 6 N + 12 L T d = {fpt / 1e6:.2f} MFLOP ({fpt * tokens / 1e9:.1f} GFLOP per step)")
    ceilings = {}
    for dt in sorted({args.dtype, *args.plain_dtypes}):
        ceilings[dt] = matmul_rate(tokens, cfg.d_model, cfg.mlp_ratio, DTYPES[dt], device, CLOCKS[args.clock])
        print(f"matmul ceiling {dt}: ({tokens} x {cfg.d_model}) @ ({cfg.d_model} x {cfg.mlp_ratio * cfg.d_model}) "
              f"= {ceilings[dt] / 1e12:.3f} TFLOP/s (median)", flush=True)
    print("\nmedian of the timed steps; parts are medians too (their sum can differ from the step's median); "
          "opt % = (update + constraint + bookkeeping) / (the parts' sum)")
    print(HEADER, flush=True)
    results = []
    if args.constraints:
        results += bench_ours(cfg, args.constraints, rows, device, args.compile, args, fpt, ceilings[args.dtype])
    if args.plain_dtypes:
        results += bench_plain(cfg, args.plain_dtypes, rows, device, args.compile, args, fpt, ceilings)
    print("\ntargets (CPU, Shakespeare, batch 64 x 256):")
    for line in targets(results, args.dtype):
        print("  " + line)
    bad = [s["name"] for s in results if not s["loss_ok"]]
    print(f"configured-vs-eager-fp32 loss check: " + ("all within " if not bad else "OUT OF ") +
          f"{BF16_LOSS_RTOL:.0%} relative" + (f" ({', '.join(bad)})" if bad else ""))
    if args.json:
        os.makedirs(os.path.dirname(os.path.abspath(args.json)), exist_ok=True)
        with open(args.json, "w") as fh:
            json.dump({"config": args.config, "device": str(device), "torch": torch.__version__, "compile": args.compile,
                       "rows": rows, "tokens_per_step": tokens, "flops_per_token": fpt,
                       "matmul_ceiling_flop_per_s": ceilings, "results": results}, fh, indent=2)
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())

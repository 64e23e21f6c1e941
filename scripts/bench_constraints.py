"""Benchmark of every weight constraint: time per call, sigma_max after the call, cost per step.

    python scripts/bench_constraints.py                      # Shakespeare shapes + step fraction (CPU, ~2 min)
    python scripts/bench_constraints.py --shapes all         # + the 145M shapes (the 50304x768 head is slow on CPU)
    python scripts/bench_constraints.py --device cuda --shapes all
    python scripts/bench_constraints.py --shapes 64x32,32x64 --config my.toml --repeats 1 --tracking_steps 6  # a smoke run

Inputs are RMS->RMS-scaled matrices as a Muon step leaves them: singular values uniform in
[0, w_max] with the top 5% in [w_max, w_max (1 + 1.15 lr)], lr = 0.05. sigma_max after the call
is the float64 Gram eigenvalue (train_gpt.spectral_norm_exact). Power-iteration methods are timed
with their warm-started iterations (cfg.power_iters) included. The step fraction times the
projections of all matrices of configs/shakespeare_char.toml (or --config; stacked by shape, as
MatrixOptimizer does) against one forward+backward of its batch (64 x 256), in fp32.
Targets: guaranteed methods <= w_max (1 + 1e-3); soft_cap and spectral_normalize
<= 5% of a Shakespeare step on CPU; hard_cap <= 3x soft_cap.
"""

import argparse
import os
import statistics
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import train_gpt as tg  # noqa: E402

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
METHODS = list(tg.CONSTRAINTS)
SHAPES = {
    "shakespeare": [(256, 256), (1024, 256), (256, 1024), (65, 256)],
    "145m": [(768, 768), (3072, 768), (768, 3072), (50304, 768)],
}
LR, W_MAX = 0.05, 1.0
POWER_ITERS = tg.Config().power_iters  # warm-started iterations per step, the trainer's default


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def median_time(fn, device, repeats, warmup=1):
    for _ in range(warmup):
        fn()
    sync(device)
    ts = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        sync(device)
        ts.append(time.perf_counter() - t0)
    return statistics.median(ts)


def post_muon_matrix(m, n, device, seed=0):
    g = torch.Generator().manual_seed(seed)
    r = min(m, n)
    s = torch.rand(r, generator=g, dtype=torch.float64) * W_MAX
    top = max(1, r // 20)
    s[:top] = W_MAX * (1 + 1.15 * LR * torch.rand(top, generator=g, dtype=torch.float64))
    U = torch.linalg.qr(torch.randn(m, r, generator=g)).Q
    V = torch.linalg.qr(torch.randn(n, r, generator=g)).Q
    return ((U * s.float()) @ V.T).to(device)


def projector(name, M, power_iters=POWER_ITERS):
    """A closure doing what MatrixOptimizer does to one stack after the update: train_gpt.project of the
    weights W = M sqrt(d_out/d_in) whose RMS->RMS-scaled form is M, with a warm power-iteration start and
    the soft cap coupled to Muon at LR. It returns the projected W (what the trainer keeps)."""
    W = M * tg.rms_scale(M)
    state = {"v": tg.power_iteration(M, torch.randn(M.shape[:-2] + (M.size(-1),), device=M.device), 32)[2]}

    def run():
        return tg.project(W, name, W_MAX, LR, 0.1, tg.max_update_norm(LR), state["v"], power_iters)[0]
    return run


def bench_shapes(shapes, device, repeats, methods):
    print(f"\n{'method':<19}{'shape':>12}{'median ms':>12}{'sigma_max/w_max after':>24}")
    results = {}
    for m, n in shapes:
        M = post_muon_matrix(m, n, device)
        reps = repeats if m * n <= 4_000_000 else max(1, repeats // 5)
        for name in methods:
            run = projector(name, M)
            try:
                t = median_time(run, device, reps)
                after = float(tg.spectral_norm_exact(run())) / tg.rms_scale(M) / W_MAX
            except ValueError as e:  # hard_cap_poly's refusal, say
                print(f"{name:<19}{f'{m}x{n}':>12}   refused: {e}")
                continue
            results[(name, (m, n))] = t
            flag = ""
            if name in tg.GUARANTEED and after > 1 + 1e-3:
                flag = "  <-- above w_max (1 + 1e-3)"
            print(f"{name:<19}{f'{m}x{n}':>12}{1000 * t:>12.2f}{after:>24.6f}{flag}", flush=True)
    return results


def step_fraction(config, device, repeats, methods):
    """Projection time of all matrices of config's model (the Shakespeare one by default) vs one forward+backward."""
    cfg = tg.parse_config(["--config", config, "--device", str(device), "--dtype", "fp32", "--compile", "false"])
    torch.manual_seed(0)
    model = tg.GPT(cfg).to(device)
    B = cfg.micro_batch_tokens // cfg.seq_len
    idx = torch.randint(0, cfg.vocab_size, (B, cfg.seq_len), device=device)

    def fwd_bwd():
        model.zero_grad(set_to_none=True)
        model(idx, idx).backward()
    t_step = median_time(fwd_bwd, device, repeats)
    print(f"\n{os.path.basename(config)} model ({cfg.n_layer} layers, d {cfg.d_model}, batch {B}x{cfg.seq_len}, fp32): "
          f"forward+backward {1000 * t_step:.1f} ms (median of {repeats})")
    # the stacks MatrixOptimizer forms: same-shaped hidden matrices together (qkv is a (3, d, d) stack), the head alone
    by_shape = {}
    for p in model.hidden_matrices():
        by_shape.setdefault(tuple(p.shape), []).append(p.detach())
    stacks = [torch.stack(ps) for ps in by_shape.values()] + [model.head.detach()[None]]
    Ms = []
    for i, W in enumerate(stacks):
        M = torch.stack([post_muon_matrix(W.size(-2), W.size(-1), device, seed=10 * i + j)
                         for j in range(W[..., 0, 0].numel())]).reshape(W.shape)
        Ms.append(M)
    print(f"stacks: {', '.join('x'.join(map(str, M.shape)) for M in Ms)}")
    print(f"{'method':<19}{'projections ms':>16}{'% of fwd+bwd':>14}")
    out = {}
    for name in methods:
        runs = [projector(name, M, cfg.power_iters) for M in Ms]
        try:
            t = median_time(lambda: [r() for r in runs], device, repeats)
        except ValueError as e:
            print(f"{name:<19}   refused: {e}")
            continue
        out[name] = t / t_step
        print(f"{name:<19}{1000 * t:>16.2f}{100 * t / t_step:>13.1f}%", flush=True)
    return out


TRACK_BURN_IN = 5  # tracking: the first steps, while the warm start settles, are not scored


def tracking(device, lr_values=(5e-4, 1e-3, 0.02, 0.05), steps=25):
    """How far the warm-started estimate (cfg.power_iters per step) lags sigma_1 while the matrix
    takes full-rank Muon-shaped steps of RMS->RMS size lr (spectrum with a clustered top)."""
    if steps <= TRACK_BURN_IN:
        return
    iters = POWER_ITERS
    print(f"\nwarm-started power iteration ({iters} iterations/step, 256x768, top 32 singular values equal):")
    for lr in lr_values:
        g = torch.Generator().manual_seed(0)
        s = torch.cat([torch.ones(32), torch.rand(224, generator=g)])
        U = torch.linalg.qr(torch.randn(256, 256, generator=g)).Q
        V = torch.linalg.qr(torch.randn(768, 256, generator=g)).Q
        W, v, worst = ((U * s) @ V.T).to(device), torch.randn(768, generator=g).to(device), 0.0
        for t in range(steps):
            if t:
                W = W + lr * tg.msign(torch.randn(256, 768, generator=g).to(device), 5)
            _, sigma, v = tg.power_iteration(W, v, 32 if t == 0 else iters)
            if t >= TRACK_BURN_IN:
                exact = float(tg.spectral_norm_exact(W))
                worst = max(worst, (exact - float(sigma)) / exact)
        print(f"  step size {lr:<6}: worst relative underestimate of sigma_1 over steps {TRACK_BURN_IN}-{steps - 1}: {worst:.2e}")


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shapes", default="shakespeare", help="shakespeare, 145m, all, or a comma-separated list MxN,MxN")
    ap.add_argument("--config", default=os.path.join(REPO, "configs", "shakespeare_char.toml"), help="the model of the step fraction")
    ap.add_argument("--tracking_steps", type=int, default=25, help="steps of the power-iteration tracking check (<= 5: skipped)")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--methods", default=",".join(METHODS), help="comma-separated subset of " + ",".join(METHODS))
    args = ap.parse_args()
    device = torch.device(args.device)
    methods = args.methods.split(",")
    bad = [m for m in methods if m not in tg.CONSTRAINTS]
    if bad:
        ap.error(f"unknown method(s) {', '.join(bad)}; choose from {', '.join(METHODS)}")
    print(tg.system_info())
    print(f"torch {torch.__version__}, device {device}, threads {torch.get_num_threads()}")
    if args.shapes in SHAPES or args.shapes == "all":
        shapes = SHAPES["shakespeare"] + SHAPES["145m"] if args.shapes == "all" else SHAPES[args.shapes]
    else:
        try:
            shapes = [tuple(int(x) for x in s.split("x")) for s in args.shapes.split(",")]
        except ValueError:
            shapes = []
        if not shapes or not all(len(s) == 2 and min(s) > 0 for s in shapes):
            ap.error(f"--shapes {args.shapes!r}: give shakespeare, 145m, all or a list like 256x1024,65x256")
    res = bench_shapes(shapes, device, args.repeats, methods)
    frac = step_fraction(args.config, device, args.repeats, methods)
    tracking(device, steps=args.tracking_steps)
    print("\ntargets:")
    for name in ("soft_cap", "spectral_normalize"):
        if name in frac:
            print(f"  {name}: {100 * frac[name]:.1f}% of a {os.path.basename(args.config)} fwd+bwd (target <= 5%): {'ok' if frac[name] <= 0.05 else 'MISSED'}")
    if "hard_cap" in frac and "soft_cap" in frac:
        r = frac["hard_cap"] / frac["soft_cap"]
        print(f"  hard_cap / soft_cap, whole {os.path.basename(args.config)} step: {r:.1f}x (target <= 3x): {'ok' if r <= 3 else 'MISSED'}")
    for shape in shapes:
        if ("hard_cap", shape) in res and ("soft_cap", shape) in res:
            print(f"  hard_cap / soft_cap at {shape[0]}x{shape[1]}: {res[('hard_cap', shape)] / res[('soft_cap', shape)]:.1f}x")


if __name__ == "__main__":
    main()

"""The sound certificate (lipschitz_bound.py, --mode tight) of a model with every matrix at its cap.

    python scripts/certify_at_cap.py                                            # train_gpt defaults: 145M, w_max 1, s 24
    python scripts/certify_at_cap.py --config configs/paper/w8_soft_cap.toml    # a paper row's caps
    python scripts/certify_at_cap.py --n_layer 1,2,4,8,12                       # depth sweep at the config's width
    python scripts/certify_at_cap.py --save /tmp/cap.pt                         # also a checkpoint for lipschitz_bound.py
    python scripts/certify_at_cap.py --empirical --jac_lengths 8 --jac_steps 40 # and a lower bound (Jacobian search)

The model (docs/certificate.md, section 9, "tight at the cap"): the config's shape (train_gpt.Config
defaults, or --config, with --n_layer overriding the depth), every hidden matrix W (d_out x d_in) the
orthonormal factor of the QR decomposition of a float64 Gaussian matrix times w_max sqrt(d_out/d_in),
so that every singular value is at the cap (RMS->RMS norm w_max in every direction), the head likewise
at head_w_max, and every embedding row a Gaussian row scaled to RMS emb_w_max (then train_gpt.project_rows,
so no row is above it in float32). The largest bound any matrix norms under these caps can give is not
claimed; this is one model at the caps, the one section 9 reports.

It is certified with lipschitz_bound.certify (the default analysis for the config: for the 145M shape
the offset-free q-k bound and norm balls) and the output is the bound, every sub-block's factor (the
attention's split into its value and softmax terms, and which term dominates), the head's factor,
the growth per layer and the time taken (build and certificate apart). --save writes the model as a
checkpoint, so `python lipschitz_bound.py CKPT` gives the same bound. --empirical adds the Jacobian
search of lipschitz_bound.empirical_lower_bound (the model has no data, so secant and jacobian only).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import sys
import time

import torch

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)
import lipschitz_bound as lb  # noqa: E402
import train_gpt as tg  # noqa: E402


def model_at_cap(cfg, seed: int = 0) -> tg.GPT:
    """GPT(cfg) with every singular value of every hidden matrix at w_max (RMS->RMS), of the head at
    head_w_max, and every embedding row at RMS emb_w_max (float32, as a checkpoint stores them)."""
    lb.require_certifiable(cfg)
    if not cfg.head_spectral:
        raise lb.CertificateError("head_spectral = false caps the head's rows, not its singular values; "
                                  "the model at the cap is defined for a spectral head (head_spectral = true)")
    g = torch.Generator().manual_seed(seed)
    m = tg.GPT(cfg)
    with torch.no_grad():
        for name, p in m.named_parameters():
            if name == "embed.weight":
                E = torch.randn(p.shape, generator=g, dtype=torch.float64)
                E *= cfg.emb_w_max / E.pow(2).mean(-1, keepdim=True).sqrt()
                p.copy_(tg.project_rows(E.float(), cfg.emb_w_max))
                continue
            cap = cfg.head_w_max if name == "head" else cfg.w_max
            for W in (p if p.dim() == 3 else [p]):
                G = torch.randn(W.shape, generator=g, dtype=torch.float64)
                tall = G.size(0) >= G.size(1)
                Q = torch.linalg.qr(G if tall else G.T).Q  # orthonormal columns: every singular value 1
                W.copy_((Q if tall else Q.T) * (cap * tg.rms_scale(W)))
    return m


def save_checkpoint(m: tg.GPT, cfg, path: str) -> None:
    """The model as train_gpt.py writes a checkpoint (weights + config), for lipschitz_bound.py PATH."""
    tg.atomic_save({"model": m.state_dict(), "config": dataclasses.asdict(cfg), "step": 0, "format_version": 1}, path)


def summarize(cert: dict, cfg) -> dict:
    """Bound, per-layer factors (log10) and what dominates, from lipschitz_bound.certify's tight result."""
    tight = cert["modes"]["tight"] if "modes" in cert else cert
    layers = [{"layer": i} for i in range(cfg.n_layer)]
    head = None
    for r in tight["per_block"]:
        if r["block"] == "head":
            head = r["log10_gain"]
            continue
        kind, i = r["block"].split()
        row = layers[int(i)]
        row[f"log10_{kind}"] = r["log10_factor"]
        if kind == "attn":
            row["log10_act_in"] = r["log10_act_in"]
            row["log10_attn_value"], row["log10_attn_softmax"] = r["norms"]["log10_value"], r["norms"]["log10_softmax"]
            row["attn_value"], row["attn_softmax"] = lb._num(row["log10_attn_value"]), lb._num(row["log10_attn_softmax"])
            row["attn_best"] = r["norms"]["best"]
    attn = sum(r["log10_attn"] for r in layers)
    mlp = sum(r["log10_mlp"] for r in layers)
    out = {"n_layer": cfg.n_layer, "log10_tight": tight["log10_bound"], "log10_attn_total": attn, "log10_mlp_total": mlp,
           "log10_head": head, "log10_per_layer": (attn + mlp) / cfg.n_layer, "layers": layers,
           "dominates": max((("attention", attn), ("mlp", mlp), ("head", head)), key=lambda kv: kv[1])[0],
           "rope": cert["rope"], "activation_sets": cert["activation_sets"], "certify_s": cert["certify_s"]}
    if "modes" in cert:
        out.update({f"log10_{m}": cert["modes"][m]["log10_bound"] for m in ("paper", "paper_code")})
    return out


def certify_at_cap(cfg, seed: int = 0, mode: str = "all", save: str = "", empirical: dict | None = None,
                   rope: str = "auto", activation: str = "auto") -> dict:
    """Build model_at_cap(cfg, seed), certify it (rope, activation: lipschitz_bound.certify's analysis),
    and search a lower bound when empirical is a dict of lipschitz_bound.empirical_lower_bound
    arguments; returns summarize's dict with the times."""
    t0 = time.perf_counter()
    m = model_at_cap(cfg, seed)
    build_s = time.perf_counter() - t0
    if save:
        save_checkpoint(m, cfg, save)
    cert = lb.certify(m.state_dict(), cfg, mode, rope=rope, activation=activation)
    out = {"build_s": build_s, **summarize(cert, cfg)}
    if empirical is not None:
        r0 = cert["radius"]
        emp = lb.empirical_lower_bound(m, r0, **empirical)
        out.update({"log10_lower": emp["log10_empirical_lower"], "lower_found_by": emp["empirical_found_by"],
                    "lower_at": emp["empirical_at"], "empirical_s": emp["empirical_s"],
                    "lower_searches": {k: v["log10"] for k, v in emp["empirical_searches"].items()},
                    "log10_bracket": out["log10_tight"] - emp["log10_empirical_lower"]})
    return out


def format_result(res: dict, cfg) -> str:
    f = lb.fmt
    lines = [f"n_layer {res['n_layer']}, d_model {cfg.d_model}, {cfg.n_head} heads, vocab {cfg.vocab_size}; w_max {cfg.w_max:g}, "
             f"head_w_max {cfg.head_w_max:g}, emb_w_max {cfg.emb_w_max:g}, softmax_scale {cfg.softmax_scale:g}, "
             f"final_scale {cfg.final_scale:g}, arch {cfg.arch}; q-k: {res['rope']}; activation sets: {res['activation_sets']}",
             f"{'layer':>5} {'act in':>8} {'attention':>10} {'value':>9} {'softmax':>9} {'MLP':>9}  attention's best way"]
    for r in res["layers"]:
        lines.append(f"{r['layer']:>5} {f(r['log10_act_in']):>8} {f(r['log10_attn']):>10} {f(r['log10_attn_value']):>9} "
                     f"{f(r['log10_attn_softmax']):>9} {f(r['log10_mlp']):>9}  {r['attn_best']}")
    lines.append(f"head factor {f(res['log10_head'])}; all attention {f(res['log10_attn_total'])}, all MLP "
                 f"{f(res['log10_mlp_total'])} (dominates: {res['dominates']}); per layer {f(res['log10_per_layer'])} "
                 f"(log10 {res['log10_per_layer']:.4f})")
    line = f"tight {f(res['log10_tight'])} (log10 {res['log10_tight']:.4f})"
    if "log10_paper" in res:
        line += f"; paper {f(res['log10_paper'])}, paper_code {f(res['log10_paper_code'])} (unsound)"
    lines.append(line + f"; build {res['build_s']:.1f} s, certificate {res['certify_s']:.1f} s")
    if "log10_lower" in res:
        lines.append(f"lower bound {f(res['log10_lower'])} (log10 {res['log10_lower']:.4f}, {res['lower_found_by']} at "
                     f"{res['lower_at']}; {res['empirical_s']:.1f} s); bracket tight / lower {f(res['log10_bracket'])} "
                     f"(log10 {res['log10_bracket']:.4f})")
    return "\n".join(lines)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description="Certify a model with every matrix at its cap (docs/certificate.md, section 9)")
    p.add_argument("--config", default="", help="TOML config (as train_gpt.py --config; default: train_gpt's defaults, the 145M shape)")
    p.add_argument("--n_layer", default="", help="depth(s) overriding the config's, comma-separated for a sweep (e.g. 1,2,4,8,12); "
                   "a layer_pattern of another length is cleared (attention windows do not enter the certificate)")
    p.add_argument("--seed", type=int, default=0, help="seed of the Gaussian matrices")
    p.add_argument("--mode", default="all", choices=("tight", "all"), help="all: tight, and the published algorithm (paper, paper_code) beside it")
    p.add_argument("--rope", default="auto", choices=("auto", "exact", "bound"), help="as lipschitz_bound.py --rope "
                   "(auto: offset-free for the 145M shape; a sweep's shallow models would get the exact offsets)")
    p.add_argument("--activation", default="auto", choices=("auto", "ellipsoid", "scalar"), help="as lipschitz_bound.py "
                   "--activation (auto: norm balls for the 145M shape, ellipsoids up to 3 layers at width 768)")
    p.add_argument("--save", default="", help="write the model as a checkpoint here (one depth only)")
    p.add_argument("--empirical", action="store_true", help="also search a lower bound (float64 forward passes: slow at 145M)")
    p.add_argument("--searches", default="jacobian", help="with --empirical: secant and/or jacobian (comma-separated)")
    p.add_argument("--effort", type=float, default=1.0, help="with --empirical: multiplies the searches' steps")
    p.add_argument("--jac_lengths", default="8", help="with --empirical: sequence lengths of the Jacobian ascent")
    p.add_argument("--jac_starts", type=int, default=4, help="with --empirical: random starts per length")
    p.add_argument("--jac_steps", type=int, default=200, help="with --empirical: ascent steps (x effort)")
    p.add_argument("--lengths", default="2,8", help="with --empirical and secant: sequence lengths of the secant search")
    p.add_argument("--json", action="store_true", help="one JSON object per depth")
    a = p.parse_args(argv)
    try:
        cfg = tg.parse_config(["--config", a.config] if a.config else [])
        depths = [int(x) for x in a.n_layer.split(",") if x.strip()] if a.n_layer else [cfg.n_layer]
        if not depths or min(depths) < 1:
            raise ValueError
    except tg.ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except ValueError:
        print(f"error: --n_layer {a.n_layer!r}: give positive integers separated by commas, e.g. 1,2,4,8,12", file=sys.stderr)
        return 2
    if a.save and len(depths) > 1:
        print("error: --save writes one checkpoint: give one depth with it", file=sys.stderr)
        return 2
    empirical = None
    if a.empirical:
        searches = tuple(s for s in a.searches.split(",") if s)
        if not searches or any(s not in ("secant", "jacobian") for s in searches):
            print(f"error: --searches {a.searches!r}: the model at the cap has no data; choose secant and/or jacobian", file=sys.stderr)
            return 2
        try:
            jl = tuple(int(x) for x in a.jac_lengths.split(",") if x)
            ln = tuple(int(x) for x in a.lengths.split(",") if x)
        except ValueError:
            jl = ln = ()
        if not jl or not ln or min(jl + ln) < 1 or a.effort <= 0 or a.jac_starts < 1 or a.jac_steps < 1:
            print("error: --jac_lengths and --lengths take positive integers (e.g. 8,16); --effort > 0; "
                  "--jac_starts and --jac_steps >= 1", file=sys.stderr)
            return 2
        empirical = dict(searches=searches, effort=a.effort, jac_lengths=jl, lengths=ln, jac_starts=a.jac_starts,
                         jac_steps=a.jac_steps, seed=a.seed, progress=not a.json)
    for L in depths:
        try:  # a layer pattern of another depth is dropped (all layers long)
            c = dataclasses.replace(cfg, n_layer=L, layer_pattern=cfg.layer_pattern if len(cfg.layer_pattern) == L else "")
            res = certify_at_cap(c, a.seed, a.mode, a.save, empirical, a.rope, a.activation)
        except (tg.ConfigError, lb.CertificateError) as e:
            print(f"error: {e}", file=sys.stderr)
            return 2
        if a.json:
            print(json.dumps(lb.jsonable({"config": a.config or "train_gpt defaults", **res})), flush=True)
        else:
            print(format_result(res, c) + "\n", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())

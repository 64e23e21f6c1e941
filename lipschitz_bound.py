"""Certified Lipschitz bounds of a train_gpt.py checkpoint, and an empirical check that they hold.

    python lipschitz_bound.py logs/<run>/ckpt_final.pt                      # every mode, as a table
    python lipschitz_bound.py logs/<run>/ckpt_final.pt --mode tight --empirical
    python lipschitz_bound.py logs/<run>/ckpt_final.pt --json

What is certified (docs/certificate.md has the proofs). The map F from embedding outputs to logits:
causal attention with RoPE, GELU MLPs, residuals skip x + branch f(x) (train_gpt.residual_coeffs: convex
for arch lipschitz, plain for plain_residual), head and final_scale, for any sequence
length up to seq_len, in exact arithmetic (the bf16 autocast forward and the fp32 RoPE tables are
outside the claim). Norms: an input X = (x_1..x_T) has |X| = max_t RMS(x_t); the domain is
{X : |X| <= r0}, r0 = max(emb_w_max, largest stored embedding row RMS), which holds every sequence
of embedding rows. Logits are measured by max_t RMS over the vocabulary (multiply by sqrt(vocab_size)
for max_t l2). The bound L satisfies |F(X) - F(Y)| <= L |X - Y| for all X, Y in the domain.

Modes
- paper: the published algorithm (arXiv 2507.13338, Appendix B): whole-matrix RMS->RMS norms, attention
  (|W_o|/3)|W_v|(1 + 2 s a^2 |W_q||W_k|), MLP |W_out||W_in|/1.1289. It is NOT an upper bound in
  general: with several heads a head's slice can be sqrt(n_head) times the whole vector (up to an
  n_head^1.5 factor on the logit term), and its MLP constant divides by GELU's slope twice (gelu/1.1289
  is 1-Lipschitz, not 1/1.1289-Lipschitz). `paper_code` is the published code's variant: s multiplies
  the whole attention term and final_scale is ignored.
- tight: sound for any number of heads. Per head h: P_h = W_o^h W_v^h, m_h = max over relative
  positions delta of sigma(W_q^h^T R_delta W_k^h) (RoPE rotations R_delta; falls back to
  sigma(W_q^h) sigma(W_k^h) for large models), c_h = 2 s n_head a^2 m_h (s n_head a^2 is s/d_head
  times the squared l2 radius d a^2). The attention Jacobian is at most
  f x min( sum_h sigma(P_h)(1 + c_h),  sigma(W_o) sqrt(sum_h sigma(W_v^h)^2 (1 + c_h)^2),
  sqrt(n_head) sigma([P_1 (1 + c_1) ... P_H (1 + c_H)]),  value term + softmax term bounded apart ),
  with f = train_gpt.attn_out_factor (1/3; 1 for plain_residual), where the softmax term may also
  use the heads' shared query (Cauchy-Schwarz over heads): 2 s n_head a^2 sigma(W_q) sigma([sigma(W_k^1) P_1 ... sigma(W_k^H) P_H]);
  the MLP Jacobian at most |W_out||W_in| (RMS->RMS); the head sigma(head) sqrt(d/V) final_scale.
  Activation bounds a follow the same per-head value bounds. With one head tight <= paper with
  the MLP constant corrected (`log10_bound_mlp_corrected`).

Every matrix norm is a guaranteed upper bound: float64 Gram eigenvalues (train_gpt.spectral_norm_exact)
plus a priori float64 rounding bounds, never power iteration. Bounds are carried as log10, so 10^264
prints as such. `--empirical` searches (Adam ascent from many starts, float64 model) for pairs X, Y in
the domain with a large |F(X) - F(Y)| / |X - Y| in the same norms: a lower bound on the true constant.
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import sys
import time

import torch

from train_gpt import (GELU_MAX_SLOPE, GPT, CheckpointError, ConfigError, apply_rope, attn_out_factor,
                       config_from_checkpoint, load_checkpoint, residual_coeffs, rms_scale, rope_tables,
                       spectral_norm_exact)

MODES = ("paper", "paper_code", "tight")
UNIT_ROUNDOFF = 2.0 ** -53        # float64
EIG_BACKWARD_CONST = 10.0         # LAPACK syevd backward error |E| <= c n u |G|; c = 10 is a generous constant
ROUNDING_SAFETY = 16.0            # multiplies the a priori gamma_k bounds of chained float64 products
ROPE_EXACT_MAX_WORK = 2e4         # n_layer * n_head * seq_len up to which m_h is maximized over RoPE offsets
LN10 = math.log(10.0)


class CertificateError(ValueError):
    pass


def _gamma(k: int) -> float:
    """Higham's gamma_k = k u / (1 - k u): relative error bound of a float64 dot product of length k."""
    return k * UNIT_ROUNDOFF / (1 - k * UNIT_ROUNDOFF)


def _log(x: float) -> float:
    return math.log(x) if x > 0 else -math.inf


def _lse(logs) -> float:
    """log(sum(exp(logs))), -inf for an empty or all -inf input."""
    logs = [v for v in logs if v != -math.inf]
    if not logs:
        return -math.inf
    m = max(logs)
    return m + math.log(sum(math.exp(v - m) for v in logs))


def _log1p_exp(x: float) -> float:
    """log(1 + e^x)."""
    return _lse([0.0, x])


# -----------------------------------------------------------------------------
# Guaranteed upper bounds on spectral norms


def sigma_upper(W: torch.Tensor, abs_err: float = 0.0) -> float:
    """Upper bound on sigma_max of the exact matrix W (plus abs_err, a bound on how far W is from
    the matrix meant). float64 Gram eigenvalue (train_gpt.spectral_norm_exact), inflated by the Gram
    product's rounding gamma_k |W|_F^2 (k = the summed dimension) and the eigensolver's backward error."""
    W = W.detach().double()
    if W.numel() == 0:
        return abs_err
    lam = float(spectral_norm_exact(W)) ** 2
    k, r = max(W.shape[-2:]), min(W.shape[-2:])
    fro2 = float(W.pow(2).sum()) * (1 + _gamma(W.numel()))
    lam_up = lam * (1 + EIG_BACKWARD_CONST * r * UNIT_ROUNDOFF) + _gamma(k) * fro2 + 4 * UNIT_ROUNDOFF * lam
    return math.sqrt(lam_up) * (1 + 2 * UNIT_ROUNDOFF) + abs_err


def _product_err(A: torch.Tensor, B: torch.Tensor) -> float:
    """Bound on |fl(A B) - A B|_2 for float64 products: gamma_k |A|_F |B|_F (with a safety factor)."""
    return ROUNDING_SAFETY * _gamma(A.size(-1)) * float(A.norm()) * float(B.norm())


def rope_tables64(seq_len: int, head_dim: int):
    """RoPE cos/sin in float64 (the trainer uses float32): the exact rotations the certificate is about."""
    return rope_tables(seq_len, head_dim, torch.float64)


def qk_offset_norms(Wq: torch.Tensor, Wk: torch.Tensor, seq_len: int) -> torch.Tensor:
    """sigma(M_delta) for delta = t - s = 0..seq_len-1, M_delta the bilinear form of one head's logit
    (R_t W_q x_t) . (R_s W_k x_s) = x_t^T M_delta x_s (RoPE makes it depend on t - s only).

    With the LQ factors W = L Q (Q orthonormal rows), sigma(W_q^T R W_k) = sigma(L_q^T R L_k), so only
    (d_head x d_head) matrices are formed. Not yet inflated for rounding (see head_qk_bound)."""
    dh = Wq.size(0)
    Lq = torch.linalg.qr(Wq.double().T).R.T  # (dh, dh), Wq = Lq Q^T
    Lk = torch.linalg.qr(Wk.double().T).R.T
    cos, sin = rope_tables64(seq_len, dh)
    # logit(t, s) = (R_t Lq u)^T (R_s Lk w); with s = 0 (R_0 = I) and t = delta: Lq^T R_delta^T Lk
    cols_q = Lq.T.unsqueeze(0).expand(seq_len, dh, dh).transpose(0, 1)  # (dh "batch" = columns, T, dh)
    Rq = apply_rope(cols_q.unsqueeze(2), cos, sin).squeeze(2)           # each column of Lq rotated to position t
    M = Rq.permute(1, 0, 2) @ Lk                                        # (T, dh, dh): (R_t Lq)^T Lk
    return spectral_norm_exact(M)


def head_qk_bound(Wq_h: torch.Tensor, Wk_h: torch.Tensor, seq_len: int, exact_rope: bool, sq: float, sk: float) -> float:
    """m_h >= max_delta sigma(W_q^h^T R_delta W_k^h); never above the product of the slices' bounds."""
    prod = sq * sk
    if not exact_rope:
        return prod
    s = float(qk_offset_norms(Wq_h, Wk_h, seq_len).max())
    d, dh = Wq_h.size(1), Wq_h.size(0)
    err = ROUNDING_SAFETY * _gamma(d + 2 * dh) * float(Wq_h.double().norm()) * float(Wk_h.double().norm())
    return min(prod, s * (1 + EIG_BACKWARD_CONST * dh * UNIT_ROUNDOFF) + err)


# -----------------------------------------------------------------------------
# Norms of a checkpoint


def _config(config) -> "object":
    if isinstance(config, dict):
        try:
            return config_from_checkpoint({"config": config}, "config")
        except CheckpointError as e:
            raise CertificateError(str(e)) from None
    return config


def _check_state(sd: dict, cfg) -> None:
    """The state dict has exactly the tensors (names and shapes) of GPT(cfg), all finite."""
    with torch.device("meta"):  # shapes only, no memory
        want = {k: tuple(v.shape) for k, v in GPT(cfg).state_dict().items()}
    for k, shape in want.items():
        if k not in sd:
            raise CertificateError(f"state dict has no '{k}': not a checkpoint of this config (n_layer={cfg.n_layer}); "
                                   "certify a checkpoint written by train_gpt.py")
        if tuple(sd[k].shape) != shape:
            raise CertificateError(f"'{k}' has shape {tuple(sd[k].shape)} but the config implies {shape}")
        if not torch.isfinite(sd[k]).all():
            raise CertificateError(f"'{k}' holds non-finite values: the run diverged; no certificate exists")


def collect_norms(sd: dict, cfg, exact_rope: bool) -> dict:
    """Every quantity the bounds use, as guaranteed upper bounds (RMS->RMS where a norm is logged).

    Returns {"norms": {name: RMS->RMS norm, keys as train_gpt.matrix_norms}, "layers": [per-layer dict],
    "head": RMS->RMS head norm, "emb": max embedding row RMS}."""
    H, d = cfg.n_head, cfg.d_model
    dh = d // H
    emb = sd["embed.weight"].detach().double()
    emb_rms = float(emb.pow(2).mean(-1).sqrt().max()) * (1 + _gamma(d + 2))
    norms = {"embed.max_row_rms": emb_rms}
    layers = []
    for i in range(cfg.n_layer):
        p = f"blocks.{i}."
        qkv = sd[p + "attn.qkv"].detach().double()
        Wq, Wk, Wv = qkv[0], qkv[1], qkv[2]
        Wo = sd[p + "attn.proj"].detach().double()
        fc, pr = sd[p + "mlp.fc"].detach().double(), sd[p + "mlp.proj"].detach().double()
        s = {n: sigma_upper(W) for n, W in (("q", Wq), ("k", Wk), ("v", Wv), ("o", Wo))}
        fc_rr, pr_rr = sigma_upper(fc) / rms_scale(fc), sigma_upper(pr) / rms_scale(pr)
        for n in "qkv":
            norms[f"{p}attn.{n}"] = s[n]  # square: RMS->RMS = sigma
        norms[p + "attn.proj"], norms[p + "mlp.fc"], norms[p + "mlp.proj"] = s["o"], fc_rr, pr_rr
        heads = []
        for h in range(H):
            sl = slice(h * dh, (h + 1) * dh)
            sq, sk, sv = (min(s[n], sigma_upper(W[sl])) for n, W in (("q", Wq), ("k", Wk), ("v", Wv)))
            so = min(s["o"], sigma_upper(Wo[:, sl]))
            perr = _product_err(Wo[:, sl], Wv[sl])
            heads.append({"sigma_q": sq, "sigma_k": sk, "sigma_v": sv, "sigma_o": so,
                          "sigma_ov": min(so * sv, sigma_upper(Wo[:, sl] @ Wv[sl], perr)),
                          "m_qk": head_qk_bound(Wq[sl], Wk[sl], cfg.seq_len, exact_rope, sq, sk),
                          "Wo_h": Wo[:, sl], "Wv_h": Wv[sl], "P_err": perr})
        layers.append({"sigma": s, "fc": fc_rr, "proj": pr_rr, "heads": heads})
    head = sd["head"].detach().double()
    norms["head"] = sigma_upper(head) / rms_scale(head)
    return {"norms": norms, "layers": layers, "head": norms["head"], "emb": emb_rms}


def _log_concat_sigma(heads: list, log_w: list) -> float:
    """log sigma([w_1 P_1, ..., w_H P_H]) (P_h the d x d products, w_h = exp(log_w[h])) as an upper
    bound: lambda_max(sum_h w_h^2 P_h P_h^T), rescaled by the largest weight, plus rounding bounds."""
    top = max(log_w)
    if top == -math.inf:
        return -math.inf
    w = [math.exp(lw - top) for lw in log_w]
    P = [h["Wo_h"] @ h["Wv_h"] for h in heads]  # fl(P_h), within P_err of P_h
    G = sum(wi * wi * (Ph @ Ph.T) for wi, Ph in zip(w, P))
    d = G.size(0)
    lam = float(torch.linalg.eigvalsh(G)[-1].clamp_min(0))
    fro2 = sum(wi * wi * float(Ph.pow(2).sum()) for wi, Ph in zip(w, P))
    lam_up = lam * (1 + EIG_BACKWARD_CONST * d * UNIT_ROUNDOFF) + ROUNDING_SAFETY * _gamma(d + len(heads)) * fro2
    err = math.sqrt(sum((wi * h["P_err"]) ** 2 for wi, h in zip(w, heads)))  # distance of fl(P_h) from P_h
    return top + _log(math.sqrt(lam_up) + err)


# -----------------------------------------------------------------------------
# The bounds (natural logs inside, log10 outside)


def _attn_tight(layer: dict, cfg, log_a: float) -> tuple[float, float, dict]:
    """(log gain, log Lipschitz, details) of one attention sub-block for inputs of norm <= e^log_a."""
    H, heads, s = cfg.n_head, layer["heads"], layer["sigma"]
    log_f = math.log(attn_out_factor(cfg))
    log_c = [_log(2 * cfg.softmax_scale * H) + 2 * log_a + _log(h["m_qk"]) for h in heads]  # softmax terms
    log_1c = [_log1p_exp(c) for c in log_c]
    log_ov = [_log(h["sigma_ov"]) for h in heads]
    log_v = [_log(h["sigma_v"]) for h in heads]

    def three(weights):  # the three ways to add heads up, each valid; weights = log of per-head factors
        sum_heads = _lse([o + w for o, w in zip(log_ov, weights)])
        via_wo = _log(s["o"]) + 0.5 * _lse([2 * (v + w) for v, w in zip(log_v, weights)])
        concat = 0.5 * math.log(H) + _log_concat_sigma(heads, weights)
        return {"sum_heads": sum_heads, "via_Wo": via_wo, "concat": concat}

    value = three([0.0] * H)
    soft = three(log_c)
    # the heads share one query: sum_h |W_q^h x_t|^2 = |W_q x_t|^2, so by Cauchy-Schwarz over heads the
    # softmax terms add up to 2 s n_head a^2 sigma(W_q) sigma([sigma_k^1 P_1 ... sigma_k^H P_H])
    soft["shared_query"] = (_log(2 * cfg.softmax_scale * H) + 2 * log_a + _log(s["q"])
                            + _log_concat_sigma(heads, [_log(h["sigma_k"]) for h in heads]))
    comb = three(log_1c)
    log_gain = log_f + min(value.values())
    options = dict(comb)
    options["value+softmax"] = _lse([min(value.values()), min(soft.values())])
    log_L = log_f + min(options.values())
    det = {"best": min(options, key=options.get) if options["value+softmax"] > min(options.values())
           else f"{min(value, key=value.get)}+{min(soft, key=soft.get)}", "max_m_qk": max(h["m_qk"] for h in heads),
           "max_sigma_ov": max(h["sigma_ov"] for h in heads), "sigma_o": s["o"],
           "max_sigma_v_head": max(h["sigma_v"] for h in heads)}
    return log_gain, log_L, det


def _bound(pre: dict, cfg, mode: str) -> dict:
    """Compose the per-sub-block bounds of `mode` into the network's bound, in log space."""
    skip, branch = residual_coeffs(cfg)  # x <- skip x + branch f(x)
    la, lb = math.log(skip), math.log(branch)
    r0 = max(cfg.emb_w_max, pre["emb"])
    log_a = math.log(r0)
    total = 0.0          # log of the running Lipschitz bound (map from embedding outputs: starts at 1)
    total_fix = 0.0      # paper with the MLP constant corrected
    rows = []
    for i, layer in enumerate(pre["layers"]):
        s = layer["sigma"]
        for kind in ("attn", "mlp"):
            if kind == "attn":
                if mode == "tight":
                    log_g, log_L, det = _attn_tight(layer, cfg, log_a)
                    used = det
                else:
                    log_ov = _log(s["o"]) + _log(s["v"]) + math.log(attn_out_factor(cfg))
                    log_g = log_ov
                    if mode == "paper":
                        log_L = log_ov + _log1p_exp(_log(2 * cfg.softmax_scale) + 2 * log_a + _log(s["q"]) + _log(s["k"]))
                    else:  # paper_code: s multiplies the whole attention term
                        log_L = math.log(cfg.softmax_scale) + log_ov + _log1p_exp(math.log(2) + 2 * log_a + _log(s["q"]) + _log(s["k"]))
                    used = {"Wq": s["q"], "Wk": s["k"], "Wv": s["v"], "Wo": s["o"]}
                log_L_fix = log_L
            else:
                log_w = _log(layer["proj"]) + _log(layer["fc"])
                log_g = log_w - math.log(GELU_MAX_SLOPE)  # |gelu(x)| <= |x|
                log_L_fix = log_w                          # gelu / GELU_MAX_SLOPE is 1-Lipschitz
                log_L = log_w - math.log(GELU_MAX_SLOPE) if mode != "tight" else log_w  # published: divides again
                used = {"W_in": layer["fc"], "W_out": layer["proj"]}
            total += _lse([la, lb + log_L])
            total_fix += _lse([la, lb + log_L_fix])
            rows.append({"block": f"{kind} {i}", "norms": used, "log10_act_in": log_a / LN10,
                         "log10_gain": log_g / LN10, "log10_lipschitz": log_L / LN10, "log10_total": total / LN10})
            log_a = log_a + _lse([la, lb + log_g])
    log_head = _log(pre["head"]) + _log(cfg.final_scale if mode != "paper_code" else 1.0)
    total += log_head
    total_fix += log_head
    rows.append({"block": "head", "norms": {"head": pre["head"], "final_scale": cfg.final_scale},
                 "log10_act_in": log_a / LN10, "log10_gain": log_head / LN10, "log10_lipschitz": log_head / LN10,
                 "log10_total": total / LN10})
    out = {"mode": mode, "log10_bound": total / LN10, "bound": _num(total / LN10), "per_block": rows,
           "log10_act_bound": log_a / LN10}
    if mode == "tight":
        out["sound"], out["unsound_reasons"] = True, []
    else:
        reasons = ["MLP Lipschitz constant divided by GELU_MAX_SLOPE although gelu/GELU_MAX_SLOPE is 1-Lipschitz"]
        if cfg.n_head > 1:
            reasons.append(f"whole-vector norms with {cfg.n_head} heads: per-head slices and concatenation are not covered")
        if mode == "paper_code" and cfg.final_scale > 1:
            reasons.append(f"final_scale {cfg.final_scale} ignored")
        out["sound"], out["unsound_reasons"] = False, reasons
        out["log10_bound_mlp_corrected"] = total_fix / LN10
    return out


def _num(log10: float):
    """The number 10^log10 where a float holds it, else None (the log10 field carries it)."""
    if log10 == -math.inf:
        return 0.0
    return 10.0 ** log10 if log10 < 307 else None


def fmt(log10: float) -> str:
    if log10 == -math.inf:
        return "0"
    if abs(log10) < 5:
        return f"{10 ** log10:.4g}"
    return f"10^{log10:.2f}"


# -----------------------------------------------------------------------------
# Public API


def certify(state_dict: dict, config, mode: str = "all", empirical: bool = False, rope: str = "auto",
            effort: float = 1.0, seed: int = 0) -> dict:
    """Certificate of a model given as weights + config (a Config or its asdict).

    mode: paper | paper_code | tight | all. rope: exact (maximize m_h over RoPE offsets), bound (use
    sigma(W_q^h) sigma(W_k^h)) or auto (exact when n_layer * n_head * seq_len <= ROPE_EXACT_MAX_WORK).
    With empirical=True, also a searched lower bound (effort scales its starts and steps)."""
    cfg = _config(config)
    if mode not in MODES + ("all",):
        raise CertificateError(f"mode {mode!r} is not one of {', '.join(MODES + ('all',))}")
    if rope not in ("auto", "exact", "bound"):
        raise CertificateError(f"rope {rope!r} is not one of auto, exact, bound")
    if cfg.arch == "baseline":
        raise CertificateError(f"arch={cfg.arch}: only the Lipschitz architectures are certified (the baseline's "
                               "RMSNorm and QK-norm have no global Lipschitz bound)")
    _check_state(state_dict, cfg)
    exact_rope = rope == "exact" or (rope == "auto" and cfg.n_layer * cfg.n_head * cfg.seq_len <= ROPE_EXACT_MAX_WORK)
    t0 = time.perf_counter()
    pre = collect_norms(state_dict, cfg, exact_rope)
    results = {m: _bound(pre, cfg, m) for m in (MODES if mode == "all" else (mode,))}
    main_mode = "tight" if mode == "all" else mode
    out = dict(results[main_mode])
    out["mode"] = mode
    if mode == "all":
        out["modes"] = results
    out["norms"] = pre["norms"]
    r0 = max(cfg.emb_w_max, pre["emb"])
    out["domain"] = (f"sequences of 1..{cfg.seq_len} vectors in R^{cfg.d_model}, each of RMS norm <= r0 = {r0:.6g} "
                     "(emb_w_max, or the largest embedding row if above); norm max_t RMS(x_t)")
    out["output_norm"] = (f"logits, max_t RMS over the {cfg.vocab_size} vocabulary entries "
                          f"(x sqrt({cfg.vocab_size}) for max_t l2)")
    out["radius"] = r0
    out["rope"] = "max over RoPE offsets" if exact_rope else "sigma(W_q^h) sigma(W_k^h) (offset-free)"
    out["arithmetic"] = "exact (bf16 autocast and fp32 RoPE tables of the trainer are outside the claim)"
    out["certify_s"] = time.perf_counter() - t0
    if empirical:
        model = GPT(cfg)
        model.load_state_dict(state_dict)
        emp = empirical_lower_bound(model, r0, effort=effort, seed=seed)
        out.update(emp)
        for res in ([out] + list(results.values()) if mode == "all" else [out]):
            res["looseness"] = _num(res["log10_bound"] - emp["log10_empirical_lower"])
            res["log10_looseness"] = res["log10_bound"] - emp["log10_empirical_lower"]
    return out


def certify_checkpoint(path: str, mode: str = "all", empirical: bool = False, rope: str = "auto",
                       effort: float = 1.0, seed: int = 0) -> dict:
    """Certificate of a checkpoint file (loaded with weights_only=True via train_gpt.load_checkpoint).

    A checkpoint of an architecture without a certificate gives {"certified": False, "reason": ...}."""
    ck = load_checkpoint(path)
    cfg = config_from_checkpoint(ck, path)
    if cfg.arch == "baseline":
        return {"certified": False, "reason": f"arch={cfg.arch} has no Lipschitz certificate", "path": path}
    try:
        out = certify(ck["model"], cfg, mode=mode, empirical=empirical, rope=rope, effort=effort, seed=seed)
    except CertificateError as e:
        raise CertificateError(f"{path}: {e}") from None
    out["certified"], out["path"], out["step"] = True, path, ck.get("step")
    return out


def summary_line(cert: dict) -> str:
    """One line: tight and paper bounds (number and log10), empirical lower bound if any."""
    if not cert.get("certified", True):
        return f"certificate: none ({cert.get('reason', 'not certified')})"
    modes = cert.get("modes", {cert.get("mode", "?"): cert})
    parts = []
    for m in ("tight", "paper", "paper_code"):
        if m in modes:
            lg = modes[m]["log10_bound"]
            flag = "" if modes[m].get("sound", True) else " (unsound)"
            shown = fmt(lg)
            parts.append(f"{m} {shown}" + ("" if shown.startswith("10^") else f" (10^{lg:.2f})") + flag)
    if "log10_empirical_lower" in cert:
        parts.append(f"empirical >= {fmt(cert['log10_empirical_lower'])}")
    return "certificate: " + ", ".join(parts) + "; embedding outputs -> logits, max-position RMS norms"


# -----------------------------------------------------------------------------
# Empirical lower bound


def forward_embeddings(model: GPT, X: torch.Tensor) -> torch.Tensor:
    """Logits of the model from embedding outputs X (B, T, d), with exact (float64) RoPE tables."""
    cos, sin = rope_tables64(X.size(1), model.cfg.d_model // model.cfg.n_head)
    return model.logits_from_embeddings(X, cos.to(X), sin.to(X))


def seq_norm(X: torch.Tensor) -> torch.Tensor:
    """max over positions of the RMS over features: (B, T, n) -> (B,)."""
    return X.pow(2).mean(-1).sqrt().amax(-1)


def _project(X: torch.Tensor, r0: float) -> torch.Tensor:
    rms = X.pow(2).mean(-1, keepdim=True).sqrt()
    return X * torch.clamp(r0 / rms.clamp_min(1e-300), max=1.0)


def empirical_lower_bound(model: GPT, r0: float, effort: float = 1.0, seed: int = 0,
                          lengths=(2, 8, 32, 64), scales=(1e-4, 0.5), starts: int = 4,
                          steps: int = 60) -> dict:
    """Largest |F(X) - F(Y)| / |X - Y| found over X, Y in the domain (every position RMS <= r0), by Adam
    ascent of the log ratio from many random starts on the sphere, for each sequence length and
    each perturbation size eps r0. The ratio is evaluated exactly on the final projected points, so
    the result is a lower bound on the Lipschitz constant in the certificate's norms."""
    cfg = model.cfg
    m = copy.deepcopy(model).double().eval()
    for p in m.parameters():
        p.requires_grad_(False)
    gen = torch.Generator().manual_seed(seed)
    n_starts, n_steps = max(1, int(round(starts * effort))), max(1, int(round(steps * effort)))
    best, where = 0.0, None
    t0 = time.perf_counter()
    for T in [t for t in lengths if t <= cfg.seq_len]:
        for eps in scales:
            X = torch.randn(n_starts, T, cfg.d_model, generator=gen, dtype=torch.float64)
            X = (X / X.pow(2).mean(-1, keepdim=True).sqrt() * r0).requires_grad_(True)
            U = torch.randn(n_starts, T, cfg.d_model, generator=gen, dtype=torch.float64).requires_grad_(True)
            opt = torch.optim.Adam([X, U], lr=0.05 * r0)
            for it in range(n_steps + 1):
                Xp = _project(X, r0)
                D = U / U.pow(2).mean(-1, keepdim=True).sqrt().clamp_min(1e-300) * (eps * r0)  # every position at eps r0
                Yp = _project(Xp + D, r0)
                num = seq_norm(forward_embeddings(m, Yp) - forward_embeddings(m, Xp))
                den = seq_norm(Yp - Xp)
                ok = den > 0
                ratio = torch.where(ok, num / den.clamp_min(1e-300), torch.zeros_like(num))
                r = float(ratio.detach().max())
                if r > best:
                    best, where = r, {"seq_len": T, "eps": eps}
                if it == n_steps:
                    break
                opt.zero_grad()
                (-torch.log(ratio[ok].clamp_min(1e-300)).sum()).backward()
                opt.step()
    return {"empirical_lower": best, "log10_empirical_lower": _log(best) / LN10, "empirical_at": where,
            "empirical_s": time.perf_counter() - t0, "empirical_starts": n_starts, "empirical_steps": n_steps}


# -----------------------------------------------------------------------------
# Command line


def format_table(res: dict) -> str:
    lines = [f"mode {res['mode']}: " + ("sound" if res.get("sound", True) else "NOT an upper bound in general: "
                                         + "; ".join(res.get("unsound_reasons", [])))]
    lines.append(f"{'sub-block':<10} {'act in':>10} {'gain':>10} {'Lipschitz':>12} {'total':>12}  norms used")
    for r in res["per_block"]:
        used = ", ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in r["norms"].items())
        lines.append(f"{r['block']:<10} {fmt(r['log10_act_in']):>10} {fmt(r['log10_gain']):>10} "
                     f"{fmt(r['log10_lipschitz']):>12} {fmt(r['log10_total']):>12}  {used}")
    lines.append(f"bound ({res['mode']}): {fmt(res['log10_bound'])}  (log10 {res['log10_bound']:.4f})")
    if "log10_bound_mlp_corrected" in res:
        lines.append(f"  with the MLP constant corrected: {fmt(res['log10_bound_mlp_corrected'])}")
    return "\n".join(lines)


def _jsonable(obj):
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else str(obj)
    if isinstance(obj, dict):
        return {k: _jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_jsonable(v) for v in obj]
    return obj


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description="Certified Lipschitz bound (embedding outputs -> logits) of a "
                                "train_gpt.py checkpoint; see docs/certificate.md")
    p.add_argument("checkpoint", help="ckpt_final.pt or ckpt_step*.pt written by train_gpt.py")
    p.add_argument("--mode", default="all", choices=MODES + ("all",), help="which bound(s)")
    p.add_argument("--empirical", action="store_true", help="also search for a lower bound (float64, CPU)")
    p.add_argument("--effort", type=float, default=1.0, help="multiplies the search's starts and steps")
    p.add_argument("--seed", type=int, default=0, help="seed of the search")
    p.add_argument("--rope", default="auto", choices=("auto", "exact", "bound"),
                   help="per-head q-k norm: maximized over RoPE offsets (exact) or sigma_q sigma_k (bound)")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    a = p.parse_args(argv)
    try:
        cert = certify_checkpoint(a.checkpoint, a.mode, a.empirical, a.rope, a.effort, a.seed)
    except (CheckpointError, CertificateError, ConfigError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if not cert.get("certified", True):
        print(f"error: {a.checkpoint}: {cert['reason']}", file=sys.stderr)
        return 2
    if a.json:
        print(json.dumps(_jsonable(cert)))
        return 0
    print(f"checkpoint {a.checkpoint} (step {cert.get('step')})")
    print(f"map: embedding outputs -> logits; input domain: {cert['domain']}")
    print(f"output norm: {cert['output_norm']}; arithmetic: {cert['arithmetic']}; q-k: {cert['rope']}")
    for res in (cert["modes"].values() if "modes" in cert else [cert]):
        print()
        print(format_table(res))
    if "log10_empirical_lower" in cert:
        print()
        print(f"empirical lower bound: {fmt(cert['log10_empirical_lower'])} (log10 {cert['log10_empirical_lower']:.4f}; "
              f"{cert['empirical_starts']} starts x {cert['empirical_steps']} steps, {cert['empirical_s']:.1f}s, "
              f"best at {cert['empirical_at']})")
        for res in (cert["modes"].values() if "modes" in cert else [cert]):
            print(f"  looseness {res['mode']}: certificate / empirical = {fmt(res['log10_looseness'])}")
    print()
    print(summary_line(cert))
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Certified Lipschitz bounds of a train_gpt.py checkpoint, and an empirical check that they hold.

    python lipschitz_bound.py logs/<run>/ckpt_final.pt                      # every mode, as a table
    python lipschitz_bound.py logs/<run>/ckpt_final.pt --mode tight --empirical
    python lipschitz_bound.py logs/<run>/ckpt_final.pt --json
    python lipschitz_bound.py --norms logs/<run>/metrics.jsonl            # published algorithm from logged norms
    python lipschitz_bound.py --at_cap --config configs/paper/w8_soft_cap.toml   # ... with every matrix at its cap

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
  the MLP Jacobian at most |W_out||W_in| (RMS->RMS), and the MLP with its skip jointly at most
  sigma(skip I + branch/(2c) W_out W_in) + branch (c - 1/2)/c |W_out||W_in| (c = GELU_MAX_SLOPE: gelu'
  lies in [1 - c, c]); the head sigma(head) sqrt(d/V) final_scale. Activation bounds a follow the same
  per-head value bounds and, with --activation ellipsoid (auto: small models), ellipsoids that hold
  every position's residual vector (weighted Minkowski sums), which also bound each head's query,
  key and value norms in the softmax term. With one head tight <= paper with the MLP constant
  corrected (`log10_bound_mlp_corrected`).
- --norms / --at_cap: paper and paper_code from per-matrix RMS->RMS norms alone (a run's metrics.jsonl, a
  JSON object of norms, a log of the reference's NanoGPT scripts, or every matrix at its cap), so the
  published column can be rebuilt from logs; tight needs the weights.

Every matrix norm is a guaranteed upper bound: float64 Gram eigenvalues (train_gpt.spectral_norm_exact)
plus a priori float64 rounding bounds, never power iteration. Bounds are carried as log10, so 10^264
prints as such. `--empirical` (minutes; progress bar on stderr) searches for a lower bound on the true
constant in the same norms (float64 model): secants |F(X) - F(Y)| / |X - Y| by Adam ascent, and local
constants |J_F(X) v| / |v| by the power method of the max-position norms (jvp/vjp) at random points,
at validation windows (full context) and at points grown from them by ascent; every value is evaluated
at its final point, and the search that found the maximum is reported.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import json
import math
import os
import re
import sys
import time

import torch

from train_gpt import (FINAL_CKPT, GELU_MAX_SLOPE, GPT, UNCONSTRAINED_ARCHS, CheckpointError, ConfigError, DataError, apply_rope,
                       atomic_save, attn_out_factor, attn_scale, config_from_checkpoint, config_from_dict,
                       load_checkpoint, load_val_tokens, named_matrices, parse_config, residual_coeffs, rms_scale, rope_tables,
                       _wide)

MODES = ("paper", "paper_code", "tight")
UNIT_ROUNDOFF = 2.0 ** -53        # float64
EIG_BACKWARD_CONST = 10.0         # LAPACK syevd backward error |E| <= c n u |G|; c = 10 is a generous constant
ROUNDING_SAFETY = 16.0            # multiplies the a priori gamma_k bounds of chained float64 products
ROPE_EXACT_MAX_WORK = 2e4         # n_layer * n_head * seq_len up to which m_h is maximized over RoPE offsets
LN10 = math.log(10.0)
ELLIPSOID_MAX_WORK = 2e6          # n_layer * d_model^2 up to which activation sets are ellipsoids (activation="auto")
MINKOWSKI_EVALS = 24              # eigenvalue evaluations spent choosing the weights of one Minkowski sum
CHOL_JITTER_MIN = 1e-8            # diagonal (x |S|_F) added before a Cholesky factor; at least 4 d gamma_{d+1},
                                  # which exceeds the factorization's backward error (Higham, Thm 10.3)
# empirical lower bound (searches in order; see empirical_lower_bound)
SEARCHES = ("secant", "jacobian", "data", "data_ascent")
ASCENT_STEP = 1e-4                # secant step (x r0) of the ascent objective: a slightly smoothed local ratio
ASCENT_LR = 3e-3                  # Adam step (x r0) of the Jacobian ascents (0.02 oscillates around attention ties)
SNAP_EVERY = 100                  # ascent steps between power-method refreshes of the direction v
DATA_MAX_WINDOWS = 64             # validation windows read for the data searches (they use data_windows x effort)


class CertificateError(ValueError):
    pass


@contextlib.contextmanager
def _one_thread():
    """Run the eigensolvers (and Cholesky) on one thread. LAPACK's tridiagonalization synchronizes its
    threads at every column; on a shared CPU, where a thread of a niced process is often descheduled,
    each of those barriers waits for it: a float64 eigvalsh of a 768 x 768 Gram matrix took 2.6-5.8 s on
    2 threads and 56 ms on 1 (2-core CPU at load 4.4-4.9, nice 10), which made the 145M certificate
    take 10+ minutes instead of 25 s (docs/certificate.md, section 9)."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(n)


def _eigvalsh(G: torch.Tensor) -> torch.Tensor:
    with _one_thread():
        return torch.linalg.eigvalsh(G)


def _sigma_exact(W: torch.Tensor) -> torch.Tensor:
    """train_gpt.spectral_norm_exact (the float64 Gram matrix on the smaller side, its top eigenvalue),
    with the Gram product on every thread and the eigensolver on one (see _one_thread)."""
    X, _ = _wide(W.detach().double())
    return _eigvalsh(X @ X.mT)[..., -1].clamp_min(0).sqrt()


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
    lam = float(_sigma_exact(W)) ** 2
    k, r = max(W.shape[-2:]), min(W.shape[-2:])
    fro2 = float(W.pow(2).sum()) * (1 + _gamma(W.numel()))
    lam_up = lam * (1 + EIG_BACKWARD_CONST * r * UNIT_ROUNDOFF) + _gamma(k) * fro2 + 4 * UNIT_ROUNDOFF * lam
    return math.sqrt(lam_up) * (1 + 2 * UNIT_ROUNDOFF) + abs_err


def _product_err(A: torch.Tensor, B: torch.Tensor) -> float:
    """Bound on |fl(A B) - A B|_2 for float64 products: gamma_k |A|_F |B|_F (with a safety factor)."""
    return ROUNDING_SAFETY * _gamma(A.size(-1)) * float(A.norm()) * float(B.norm())


def rope_tables64(seq_len: int, head_dim: int, variant: str = "full"):
    """RoPE cos/sin in float64 (the trainer uses float32): the exact rotations the certificate is about
    (variant: the config's rope)."""
    return rope_tables(seq_len, head_dim, torch.float64, variant)


def qk_offset_norms(Wq: torch.Tensor, Wk: torch.Tensor, seq_len: int, rope: str = "full") -> torch.Tensor:
    """sigma(M_delta) for delta = t - s = 0..seq_len-1, M_delta the bilinear form of one head's logit
    (R_t W_q x_t) . (R_s W_k x_s) = x_t^T M_delta x_s (RoPE makes it depend on t - s only).

    With the LQ factors W = L Q (Q orthonormal rows), sigma(W_q^T R W_k) = sigma(L_q^T R L_k), so only
    (d_head x d_head) matrices are formed. Not yet inflated for rounding (see head_qk_bound)."""
    dh = Wq.size(0)
    Lq = torch.linalg.qr(Wq.double().T).R.T  # (dh, dh), Wq = Lq Q^T
    Lk = torch.linalg.qr(Wk.double().T).R.T
    cos, sin = rope_tables64(seq_len, dh, rope)
    # logit(t, s) = (R_t Lq u)^T (R_s Lk w); with s = 0 (R_0 = I) and t = delta: Lq^T R_delta^T Lk
    cols_q = Lq.T.unsqueeze(0).expand(seq_len, dh, dh).transpose(0, 1)  # (dh "batch" = columns, T, dh)
    Rq = apply_rope(cols_q.unsqueeze(2), cos, sin).squeeze(2)           # each column of Lq rotated to position t
    M = Rq.permute(1, 0, 2) @ Lk                                        # (T, dh, dh): (R_t Lq)^T Lk
    return _sigma_exact(M)


def head_qk_bound(Wq_h: torch.Tensor, Wk_h: torch.Tensor, seq_len: int, exact_rope: bool, sq: float, sk: float,
                  rope: str = "full") -> float:
    """m_h >= max_delta sigma(W_q^h^T R_delta W_k^h); never above the product of the slices' bounds."""
    prod = sq * sk
    if not exact_rope:
        return prod
    s = float(qk_offset_norms(Wq_h, Wk_h, seq_len, rope).max())
    d, dh = Wq_h.size(1), Wq_h.size(0)
    err = ROUNDING_SAFETY * _gamma(d + 2 * dh) * float(Wq_h.double().norm()) * float(Wk_h.double().norm())
    return min(prod, s * (1 + EIG_BACKWARD_CONST * dh * UNIT_ROUNDOFF) + err)


# -----------------------------------------------------------------------------
# Norms of a checkpoint


def _config(config) -> "object":
    """A Config as it is; a dict (a checkpoint's saved config) parsed (and so validated)."""
    if isinstance(config, dict):
        try:
            return config_from_dict(config, "config")
        except ConfigError as e:
            raise CertificateError(str(e)) from None
    return config


def _check_state(sd: dict, cfg) -> None:
    """The state dict has exactly the tensors (names and shapes) of GPT(cfg), all finite."""
    with torch.device("meta"):  # shapes only, no memory
        want = {k: tuple(v.shape) for k, v in GPT(cfg).state_dict().items()}
    extra = sorted(set(sd) - set(want))
    if extra:
        raise CertificateError(f"state dict has tensors GPT(cfg) does not ({', '.join(extra[:3])}"
                               f"{', ...' if len(extra) > 3 else ''}): not a checkpoint of this config; "
                               "certify a checkpoint written by train_gpt.py")
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
    with torch.device("meta"):  # parameter names only
        names = [n for n, _ in GPT(cfg).named_parameters()]
    mats = dict(named_matrices({n: sd[n].detach().double() for n in names}))
    norms = {}
    for key, W in mats.items():  # the keys of train_gpt.matrix_norms, from the same helper
        if key == "embed.weight":
            norms["embed.max_row_rms"] = float(W.pow(2).mean(-1).sqrt().max()) * (1 + _gamma(d + 2))
        else:
            norms[key] = sigma_upper(W) / rms_scale(W)
    layers = []
    for i in range(cfg.n_layer):
        p = f"blocks.{i}."
        Wq, Wk, Wv, Wo = (mats[p + k] for k in ("attn.q", "attn.k", "attn.v", "attn.proj"))
        fc, pr = mats[p + "mlp.fc"], mats[p + "mlp.proj"]
        # square matrices: RMS->RMS norm = sigma
        s = {n: norms[p + k] for n, k in (("q", "attn.q"), ("k", "attn.k"), ("v", "attn.v"), ("o", "attn.proj"))}
        fc_rr, pr_rr = norms[p + "mlp.fc"], norms[p + "mlp.proj"]
        heads = []
        for h in range(H):
            sl = slice(h * dh, (h + 1) * dh)
            sq, sk, sv = (min(s[n], sigma_upper(W[sl])) for n, W in (("q", Wq), ("k", Wk), ("v", Wv)))
            so = min(s["o"], sigma_upper(Wo[:, sl]))
            perr = _product_err(Wo[:, sl], Wv[sl])
            heads.append({"sigma_q": sq, "sigma_k": sk, "sigma_v": sv, "sigma_o": so, "Wq_h": Wq[sl], "Wk_h": Wk[sl],
                          "sigma_ov": min(so * sv, sigma_upper(Wo[:, sl] @ Wv[sl], perr)),
                          "m_qk": head_qk_bound(Wq[sl], Wk[sl], cfg.seq_len, exact_rope, sq, sk, cfg.rope),
                          "Wo_h": Wo[:, sl], "Wv_h": Wv[sl], "P_err": perr})
        mid = mlp_midpoint(fc, pr, *residual_coeffs(cfg))
        layers.append({"sigma": s, "fc": fc_rr, "proj": pr_rr, "heads": heads, "W_in": fc, "W_out": pr, "W_q": Wq,
                       "mlp_A": mid, "mlp_mid": sigma_upper(*mid)})
    return {"norms": norms, "layers": layers, "head": norms["head"], "emb": norms["embed.max_row_rms"],
            "exact_rope": exact_rope}


def mlp_midpoint(W_in: torch.Tensor, W_out: torch.Tensor, skip: float, branch: float) -> tuple[torch.Tensor, float]:
    """A = skip I + (branch / (2 GELU_MAX_SLOPE)) W_out W_in, the MLP sub-block with its skip at the
    midpoint 1/2 of gelu's slope range (docs/certificate.md, section 4, "MLP with its skip"), in float64,
    and a bound on the l2 distance of the computed A from the exact one. A is d x d, so sigma(A) is its
    RMS->RMS norm (collect_norms keeps both as layer["mlp_A"] and its bound as layer["mlp_mid"])."""
    W_in, W_out = W_in.detach().double(), W_out.detach().double()
    coef = branch / (2 * GELU_MAX_SLOPE)
    A = coef * (W_out @ W_in)
    A.diagonal().add_(skip)
    # fl(W_out W_in) is within _product_err of the product; scaling and adding skip round each entry once more
    return A, coef * _product_err(W_out, W_in) + 2 * UNIT_ROUNDOFF * float(A.norm())


def _gram(P: torch.Tensor) -> tuple:
    """(P P^T, |P|_F^2, columns of P): what _log_concat_sigma_of needs of a computed product P."""
    return P @ P.T, float(P.pow(2).sum()), P.size(1)


def _log_concat_sigma(heads: list, log_w: list, grams: list | None = None) -> float:
    """log sigma([w_1 P_1, ..., w_H P_H]) (P_h = W_o^h W_v^h, w_h = exp(log_w[h])) as an upper bound; grams:
    [_gram(P_h)] when the caller already has them (_attn_tight asks for four weightings per layer)."""
    grams = grams or [_gram(h["Wo_h"] @ h["Wv_h"]) for h in heads]
    return _log_concat_sigma_of(grams, [h["P_err"] for h in heads], log_w)


def _log_concat_sigma_of(grams: list, P_err: list, log_w: list) -> float:
    """log sigma([w_1 P_1, ..., w_H P_H]) for computed matrices P_h within P_err[h] (l2) of the exact ones,
    given grams[h] = _gram(P_h): lambda_max(sum_h w_h^2 P_h P_h^T), rescaled by the largest weight, plus
    rounding bounds."""
    top = max(log_w)
    if top == -math.inf:
        return -math.inf
    w = [math.exp(lw - top) for lw in log_w]
    G = sum(wi * wi * g for wi, (g, _, _) in zip(w, grams))
    d = G.size(0)
    lam = float(_eigvalsh(G)[-1].clamp_min(0))
    fro2 = sum(wi * wi * f2 for wi, (_, f2, _) in zip(w, grams))
    lam_up = lam * (1 + EIG_BACKWARD_CONST * d * UNIT_ROUNDOFF) + ROUNDING_SAFETY * _gamma(max(d, grams[0][2]) + len(grams)) * fro2
    err = math.sqrt(sum((wi * e) ** 2 for wi, e in zip(w, P_err)))  # distance of the computed P_h from the exact
    return top + _log(math.sqrt(lam_up) + err)


# -----------------------------------------------------------------------------
# Activation sets as ellipsoids (docs/certificate.md, section 5)
#
# An ellipsoid is given by a factor L (d x d): E(L) = {L u : |u|_2 <= 1} (l2 units). The invariant:
# at every depth, every position's residual vector, for every input in the domain and every length,
# lies in E(L). Each step is over-approximated in exact arithmetic and the rounding of its float64
# evaluation is added (a multiple of I) before the next factor is taken.


def _mm(A: torch.Tensor, B: torch.Tensor, A_err: float = 0.0, B_err: float = 0.0) -> tuple[torch.Tensor, float]:
    """fl(A B) and a bound on its l2 distance from the exact product of the matrices that A and B
    approximate within A_err and B_err."""
    C = A @ B
    sa, sb = float(A.norm()), float(B.norm())  # Frobenius >= spectral
    return C, _product_err(A, B) + A_err * (sb + B_err) + sa * B_err


def _ellipsoid_of_sum(terms: list, evals: int = MINKOWSKI_EVALS) -> torch.Tensor:
    """A factor L with E(L) containing the Minkowski sum of the ellipsoids E(B_i), each B_i given as
    (computed matrix, l2 distance from the exact one). Any weights w_i > 0 with sum 1 give
    sum_i E(B_i) subset E(S), S = sum_i B_i B_i^T / w_i (section 5, lemma 1); the weights are searched
    (a few coordinate steps) to make lambda_max(S) small. The rounding of S and of its Cholesky
    factorization is covered by a diagonal."""
    terms = [(B, e) for B, e in terms if e > 0 or bool(B.abs().max() > 0)]
    d = terms[0][0].size(0)
    G = [B @ B.T for B, _ in terms]
    lam = [max(float(_eigvalsh(g)[-1]), e * e, 1e-300) for g, (_, e) in zip(G, terms)]

    def weights(logs):
        m = max(logs)
        w = [math.exp(v - m) for v in logs]
        return [x / sum(w) for x in w]

    def top(logs):
        w = weights(logs)
        return float(_eigvalsh(sum(g / wi for g, wi in zip(G, w)))[-1])

    logs = [0.5 * math.log(v) for v in lam]  # w_i ~ sqrt(lambda_max(B_i B_i^T)): at most (sum_i |B_i|)^2
    best, step, n = top(logs), 0.5, 1
    while n < evals and step > 1e-3 and len(terms) > 1:
        improved = False
        for i in range(len(terms)):
            for sgn in (1.0, -1.0):
                trial = list(logs)
                trial[i] += sgn * step
                val = top(trial)
                n += 1
                if val < best:
                    best, logs, improved = val, trial, True
                    break
            if n >= evals:
                break
        if not improved:
            step /= 2
    w = weights(logs)
    S = sum(g / wi for g, wi in zip(G, w))
    S = 0.5 * (S + S.T)
    err = sum((ROUNDING_SAFETY * _gamma(B.size(1)) * float(B.norm()) ** 2 + 2 * float(B.norm()) * e + e * e) / wi
              for (B, e), wi in zip(terms, w))
    err += ROUNDING_SAFETY * _gamma(len(terms) + 2) * float(S.norm())
    fro = float(S.norm()) + d * err
    S.diagonal().add_(err + max(CHOL_JITTER_MIN, 4 * d * _gamma(d + 1)) * fro)
    with _one_thread():
        return torch.linalg.cholesky(S)


def _ellipsoid_rms(L: torch.Tensor) -> float:
    """Upper bound on max RMS over E(L)."""
    return sigma_upper(L) / math.sqrt(L.size(0))


def ellipsoid_attn(layer: dict, cfg, L: torch.Tensor) -> torch.Tensor:
    """Set of skip x_t + branch f sum_h P_h z_h over x_t, z_h in E(L) (z_h is a convex combination of the
    positions' vectors, so it stays in the convex set E(L)): a Minkowski sum of E(skip L) and E(branch f P_h L)."""
    skip, branch = residual_coeffs(cfg)
    c = branch * attn_out_factor(cfg)
    terms = [(skip * L, 2 * UNIT_ROUNDOFF * skip * float(L.norm()))]
    for h in layer["heads"]:
        VL, e = _mm(h["Wv_h"], L)
        PL, e = _mm(h["Wo_h"], VL, 0.0, e)
        terms.append((c * PL, c * e + 2 * UNIT_ROUNDOFF * c * float(PL.norm())))
    return _ellipsoid_of_sum(terms)


def ellipsoid_mlp(layer: dict, cfg, L: torch.Tensor) -> torch.Tensor:
    """Set of skip x + branch W_out gelu(W_in x) / c over x in E(L), the smaller of two containing sets:
    gelu(z) = z/2 + r(z), |r(z)| <= |z|/2: A x + (branch/c) W_out r with A = skip I + branch/(2c) W_out W_in
    (layer["mlp_A"], from mlp_midpoint);
    or |gelu(z)| <= |z|: skip x + (branch/c) W_out g. |z| <= sigma(W_in L)."""
    skip, branch = residual_coeffs(cfg)
    cg = GELU_MAX_SLOPE
    W_in, W_out = layer["W_in"], layer["W_out"]
    ZL, e = _mm(W_in, L)
    z = sigma_upper(ZL, e)
    wo_err = 2 * UNIT_ROUNDOFF * float(W_out.norm())
    A, eA = layer["mlp_A"]
    AL, e = _mm(A, L, eA)
    mid = _ellipsoid_of_sum([(AL, e), (branch * z / (2 * cg) * W_out, branch * z / (2 * cg) * wo_err)])
    plain = _ellipsoid_of_sum([(skip * L, 2 * UNIT_ROUNDOFF * skip * float(L.norm())),
                               (branch * z / cg * W_out, branch * z / cg * wo_err)])
    return mid if _ellipsoid_rms(mid) <= _ellipsoid_rms(plain) else plain


def _attn_soft_ellipsoid(layer: dict, cfg, L: torch.Tensor, exact_rope: bool) -> dict:
    """log bounds on the attention's softmax term (per unit input perturbation, before the output factor)
    for inputs in E(L): per head the value spread rho_P = sigma(P_h L), the logit derivative
    kappa (m_A + m_B) with m_A >= max_delta sigma(M_delta L) (query perturbed), m_B >= max_delta
    sigma(L^T M_delta) (keys perturbed), M_delta = W_q^h^T R_delta W_k^h; heads added as in _attn_tight."""
    H, s = cfg.n_head, layer["sigma"]
    kappa = attn_scale(cfg)
    PL, PLe, log_rv, log_g, log_rk, sk = [], [], [], [], [], []
    for h in layer["heads"]:
        VL, eV = _mm(h["Wv_h"], L)
        P_L, eP = _mm(h["Wo_h"], VL, 0.0, eV)
        KL, eK = _mm(h["Wk_h"], L)
        QL, eQ = _mm(h["Wq_h"], L)
        rho_k, rho_q = sigma_upper(KL, eK), sigma_upper(QL, eQ)
        if exact_rope:
            m_A = head_qk_bound(h["Wq_h"], KL, cfg.seq_len, True, h["sigma_q"], rho_k, cfg.rope) + h["sigma_q"] * eK
            m_B = head_qk_bound(QL, h["Wk_h"], cfg.seq_len, True, rho_q, h["sigma_k"], cfg.rope) + h["sigma_k"] * eQ
            m_A, m_B = min(m_A, h["sigma_q"] * rho_k), min(m_B, rho_q * h["sigma_k"])
        else:
            m_A, m_B = h["sigma_q"] * rho_k, rho_q * h["sigma_k"]
        PL.append(P_L)
        PLe.append(eP)
        log_rv.append(_log(sigma_upper(VL, eV)))
        log_g.append(_log(kappa * (m_A + m_B)))
        log_rk.append(_log(rho_k))
        sk.append(_log(h["sigma_k"]))
    log_rP = [_log(sigma_upper(P, e)) for P, e in zip(PL, PLe)]
    WqL, eQ = _mm(layer["W_q"], L)
    rho_Q = sigma_upper(WqL, eQ)
    grams = [_gram(P) for P in PL]  # shared by the three weightings below
    shared = math.log(kappa) + _lse([_log(s["q"]) + _log_concat_sigma_of(grams, PLe, log_rk),
                                     _log(rho_Q) + _log_concat_sigma_of(grams, PLe, sk)])
    return {"sum_heads": _lse([p + g for p, g in zip(log_rP, log_g)]),
            "via_Wo": _log(s["o"]) + 0.5 * _lse([2 * (v + g) for v, g in zip(log_rv, log_g)]),
            "concat": 0.5 * math.log(H) + _log_concat_sigma_of(grams, PLe, log_g),
            "shared_query": shared}


# -----------------------------------------------------------------------------
# The bounds (natural logs inside, log10 outside)


def _attn_tight(layer: dict, cfg, log_a: float, L: torch.Tensor | None = None,
                exact_rope: bool = True) -> tuple[float, float, dict]:
    """(log gain, log Lipschitz, details) of one attention sub-block for inputs of norm <= e^log_a (and,
    given L, in the ellipsoid E(L), which adds the softmax bounds of _attn_soft_ellipsoid)."""
    H, heads, s = cfg.n_head, layer["heads"], layer["sigma"]
    log_f = math.log(attn_out_factor(cfg))
    log_2kd = _log(2 * attn_scale(cfg) * cfg.d_model)  # 2 kappa d = 2 s n_head for kappa = s / d_head
    log_c = [log_2kd + 2 * log_a + _log(h["m_qk"]) for h in heads]  # softmax terms
    log_1c = [_log1p_exp(c) for c in log_c]
    log_ov = [_log(h["sigma_ov"]) for h in heads]
    log_v = [_log(h["sigma_v"]) for h in heads]
    grams = [_gram(h["Wo_h"] @ h["Wv_h"]) for h in heads]  # for the four weightings of the concatenated heads

    def three(weights):  # the three ways to add heads up, each valid; weights = log of per-head factors
        sum_heads = _lse([o + w for o, w in zip(log_ov, weights)])
        via_wo = _log(s["o"]) + 0.5 * _lse([2 * (v + w) for v, w in zip(log_v, weights)])
        concat = 0.5 * math.log(H) + _log_concat_sigma(heads, weights, grams)
        return {"sum_heads": sum_heads, "via_Wo": via_wo, "concat": concat}

    value = three([0.0] * H)
    soft = three(log_c)
    # the heads share one query: sum_h |W_q^h x_t|^2 = |W_q x_t|^2, so by Cauchy-Schwarz over heads the
    # softmax terms add up to 2 s n_head a^2 sigma(W_q) sigma([sigma_k^1 P_1 ... sigma_k^H P_H])
    soft["shared_query"] = (log_2kd + 2 * log_a + _log(s["q"])
                            + _log_concat_sigma(heads, [_log(h["sigma_k"]) for h in heads], grams))
    if L is not None:
        soft.update({f"ellipsoid_{k}": v for k, v in _attn_soft_ellipsoid(layer, cfg, L, exact_rope).items()})
    comb = three(log_1c)
    log_gain = log_f + min(value.values())
    options = dict(comb)
    options["value+softmax"] = _lse([min(value.values()), min(soft.values())])
    log_L = log_f + min(options.values())
    det = {"best": min(options, key=options.get) if options["value+softmax"] > min(options.values())
           else f"{min(value, key=value.get)}+{min(soft, key=soft.get)}", "max_m_qk": max(h["m_qk"] for h in heads),
           "max_sigma_ov": max(h["sigma_ov"] for h in heads), "sigma_o": s["o"],
           "max_sigma_v_head": max(h["sigma_v"] for h in heads),
           # the two terms of value+softmax (each its best way, x f), log10: which one dominates
           "log10_value": (log_f + min(value.values())) / LN10, "log10_softmax": (log_f + min(soft.values())) / LN10}
    return log_gain, log_L, det


def _radius(pre: dict, cfg) -> float:
    """r0, the RMS norm every input vector is bounded by: emb_w_max, or the largest embedding row if above."""
    return max(cfg.emb_w_max, pre["emb"])


def _bound(pre: dict, cfg, mode: str, ellipsoid: bool = False) -> dict:
    """Compose the per-sub-block bounds of `mode` into the network's bound, in log space. With
    ellipsoid (tight only), activation sets are also propagated as ellipsoids (section 5)."""
    skip, branch = residual_coeffs(cfg)  # x <- skip x + branch f(x)
    la, lb = math.log(skip), math.log(branch)
    r0 = _radius(pre, cfg)
    log_a = math.log(r0)
    ellipsoid = ellipsoid and mode == "tight"
    L = math.sqrt(cfg.d_model) * r0 * torch.eye(cfg.d_model, dtype=torch.float64) if ellipsoid else None
    total = 0.0          # log of the running Lipschitz bound (map from embedding outputs: starts at 1)
    total_fix = 0.0      # paper with the MLP constant corrected
    rows = []
    for i, layer in enumerate(pre["layers"]):
        s = layer["sigma"]
        for kind in ("attn", "mlp"):
            if L is not None:
                log_a = min(log_a, _log(_ellipsoid_rms(L)))
            if kind == "attn":
                if mode == "tight":
                    log_g, log_L, det = _attn_tight(layer, cfg, log_a, L, pre["exact_rope"])
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
            log_factor = _lse([la, lb + log_L])        # |skip I + branch J_f| <= skip + branch L_f
            log_factor_g = _lse([la, lb + log_g])      # |skip x + branch f(x)| <= (skip + branch g) |x|
            if mode == "tight" and kind == "mlp":      # the MLP and its skip bounded together (midpoint of gelu')
                w, mid = layer["proj"] * layer["fc"], layer["mlp_mid"]
                joint_L = _log(mid + branch * (GELU_MAX_SLOPE - 0.5) / GELU_MAX_SLOPE * w)
                joint_g = _log(mid + branch / (2 * GELU_MAX_SLOPE) * w)
                used = {**used, "mid": mid, "joint": joint_L < log_factor}
                log_factor, log_factor_g = min(log_factor, joint_L), min(log_factor_g, joint_g)
            total += log_factor
            total_fix += _lse([la, lb + log_L_fix])
            rows.append({"block": f"{kind} {i}", "norms": used, "log10_act_in": log_a / LN10,
                         "log10_gain": log_g / LN10, "log10_lipschitz": log_L / LN10,
                         "log10_factor": log_factor / LN10, "log10_total": total / LN10})
            log_a = log_a + log_factor_g
            if L is not None:
                L = (ellipsoid_attn if kind == "attn" else ellipsoid_mlp)(layer, cfg, L)
    log_head = _log(pre["head"]) + _log(cfg.final_scale if mode != "paper_code" else 1.0)
    total += log_head
    total_fix += log_head
    rows.append({"block": "head", "norms": {"head": pre["head"], "final_scale": cfg.final_scale},
                 "log10_act_in": log_a / LN10, "log10_gain": log_head / LN10, "log10_lipschitz": log_head / LN10,
                 "log10_total": total / LN10})
    if L is not None:
        log_a = min(log_a, _log(_ellipsoid_rms(L)))
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
# The published algorithm from per-matrix norms alone (no weights)

PAPER_MODES = ("paper", "paper_code")
NEEDS_WEIGHTS = ("the sound bound (tight) needs the weights (per-head slices, products such as W_o^h W_v^h, "
                 "RoPE offsets): python lipschitz_bound.py CKPT")
REFERENCE_LOG_NAMES = {"attn.attn_q": "attn.q", "attn.attn_k": "attn.k", "attn.attn_v": "attn.v",
                       "attn.c_proj": "attn.proj", "mlp.c_fc": "mlp.fc", "mlp.c_proj": "mlp.proj"}


def norm_keys(cfg) -> list:
    """The keys of train_gpt.matrix_norms for cfg (embed.max_row_rms, then every matrix), in parameter order."""
    with torch.device("meta"):
        params = dict(GPT(cfg).named_parameters())
    return ["embed.max_row_rms" if k == "embed.weight" else k for k, _ in named_matrices(params)]


def _pre_from_norms(norms: dict, cfg) -> dict:
    """What the published algorithm (paper, paper_code) reads: whole-matrix RMS->RMS norms, the head's
    norm and the largest embedding row RMS (emb_w_max where the norms do not give it)."""
    layers = []
    for i in range(cfg.n_layer):
        p = f"blocks.{i}."
        layers.append({"sigma": {n: norms[p + k] for n, k in (("q", "attn.q"), ("k", "attn.k"), ("v", "attn.v"),
                                                              ("o", "attn.proj"))},
                       "fc": norms[p + "mlp.fc"], "proj": norms[p + "mlp.proj"]})
    return {"layers": layers, "head": norms["head"], "emb": norms.get("embed.max_row_rms", cfg.emb_w_max)}


def norms_at_cap(cfg) -> dict:
    """Every hidden matrix at RMS->RMS norm w_max, the head at head_w_max, embedding rows at emb_w_max: the
    largest value the published algorithm can give for a model trained under these caps."""
    caps = {"head": cfg.head_w_max, "embed.max_row_rms": cfg.emb_w_max}
    return {k: caps.get(k, cfg.w_max) for k in norm_keys(cfg)}


def _check_norms(norms, cfg) -> dict:
    if not isinstance(norms, dict):
        raise CertificateError(f"norms must be a JSON object of name -> RMS->RMS norm, got {type(norms).__name__}")
    want = norm_keys(cfg)
    missing = [k for k in want if k not in norms and k != "embed.max_row_rms"]
    extra = sorted(set(norms) - set(want))
    if missing or extra:
        raise CertificateError(
            f"the norms are not those of this config (n_layer={cfg.n_layer}): "
            + (f"{len(missing)} missing ({', '.join(missing[:3])}{', ...' if len(missing) > 3 else ''})" if missing else "")
            + ("; " if missing and extra else "")
            + (f"{len(extra)} unknown ({', '.join(extra[:3])}{', ...' if len(extra) > 3 else ''})" if extra else "")
            + f"; give the config the run used (--config) and norms keyed as train_gpt.matrix_norms logs them ({want[1]}, ...)")
    out = {}
    for k, v in norms.items():
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not (math.isfinite(v) and v >= 0):
            raise CertificateError(f"norm '{k}' is {v!r}: each norm must be a finite number >= 0")
        out[k] = float(v)
    return out


def require_certifiable(cfg) -> None:
    """A CertificateError unless cfg.arch is a Lipschitz architecture (lipschitz, plain_residual)."""
    if cfg.arch in UNCONSTRAINED_ARCHS:
        raise CertificateError(f"arch={cfg.arch}: only the Lipschitz architectures are certified ({cfg.arch}'s "
                               "RMSNorm and QK-norm have no global Lipschitz bound)")


def paper_bound_from_norms(norms: dict, config, mode: str = "all") -> dict:
    """The published algorithm (--mode paper, paper_code; not an upper bound in general) from per-matrix
    RMS->RMS norms alone, keyed as train_gpt.matrix_norms (a run's metrics.jsonl logs them at every eval).
    The same numbers as certify(weights) gives in these modes, up to the certificate's ~1e-12 rounding
    allowance on each norm. mode: paper | paper_code | all."""
    cfg = _config(config)
    if mode not in PAPER_MODES + ("all",):
        raise CertificateError(f"mode {mode!r} from norms alone: choose paper, paper_code or all; {NEEDS_WEIGHTS}")
    require_certifiable(cfg)
    norms = _check_norms(norms, cfg)
    pre = _pre_from_norms(norms, cfg)
    results = {m: _bound(pre, cfg, m) for m in (PAPER_MODES if mode == "all" else (mode,))}
    out = dict(results["paper" if mode == "all" else mode])
    out["mode"] = mode
    if mode == "all":
        out["modes"] = results
    out["norms"], out["radius"], out["tight"] = norms, _radius(pre, cfg), NEEDS_WEIGHTS
    return out


def _reference_log_norms(text: str) -> dict:
    """{step: norms} from a log of the reference's NanoGPT scripts (Arongil/lipschitz-transformers,
    nanogpt/train_spectral_*.py), which print every matrix's RMS->RMS norm (4 decimals) under '>>> Weights:'
    before each 'step:N/M val_loss' line. Names are mapped to train_gpt.matrix_norms keys. The embedding is
    left out: the reference looks rows up through nn.Embedding(max_norm = emb_w_max sqrt(d)), so the blocks
    see rows of RMS <= emb_w_max whatever the stored rows' norms (the algorithm then starts at emb_w_max)."""
    out, cur, done = {}, None, None
    for line in text.splitlines():
        if line.startswith(">>> "):
            done, cur = (cur, {}) if line.startswith(">>> Weights") else (cur if cur is not None else done, None)
            continue
        m = re.match(r"step:(\d+)/\d+ val_loss", line)
        if m:
            if done:
                out[int(m.group(1))] = done
            done = None
            continue
        m = cur is not None and re.match(r"(?:_orig_mod\.)?(\S+)\.weight\s.*RMS->RMS:\s*(-?[\d.]+)", line)
        if m:
            name, v = m.group(1), abs(float(m.group(2)))  # a zero matrix prints -0.0000
            if name == "lm_head":
                cur["head"] = v
            elif name.startswith("blocks."):
                i, rest = name[7:].split(".", 1)
                if rest in REFERENCE_LOG_NAMES:
                    cur[f"blocks.{i}.{REFERENCE_LOG_NAMES[rest]}"] = v
    return out


def load_norms(path: str, step: int | None = None) -> tuple[dict, int | None, str]:
    """(norms, step, kind) from a JSON object of norms (or {"norms": {...}}), a run's metrics.jsonl (the
    record at `step`, default the last with norms) or a log of the reference's NanoGPT scripts."""
    if not os.path.isfile(path):
        raise CertificateError(f"--norms {path}: no such file")
    try:
        with open(path) as fh:
            text = fh.read()
    except (OSError, UnicodeDecodeError) as e:
        raise CertificateError(f"--norms {path}: cannot read it as text ({e})") from None
    if ">>> Weights:" in text:
        by_step, kind = _reference_log_norms(text), "reference log"
    elif path.endswith(".jsonl"):
        by_step, kind = {}, "metrics.jsonl"
        for n, line in enumerate(text.splitlines(), 1):
            if not line.strip():
                continue
            try:
                rec = json.loads(line)
            except json.JSONDecodeError as e:
                raise CertificateError(f"--norms {path}: line {n} is not JSON ({e}); metrics.jsonl holds one record per line") from None
            if isinstance(rec, dict) and isinstance(rec.get("norms"), dict):
                by_step[rec.get("step")] = rec["norms"]
    else:
        try:
            obj = json.loads(text)
        except json.JSONDecodeError as e:
            raise CertificateError(f"--norms {path}: not JSON ({e}); give a JSON object of norms, a run's "
                                   "metrics.jsonl or a reference NanoGPT log") from None
        if isinstance(obj, dict) and isinstance(obj.get("norms"), dict):
            obj = obj["norms"]
        return obj, None, "json"
    if not by_step:
        raise CertificateError(f"--norms {path}: no norms in this {kind} (a run logs them at every eval)")
    if step is None:
        step = max(by_step, key=lambda s: -1 if s is None else s)
    elif step not in by_step:
        raise CertificateError(f"--norms {path}: no norms at step {step}; logged steps: "
                               f"{', '.join(str(s) for s in sorted(by_step, key=lambda s: -1 if s is None else s))}")
    return by_step[step], step, kind


def _load_config(path: str):
    """A Config from a TOML file (train_gpt --config) or a run's config.json."""
    if path.endswith(".json"):
        try:
            with open(path) as fh:
                d = json.load(fh)
        except (OSError, ValueError) as e:
            raise CertificateError(f"--config {path}: cannot read it as JSON ({e})") from None
        return _config(d)
    try:
        return parse_config(["--config", path])
    except ConfigError as e:
        raise CertificateError(str(e)) from None


# -----------------------------------------------------------------------------
# Public API


def analysis_choices(cfg, rope: str = "auto", activation: str = "auto") -> tuple[bool, bool]:
    """(exact_rope, ellipsoid) that certify uses: m_h maximized over RoPE offsets when rope is exact, or
    auto and n_layer n_head seq_len <= ROPE_EXACT_MAX_WORK (else sigma(W_q^h) sigma(W_k^h)); activation
    sets as ellipsoids when activation is ellipsoid, or auto and n_layer d_model^2 <= ELLIPSOID_MAX_WORK
    (else norm balls). The 145M config gets the offset-free bound and norm balls."""
    exact_rope = rope == "exact" or (rope == "auto" and cfg.n_layer * cfg.n_head * cfg.seq_len <= ROPE_EXACT_MAX_WORK)
    ellipsoid = activation == "ellipsoid" or (activation == "auto" and cfg.n_layer * cfg.d_model ** 2 <= ELLIPSOID_MAX_WORK)
    return exact_rope, ellipsoid


def certify(state_dict: dict, config, mode: str = "all", empirical: bool = False, rope: str = "auto",
            effort: float = 1.0, seed: int = 0, data: torch.Tensor | None = None, searches=SEARCHES,
            progress: bool = False, activation: str = "auto", jac_lengths=(16, 64)) -> dict:
    """Certificate of a model given as weights + config (a Config or its asdict).

    mode: paper | paper_code | tight | all. rope: exact (maximize m_h over RoPE offsets), bound (use
    sigma(W_q^h) sigma(W_k^h)) or auto (exact when n_layer * n_head * seq_len <= ROPE_EXACT_MAX_WORK).
    activation: ellipsoid (activation sets propagated as ellipsoids, section 5), scalar (norms only) or
    auto (ellipsoid when n_layer * d_model^2 <= ELLIPSOID_MAX_WORK).
    With empirical=True, also a searched lower bound (empirical_lower_bound: effort scales its starts
    and steps; data = token windows (n, T) for the data searches, skipped when None)."""
    cfg = _config(config)
    if mode not in MODES + ("all",):
        raise CertificateError(f"mode {mode!r} is not one of {', '.join(MODES + ('all',))}")
    if rope not in ("auto", "exact", "bound"):
        raise CertificateError(f"rope {rope!r} is not one of auto, exact, bound")
    if activation not in ("auto", "ellipsoid", "scalar"):
        raise CertificateError(f"activation {activation!r} is not one of auto, ellipsoid, scalar")
    require_certifiable(cfg)
    _check_state(state_dict, cfg)
    exact_rope, ellipsoid = analysis_choices(cfg, rope, activation)
    t0 = time.perf_counter()
    pre = collect_norms(state_dict, cfg, exact_rope)
    results = {m: _bound(pre if m == "tight" else _pre_from_norms(pre["norms"], cfg), cfg, m, ellipsoid)
               for m in (MODES if mode == "all" else (mode,))}
    main_mode = "tight" if mode == "all" else mode
    out = dict(results[main_mode])
    out["mode"] = mode
    if mode == "all":
        out["modes"] = results
    out["norms"] = pre["norms"]
    r0 = _radius(pre, cfg)
    out["domain"] = (f"sequences of 1..{cfg.seq_len} vectors in R^{cfg.d_model}, each of RMS norm <= r0 = {r0:.6g} "
                     "(emb_w_max, or the largest embedding row if above); norm max_t RMS(x_t)")
    out["output_norm"] = (f"logits, max_t RMS over the {cfg.vocab_size} vocabulary entries "
                          f"(x sqrt({cfg.vocab_size}) for max_t l2)")
    out["radius"] = r0
    out["rope"] = "max over RoPE offsets" if exact_rope else "sigma(W_q^h) sigma(W_k^h) (offset-free)"
    out["activation_sets"] = "ellipsoids" if ellipsoid else "norm balls"
    out["arithmetic"] = "exact (bf16 autocast and fp32 RoPE tables of the trainer are outside the claim)"
    out["certify_s"] = time.perf_counter() - t0
    if empirical:
        model = GPT(cfg)
        model.load_state_dict(state_dict)
        emp = empirical_lower_bound(model, r0, effort=effort, seed=seed, data=data, progress=progress, jac_lengths=jac_lengths,
                                    searches=[s for s in searches if data is not None or not s.startswith("data")])
        out.update(emp)
        for res in ([out] + list(results.values()) if mode == "all" else [out]):
            res["looseness"] = _num(res["log10_bound"] - emp["log10_empirical_lower"])
            res["log10_looseness"] = res["log10_bound"] - emp["log10_empirical_lower"]
    return out


def validation_windows(cfg, val_bin: str | None = None, max_windows: int = DATA_MAX_WINDOWS) -> torch.Tensor:
    """Up to max_windows non-overlapping full-context windows (n, seq_len) of the validation shards
    (val_bin, default the checkpoint's cfg.val_bin); DataError if there are none."""
    toks = load_val_tokens(val_bin or cfg.val_bin, max_windows * cfg.seq_len, cfg.seq_len, cfg.vocab_size)
    n = (toks.numel() - 1) // cfg.seq_len
    return toks[: n * cfg.seq_len].view(n, cfg.seq_len)


def certify_checkpoint(path: str, mode: str = "all", empirical: bool = False, rope: str = "auto",
                       effort: float = 1.0, seed: int = 0, val_bin: str | None = None, searches=SEARCHES,
                       progress: bool = False, activation: str = "auto", jac_lengths=(16, 64)) -> dict:
    """Certificate of a checkpoint file (loaded with weights_only=True via train_gpt.load_checkpoint).

    With empirical=True the data searches read validation windows from val_bin (default: the
    checkpoint's val_bin, relative to the working directory); without shards they are skipped and
    "empirical_data" says why. A checkpoint of an architecture without a certificate gives
    {"certified": False, "reason": ...}."""
    ck = load_checkpoint(path)
    cfg = config_from_checkpoint(ck, path)
    if cfg.arch in UNCONSTRAINED_ARCHS:
        return {"certified": False, "reason": f"arch={cfg.arch} has no Lipschitz certificate", "path": path}
    data, note = None, None
    if empirical and any(s.startswith("data") for s in searches):
        try:
            data = validation_windows(cfg, val_bin)
            note = f"{data.size(0)} validation windows of {data.size(1)} tokens from '{val_bin or cfg.val_bin}'"
        except DataError as e:
            note = f"data searches skipped: {e}"
    try:
        out = certify(ck["model"], cfg, mode=mode, empirical=empirical, rope=rope, effort=effort, seed=seed,
                      data=data, searches=searches, progress=progress, activation=activation,
                      jac_lengths=jac_lengths)
    except CertificateError as e:
        raise CertificateError(f"{path}: {e}") from None
    if note:
        out["empirical_data"] = note
    out["certified"], out["path"], out["step"] = True, path, ck.get("step")
    return out


CERTIFICATE_FILE = "certificate.json"  # train_gpt.py saves it next to FINAL_CKPT: every mode, as --json prints it


def save_certificate(run_dir: str) -> dict:
    """Certify run_dir/ckpt_final.pt (every mode) and save the result as run_dir/certificate.json,
    atomically; returns it."""
    cert = certify_checkpoint(os.path.join(run_dir, FINAL_CKPT))
    atomic_save(json.dumps(jsonable(cert)).encode(), os.path.join(run_dir, CERTIFICATE_FILE))
    return cert


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
#
# Every search below ends with a number evaluated exactly (float64) at its final point in the
# certificate's norms, so each is a lower bound on the true constant L:
# - a secant |F(X) - F(Y)| / |X - Y| with X, Y in the domain D, or
# - a local ratio |J_F(X) v| / |v| with X in D: for X inside D, X + h v is in D for small h and the
#   ratio is the limit of secants; J_F is continuous and D is the closure of its interior, so it
#   holds on the boundary too.


def forward_embeddings(model: GPT, X: torch.Tensor) -> torch.Tensor:
    """Logits of the model from embedding outputs X (B, T, d), with exact (float64) RoPE tables."""
    cos, sin = rope_tables64(X.size(1), model.cfg.d_model // model.cfg.n_head, model.cfg.rope)
    return model.logits_from_embeddings(X, cos.to(X), sin.to(X))


def _logits_fn(model: GPT):
    """X -> logits through the decomposed ("math") attention kernel, which forward-mode AD (jvp) supports."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    def f(X):
        with sdpa_kernel(SDPBackend.MATH):
            return forward_embeddings(model, X)
    return f


def seq_norm(X: torch.Tensor) -> torch.Tensor:
    """max over positions of the RMS over features: (B, T, n) -> (B,)."""
    return X.pow(2).mean(-1).sqrt().amax(-1)


def _project(X: torch.Tensor, r0: float) -> torch.Tensor:
    rms = X.pow(2).mean(-1, keepdim=True).sqrt()
    return X * torch.clamp(r0 / rms.clamp_min(1e-300), max=1.0)


def _unit_rows(U: torch.Tensor) -> torch.Tensor:
    """Every position scaled to RMS 1 (a zero row becomes all ones)."""
    n = U.pow(2).mean(-1, keepdim=True).sqrt()
    return torch.where(n > 0, U / n.clamp_min(1e-300), torch.ones_like(U))


def _float64_model(model: GPT) -> GPT:
    m = copy.deepcopy(model).double().eval()
    for p in m.parameters():
        p.requires_grad_(False)
    return m


def local_lipschitz(model: GPT, X: torch.Tensor, v: torch.Tensor | None = None, iters: int = 8,
                    seed: int = 0) -> dict:
    """|J_F(X) v| / |v| (max-position RMS on both sides) maximized over v by the power method of these
    norms, for each of the B sequences of X (B, T, d); the model must be float64 (_float64_model).

    One step: w = (J v)_t at the output position t where |(J v)_t| is largest; v_s = (J^T w)_s scaled to
    RMS 1 at every input position s. The new v maximizes <w, (J v)_t> over |v| <= 1, so
    |(J v_new)_t| >= <w, (J v_new)_t> / |w| >= |(J v)_t|: the ratio never decreases. Jacobian-vector and
    vector-Jacobian products only (torch.func.jvp / vjp); no Jacobian is formed.
    Returns {"ratio": (B,), "v": (B, T, d), "t": (B,), "history": (iters + 1, B)}, ratio evaluated at the
    returned v (the best step; history is every step's ratio)."""
    f = _logits_fn(model)
    X = X.detach()
    if v is None:
        g = torch.Generator().manual_seed(seed)
        v = torch.randn(X.shape, generator=g, dtype=X.dtype)
    v = _unit_rows(v.detach().to(X))
    _, pull = torch.func.vjp(f, X)
    best_r, best_v, best_t, history = None, v, None, []
    for i in range(iters + 1):
        _, jv = torch.func.jvp(f, (X,), (v,))
        per = jv.pow(2).mean(-1).sqrt()                      # (B, T) output RMS per position
        val, t = per.max(-1)
        r = val / seq_norm(v)
        history.append(r)
        if best_r is None:
            best_r, best_v, best_t = r, v, t
        else:
            up = r > best_r
            best_r, best_t = torch.where(up, r, best_r), torch.where(up, t, best_t)
            best_v = torch.where(up[:, None, None], v, best_v)
        if i == iters:
            break
        w = torch.zeros_like(jv)
        idx = torch.arange(X.size(0))
        w[idx, t] = jv[idx, t]
        v = _unit_rows(pull(w)[0])
    return {"ratio": best_r, "v": best_v, "t": best_t, "history": torch.stack(history)}


def secant_ratio(model: GPT, X: torch.Tensor, v: torch.Tensor, r0: float, step: float = 1e-6) -> torch.Tensor:
    """The secant |F(X') - F(Y)| / |X' - Y| with X' = (1 - step) X and Y = X' + step r0 v / |v|: both in
    the domain when X is, so a lower bound by definition; near |J v| / |v| for a small step."""
    f = _logits_fn(model)
    Xp = X * (1 - step)
    D = v / seq_norm(v)[:, None, None] * (step * r0)
    return seq_norm(f(Xp + D) - f(Xp)) / seq_norm(D)


class _Progress:
    """A one-line progress bar on stderr (silent unless enabled)."""

    def __init__(self, total: int, enabled: bool, every_s: float = 0.5):
        self.total, self.done, self.enabled, self.every_s = max(1, total), 0, enabled, every_s
        self.t0 = self.shown = time.perf_counter()

    def step(self, n: int, what: str, best: float) -> None:
        self.done += n
        now = time.perf_counter()
        if self.enabled and (now - self.shown >= self.every_s or self.done >= self.total):
            self.shown = now
            frac = min(1.0, self.done / self.total)
            bar = "#" * int(30 * frac)
            print(f"\r[{bar:<30}] {100 * frac:5.1f}% {time.perf_counter() - self.t0:6.0f}s  {what:<12} best {best:.4g}   ",
                  end="", file=sys.stderr, flush=True)

    def close(self) -> None:
        if self.enabled:
            print(file=sys.stderr, flush=True)


def _ascend(m: GPT, X0: torch.Tensor, v0: torch.Tensor, r0: float, steps: int, bar: _Progress, what: str,
            best: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Adam ascent of log |F(X + h U) - F(X)| / h (h = ASCENT_STEP r0, U at RMS 1 per position) over
    X in the domain and U, with a power-method refresh of U every SNAP_EVERY steps. Returns the final
    (projected) X and U; the caller evaluates them exactly."""
    f = _logits_fn(m)
    Z, U = X0.detach().clone().requires_grad_(True), _unit_rows(v0).detach().clone().requires_grad_(True)
    opt = torch.optim.Adam([Z, U], lr=ASCENT_LR * r0)
    h = ASCENT_STEP * r0
    for it in range(steps):
        X = _project(Z, r0)
        num = seq_norm(f(X + _unit_rows(U) * h) - f(X))
        opt.zero_grad()
        (-torch.log(num.clamp_min(1e-300)).sum()).backward()
        opt.step()
        if (it + 1) % SNAP_EVERY == 0 and it + 1 < steps:
            loc = local_lipschitz(m, _project(Z.detach(), r0), U.detach(), iters=2)
            with torch.no_grad():
                U.copy_(loc["v"])
            best = max(best, float(loc["ratio"].max()))
        bar.step(1, what, max(best, float(num.detach().max()) / h))
    return _project(Z.detach(), r0), U.detach()


def empirical_lower_bound(model: GPT, r0: float, effort: float = 1.0, seed: int = 0,
                          lengths=(2, 8, 32, 64), scales=(1e-4, 0.5), starts: int = 4,
                          steps: int = 60, searches=SEARCHES, jac_lengths=(16, 64), jac_starts: int = 4,
                          jac_steps: int = 200, data: torch.Tensor | None = None, data_windows: int = 8,
                          data_steps: int = 60, progress: bool = False) -> dict:
    """Largest ratio found by several searches, each a lower bound on the Lipschitz constant in the
    certificate's norms (see the comment above). effort multiplies the secant search's starts and steps,
    the Jacobian ascents' steps and the number of data windows (the ascents' starts stay jac_starts and 1).

    secant: Adam ascent of log |F(X) - F(Y)| / |X - Y| over X, Y in the domain from `starts` random
        starts per length in `lengths` and perturbation size eps r0 in `scales`, ratio of the final points.
    jacobian: Adam ascent of the local ratio (_ascend) from `jac_starts` random sequences on the sphere
        per length in jac_lengths (capped at seq_len), then local_lipschitz at the final point.
    data: local_lipschitz at `data_windows` token windows of `data` (LongTensor (n, T), real text),
        embedded with the model's own embedding rows (inside the domain by the definition of r0).
    data_ascent: the jacobian ascent (`data_steps` steps) from the best data window.
    Returns the maximum, the search that found it, and every search's own best."""
    cfg = model.cfg
    unknown = [s for s in searches if s not in SEARCHES]
    if unknown:
        raise CertificateError(f"unknown search(es) {unknown}: choose from {', '.join(SEARCHES)}")
    m = _float64_model(model)
    gen = torch.Generator().manual_seed(seed)
    scaled = lambda n: max(1, int(round(n * effort)))  # noqa: E731
    n_starts, n_steps = scaled(starts), scaled(steps)
    sec_lengths = [t for t in lengths if t <= cfg.seq_len]
    jac_T = sorted({min(t, cfg.seq_len) for t in jac_lengths})
    if data is not None and data.dim() != 2:
        raise CertificateError(f"data must be token windows of shape (n, T), got {tuple(data.shape)}")
    use_data = data is not None and data.numel() > 0
    n_win = min(scaled(data_windows), data.size(0)) if use_data else 0
    work = {"secant": len(sec_lengths) * len(scales) * (n_steps + 1),
            "jacobian": len(jac_T) * scaled(jac_steps), "data": n_win, "data_ascent": scaled(data_steps)}
    bar = _Progress(sum(work[s] for s in searches if use_data or not s.startswith("data")), progress)
    found = {}

    def record(name, value, at, t0):
        value = float(value)
        if name not in found or value > found[name]["lower"]:
            found[name] = {"lower": value, "log10": _log(value) / LN10, "at": at}
        found[name]["s"] = time.perf_counter() - t0

    best = 0.0
    if "secant" in searches:
        t0 = time.perf_counter()
        f = _logits_fn(m)
        for T in sec_lengths:
            for eps in scales:
                X = torch.randn(n_starts, T, cfg.d_model, generator=gen, dtype=torch.float64)
                X = (X / X.pow(2).mean(-1, keepdim=True).sqrt() * r0).requires_grad_(True)
                U = torch.randn(n_starts, T, cfg.d_model, generator=gen, dtype=torch.float64).requires_grad_(True)
                opt = torch.optim.Adam([X, U], lr=0.05 * r0)
                for it in range(n_steps + 1):
                    Xp = _project(X, r0)
                    D = U / U.pow(2).mean(-1, keepdim=True).sqrt().clamp_min(1e-300) * (eps * r0)  # every position at eps r0
                    Yp = _project(Xp + D, r0)
                    num = seq_norm(f(Yp) - f(Xp))
                    den = seq_norm(Yp - Xp)
                    ok = den > 0
                    ratio = torch.where(ok, num / den.clamp_min(1e-300), torch.zeros_like(num))
                    record("secant", ratio.detach().max(), {"seq_len": T, "eps": eps}, t0)
                    best = max(best, found["secant"]["lower"])
                    bar.step(1, "secant", best)
                    if it == n_steps:
                        break
                    opt.zero_grad()
                    (-torch.log(ratio[ok].clamp_min(1e-300)).sum()).backward()
                    opt.step()
    if "jacobian" in searches:
        t0 = time.perf_counter()
        for T in jac_T:
            X = torch.randn(jac_starts, T, cfg.d_model, generator=gen, dtype=torch.float64)
            X = X / X.pow(2).mean(-1, keepdim=True).sqrt() * r0
            v = torch.randn(X.shape, generator=gen, dtype=torch.float64)
            X, v = _ascend(m, X, v, r0, scaled(jac_steps), bar, "jacobian", best)
            loc = local_lipschitz(m, X, v)
            i = int(loc["ratio"].argmax())
            record("jacobian", loc["ratio"][i], {"seq_len": T, "output_position": int(loc["t"][i])}, t0)
            best = max(best, found["jacobian"]["lower"])
    if use_data and any(s.startswith("data") for s in searches):
        t0 = time.perf_counter()
        pick = torch.linspace(0, data.size(0) - 1, n_win).round().long()
        emb = m.embed.weight
        scores = []
        for j in pick.tolist():
            loc = local_lipschitz(m, emb[data[j]].unsqueeze(0), seed=seed + j, iters=6)
            scores.append((float(loc["ratio"][0]), j, loc["v"]))
            if "data" in searches:
                record("data", loc["ratio"][0], {"seq_len": data.size(1), "window": j, "output_position": int(loc["t"][0])}, t0)
                best = max(best, found["data"]["lower"])
            bar.step(1, "data", best)
        if "data_ascent" in searches:
            t0 = time.perf_counter()
            _, j, v = max(scores, key=lambda s: s[0])
            X, v = _ascend(m, emb[data[j]].unsqueeze(0), v, r0, scaled(data_steps), bar, "data_ascent", best)
            loc = local_lipschitz(m, X, v)
            record("data_ascent", loc["ratio"][0], {"seq_len": data.size(1), "from_window": j,
                                                    "output_position": int(loc["t"][0])}, t0)
            best = max(best, found["data_ascent"]["lower"])
    bar.close()
    if not found:
        raise CertificateError("no search ran: the data searches need token windows (pass data, or add 'secant' or 'jacobian')")
    top = max(found, key=lambda k: found[k]["lower"])
    return {"empirical_lower": found[top]["lower"], "log10_empirical_lower": found[top]["log10"],
            "empirical_found_by": top, "empirical_at": {"search": top, **found[top]["at"]},
            "empirical_searches": found, "empirical_s": sum(v["s"] for v in found.values()),
            "empirical_starts": n_starts, "empirical_steps": n_steps}


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


def jsonable(obj):
    """obj with every non-finite float as a string ('inf', 'nan'), so that json.dumps writes strict JSON."""
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else str(obj)
    if isinstance(obj, dict):
        return {k: jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [jsonable(v) for v in obj]
    return obj


def _main_norms(a) -> int:
    """lipschitz_bound.py --norms FILE | --at_cap, with --config: the published algorithm from norms alone."""
    if a.checkpoint is not None or (a.norms is not None and a.at_cap):
        print("error: give one of a checkpoint, --norms FILE or --at_cap", file=sys.stderr)
        return 2
    if a.empirical or a.mode == "tight":
        print(f"error: {'--empirical' if a.empirical else '--mode tight'} with norms alone: {NEEDS_WEIGHTS}", file=sys.stderr)
        return 2
    cfg_path = a.config
    if cfg_path is None and a.norms is not None and a.norms.endswith(".jsonl"):
        cfg_path = os.path.join(os.path.dirname(a.norms), "config.json")
    if cfg_path is None or not os.path.isfile(cfg_path):
        print(f"error: {'--config ' + cfg_path + ': no such file' if cfg_path else 'no config'}: the algorithm needs the "
              "run's settings (n_layer, softmax_scale, final_scale, arch, caps); pass --config (a TOML file or a run's "
              "config.json)", file=sys.stderr)
        return 2
    try:
        cfg = _load_config(cfg_path)
        if a.at_cap:
            norms, step, source = norms_at_cap(cfg), None, f"every matrix at its cap (w_max {cfg.w_max:g}, head_w_max {cfg.head_w_max:g})"
        else:
            norms, step, kind = load_norms(a.norms, a.step)
            source = f"{a.norms} ({kind}{', step ' + str(step) if step is not None else ''})"
        res = paper_bound_from_norms(norms, cfg, a.mode)
    except CertificateError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    res["source"], res["config"], res["step"] = source, cfg_path, step
    if a.json:
        print(json.dumps(jsonable(res)))
        return 0
    print(f"published algorithm (Appendix B) from per-matrix norms: {source}; config {cfg_path}")
    for r in (res["modes"].values() if "modes" in res else [res]):
        print()
        print(format_table(r))
    print()
    print(f"note: {NEEDS_WEIGHTS}")
    return 0


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description="Certified Lipschitz bound (embedding outputs -> logits) of a "
                                "train_gpt.py checkpoint; see docs/certificate.md")
    p.add_argument("checkpoint", nargs="?", help="ckpt_final.pt or ckpt_step*.pt written by train_gpt.py")
    p.add_argument("--norms", default=None, help="instead of a checkpoint: the published algorithm (paper, "
                   "paper_code) from per-matrix RMS->RMS norms alone: a run's metrics.jsonl (config: its config.json), "
                   "a JSON object of norms keyed as train_gpt.matrix_norms, or a log of the reference's NanoGPT scripts")
    p.add_argument("--at_cap", action="store_true", help="instead of a checkpoint: the published algorithm with every "
                   "matrix at its cap (w_max, head_w_max) for --config: the largest value it gives for that config")
    p.add_argument("--config", default=None, help="with --norms or --at_cap: the run's config (TOML as for train_gpt.py "
                   "--config, or a run's config.json; default for a metrics.jsonl: the config.json beside it)")
    p.add_argument("--step", type=int, default=None, help="with --norms from a log: the eval step (default: the last)")
    p.add_argument("--mode", default="all", choices=MODES + ("all",), help="which bound(s)")
    p.add_argument("--empirical", action="store_true", help="also search for a lower bound (float64, CPU; "
                   "minutes: a progress bar on stderr)")
    p.add_argument("--effort", type=float, default=1.0, help="multiplies the search's starts, windows and steps")
    p.add_argument("--searches", default=",".join(SEARCHES), help=f"comma-separated subset of {','.join(SEARCHES)}")
    p.add_argument("--jac_lengths", default="16,64", help="sequence lengths of the jacobian search (comma-separated)")
    p.add_argument("--val_bin", default=None, help="validation shards for the data searches (default: the "
                   "checkpoint's val_bin, relative to the working directory)")
    p.add_argument("--no_progress", action="store_true", help="no progress bar")
    p.add_argument("--seed", type=int, default=0, help="seed of the search")
    p.add_argument("--rope", default="auto", choices=("auto", "exact", "bound"),
                   help="per-head q-k norm: maximized over RoPE offsets (exact) or sigma_q sigma_k (bound)")
    p.add_argument("--activation", default="auto", choices=("auto", "ellipsoid", "scalar"),
                   help="activation sets: ellipsoids (tighter, d^3 work per sub-block) or norm balls; auto: "
                   f"ellipsoids when n_layer * d_model^2 <= {ELLIPSOID_MAX_WORK:g}")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    a = p.parse_args(argv)
    if a.norms is not None or a.at_cap:
        return _main_norms(a)
    if a.checkpoint is None:
        print("error: give a checkpoint (or --norms FILE / --at_cap --config FILE for the published algorithm)", file=sys.stderr)
        return 2
    searches = tuple(x for x in a.searches.split(",") if x)
    bad = [x for x in searches if x not in SEARCHES]
    if bad or not searches:
        print(f"error: --searches {a.searches!r}: each must be one of {', '.join(SEARCHES)}", file=sys.stderr)
        return 2
    try:
        jac_lengths = tuple(int(x) for x in a.jac_lengths.split(",") if x)
    except ValueError:
        jac_lengths = ()
    if not jac_lengths or min(jac_lengths) < 1:
        print(f"error: --jac_lengths {a.jac_lengths!r}: give positive integers separated by commas, e.g. 16,64", file=sys.stderr)
        return 2
    if a.effort <= 0:
        print(f"error: --effort {a.effort} must be > 0 (it multiplies the search's starts and steps)", file=sys.stderr)
        return 2
    try:
        cert = certify_checkpoint(a.checkpoint, a.mode, a.empirical, a.rope, a.effort, a.seed, val_bin=a.val_bin,
                                  searches=searches, progress=a.empirical and not a.no_progress,
                                  activation=a.activation, jac_lengths=jac_lengths)
    except (CheckpointError, CertificateError, ConfigError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if not cert.get("certified", True):
        print(f"error: {a.checkpoint}: {cert['reason']}", file=sys.stderr)
        return 2
    if a.json:
        print(json.dumps(jsonable(cert)))
        return 0
    print(f"checkpoint {a.checkpoint} (step {cert.get('step')})")
    print(f"map: embedding outputs -> logits; input domain: {cert['domain']}")
    print(f"output norm: {cert['output_norm']}; arithmetic: {cert['arithmetic']}; q-k: {cert['rope']}; "
          f"activation sets: {cert['activation_sets']}")
    for res in (cert["modes"].values() if "modes" in cert else [cert]):
        print()
        print(format_table(res))
    if "log10_empirical_lower" in cert:
        print()
        print(f"empirical lower bound: {fmt(cert['log10_empirical_lower'])} (log10 {cert['log10_empirical_lower']:.4f}; "
              f"found by {cert['empirical_found_by']} at {cert['empirical_at']}; {cert['empirical_s']:.1f}s)")
        for name, r in cert["empirical_searches"].items():
            print(f"  {name:<12} {fmt(r['log10']):>10}  {r['s']:7.1f}s  at {r['at']}")
        if "empirical_data" in cert:
            print(f"  data: {cert['empirical_data']}")
        for res in (cert["modes"].values() if "modes" in cert else [cert]):
            print(f"  looseness {res['mode']}: certificate / empirical = {fmt(res['log10_looseness'])}")
    print()
    print(summary_line(cert))
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Train GPTs with enforced Lipschitz constants, in one file.

The architecture of Newhouse et al., "Training Transformers with Enforced Lipschitz
Constants" (arXiv 2507.13338): no LayerNorm, no QK-norm, no logit softcap, no biases.
Stability comes from the weights: convex residual blocks, 1/d attention, scaled GELU and
output projections, Muon updates of known spectral norm, and after every step a projection
that keeps each matrix's RMS->RMS norm sqrt(d_in/d_out) * sigma_max(W) at most w_max.
`lipschitz_bound.py` turns a checkpoint of this script into a certified Lipschitz bound.

Read top to bottom: Part 1 is the method in the paper's order (architecture constants, configuration,
model, Muon and the projection after every step, the training loop); Part 2, after the loop, is the machinery.

Recipes
  python data/shakespeare_char.py                          # char-level shards + meta.json
  python train_gpt.py --config configs/quickstart.toml     # ~80 s on a 2-core CPU
  python train_gpt.py --config configs/shakespeare_char.toml --w_max 3
  python data/cached_fineweb10B.py 8                       # 800M GPT-2 tokens of FineWeb
  torchrun --standalone --nproc_per_node=8 train_gpt.py --config configs/nanogpt_145m.toml --w_max 4 --softmax_scale 0.7071
  python train_gpt.py --help                               # every key, its default, its meaning

Precedence of settings: command line > --config TOML file > defaults below (the paper's 145M
NanoGPT hyperparameters; configs/nanogpt_145m.toml adds its reference scripts' data, attention and
eval pipeline, which the defaults leave off). One process runs without a process group; under torchrun the global batch
(in tokens) is fixed and gradient accumulation is derived from the world size.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import datetime
import functools
import glob
import json
import math
import os
import platform
import signal
import subprocess
import sys
import time
import tomllib
from dataclasses import dataclass, field, fields

import numpy as np
import torch
# torch._dynamo before any process group: imported after one exists (the first torch.optim.Optimizer
# imports it), it keeps references to the default group, so destroy_process_group leaves gloo's worker
# threads running into interpreter shutdown, where one that drops its last work object needs the GIL
# and aborts the process ("terminate called without an active exception", SIGABRT, after a finished run).
import torch._dynamo  # noqa: F401
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F

from data.shards import TMP_TAG, DataError, atomic_write, check_token_range, read_shard


# =============================================================================
# Part 1: the method, in the paper's order: architecture, configuration, model, Muon and the
# projection after every step, the training loop. Part 2, after the loop, is the machinery.
# =============================================================================


# -----------------------------------------------------------------------------
# Architecture constants (shared with lipschitz_bound.py, which imports them)

# max_x d/dx GELU(x) = Phi(sqrt 2) + sqrt 2 * phi(sqrt 2) = 1.12890...; the paper rounds it to
# 1.1289. Dividing by the exact value makes gelu(x) / GELU_MAX_SLOPE 1-Lipschitz.
GELU_MAX_SLOPE = 0.5 * (1.0 + math.erf(1.0)) + math.sqrt(2.0) * math.exp(-1.0) / math.sqrt(2.0 * math.pi)

# Attention output is W_o (y / 3): the paper's factor that makes the attention map 1-Lipschitz
# at unit input norm (|dF| <= |dv| + |v|(|dq||k| + |q||dk|) <= 3 |dx| for unit-norm q, k, v).
ATTN_OUT_FACTOR = 1.0 / 3.0
ROPE_BASE = 10000.0       # rope=full
ROPE_HALF_BASE = 1024.0   # rope=half_truncated (the 145M reference scripts')
UNCONSTRAINED_ARCHS = ("baseline", "speedrun")  # norms instead of weight constraints: no certificate


def residual_weight(n_layer: int) -> float:
    """Weight a of each convex residual x <- (1 - a) x + a f(x): 1/(2L) over 2L sub-blocks."""
    return 1.0 / (2 * n_layer)


def residual_coeffs(cfg) -> tuple[float, float]:
    """(skip, branch) of every residual x <- skip x + branch f(x): (1 - a, a) for the Lipschitz GPT,
    (1, 1) for plain_residual and the baseline."""
    if cfg.arch == "lipschitz":
        a = residual_weight(cfg.n_layer)
        return 1.0 - a, a
    return 1.0, 1.0


def attn_out_factor(cfg) -> float:
    """The factor before W_o: ATTN_OUT_FACTOR for the Lipschitz GPT, 1 for plain_residual and the baseline."""
    return ATTN_OUT_FACTOR if cfg.arch == "lipschitz" else 1.0


def attn_scale(cfg) -> float:
    """The factor of q k^T inside the softmax: softmax_scale / d_head (1/d attention, the Lipschitz
    archs), or 1 / sqrt(d_head) (the baseline)."""
    d_head = cfg.d_model // cfg.n_head
    return 1.0 / math.sqrt(d_head) if cfg.arch == "baseline" else cfg.softmax_scale / d_head


# -----------------------------------------------------------------------------
# Configuration: every hyperparameter, typed, with the paper's 145M hyperparameters as defaults;
# each field carries its choices and range (parsing and the rules between fields: Part 2)

DTYPES = {"bf16": torch.bfloat16, "fp32": torch.float32}  # the choices of dtype and soft_cap_dtype
CHECKS = {"positive": ("> 0", lambda v: v > 0 and math.isfinite(v)),
          "nonneg": (">= 0 and finite", lambda v: v >= 0 and math.isfinite(v)),
          "unit": ("in [0, 1]", lambda v: 0.0 <= v <= 1.0),
          "below_one": ("in [0, 1)", lambda v: 0.0 <= v < 1.0),
          "at_least_one": (">= 1 and finite", lambda v: 1.0 <= v < math.inf)}


def setting(default, help: str, choices=(), check: str = "", fixed: bool = False):
    """A Config field: default, --help text, allowed values (a tuple, or a function that returns them when
    the table they come from is defined further down), range check (a key of CHECKS), and fixed: a resume
    may not change it (it shapes the model, its optimizer state or its data stream)."""
    return field(default=default, metadata={"help": help, "choices": choices, "check": check, "fixed": fixed})


def choices_of(f) -> tuple:
    c = f.metadata["choices"]
    return tuple(c()) if callable(c) else c


@dataclass
class Config:
    """Every setting of a run, validated when it is made (Config(...), dataclasses.replace, parse_config,
    config_from_dict: validate_config, once). Assigning to a field afterwards is not checked: change
    settings with dataclasses.replace."""
    # model
    arch: str = setting("lipschitz", "lipschitz (the paper's); plain_residual (the same with residuals x + f(x) and attention output W_o y, no 1/3: the forward pass of the reference code's Shakespeare sweeps, where Modula's Mul multiplied by 1); baseline (RMSNorm pre-norm, QK-norm, tanh logit softcap, 1/sqrt(d) attention, plain residuals); or speedrun (the modded-nanogpt record of 2025-02-01, the paper's 'Baseline (speedrun)': value embeddings, U-net skips, x0 mixing, ReLU^2, attention scale 0.12, no attention in layer 7, FP8 head on CUDA; see SpeedrunGPT; needs n_layer even and >= 8)", choices=("lipschitz", "plain_residual", "baseline", "speedrun"), fixed=True)
    vocab_size: int = setting(50304, "vocabulary size (GPT-2's 50257 padded to 50304); must exceed every token id", check="positive", fixed=True)
    n_layer: int = setting(12, "number of transformer blocks", check="positive", fixed=True)
    n_head: int = setting(6, "attention heads", check="positive", fixed=True)
    d_model: int = setting(768, "residual width", check="positive", fixed=True)
    mlp_ratio: int = setting(4, "MLP hidden width = mlp_ratio * d_model", check="positive", fixed=True)
    seq_len: int = setting(1024, "context length (RoPE tables are built for it)", check="positive", fixed=True)
    softmax_scale: float = setting(24.0, "s in softmax(s q k^T / d_head): the published 145M scripts use 24 at w_max 1", check="positive")
    final_scale: float = setting(1.0, "logits are multiplied by this", check="positive")
    emb_w_max: float = setting(1.0, "cap on each embedding row's RMS norm", check="positive")
    head_w_max: float = setting(1.0, "cap on the head's RMS->RMS norm", check="positive")
    head_spectral: bool = setting(True, "true: the head is a Muon matrix under the chosen constraint; false: Adam with rows projected to RMS <= head_w_max", fixed=True)
    rope: str = setting("full", "RoPE variant: full (head_dim/2 frequencies, base 10000) or half_truncated (the 145M reference scripts': head_dim/4 frequencies (1/1024)^linspace(0, 1) and head_dim/4 zeros, so half of each head is not rotated)", choices=("full", "half_truncated"), fixed=True)
    doc_token: int = setting(-1, "token id that begins a document: attention never crosses into an earlier document (-1: off; the 145M reference scripts: 50256, GPT-2's <|endoftext|>)", fixed=True)
    window_schedule: str = setting("none", "attention window over the steps: none, or reference (the 145M scripts': in blocks of 128 tokens, the smallest multiple of 128 >= 1728 x step / num_steps, at least 128, so 128 -> 1792; a query sees keys in its own and the previous window/128 - 1 blocks)", choices=("none", "reference"), fixed=True)
    layer_pattern: str = setting("", "one letter per layer, L (long: the full window) or S (short: half the window's blocks); empty: all L. The 145M reference at 12 layers: LSSSLSSLSSSL", fixed=True)
    logit_softcap: float = setting(15.0, "baseline: logits = c tanh(logits / c); speedrun: 2c sigmoid(2 logits / c) (the record's 30 sigmoid(z / 7.5) at c = 15: the same map plus c, so the same loss)", check="positive")
    fp8_head: bool = setting(True, "arch=speedrun: training forwards on CUDA run the head as the record's FP8 matmul (x x 2 and W x 2^9 in e4m3, gradients x 2^19 in e5m2, bf16 out); eval, and every forward on CPU, use the plain head (bf16 under dtype=bf16)")
    dropout: float = setting(0.0, "baseline arch only: dropout on embeddings, attention weights and sub-block outputs while training (nanoGPT's char model: 0.2)", check="below_one")
    # optimization
    optimizer: str = setting("muon", "muon or adamw, for the hidden matrices and the head", choices=("muon", "adamw"), fixed=True)
    constraint: str = setting("soft_cap", "projection after every step: a method of the CONSTRAINTS table (Part 2; the README's table says what each does)", choices=lambda: tuple(CONSTRAINTS), fixed=True)
    w_max: float = setting(1.0, "cap on every hidden matrix's RMS->RMS norm (sigma_max)", check="positive")
    wd: float = setting(0.0, "strength of weight_decay (lr-coupled) and spectral_wd", check="nonneg")
    power_iters: int = setting(4, "warm-started power iterations per step for sigma_1 (32 on the first step)", check="nonneg")
    qk_clip_tau: float = setting(0.0, "QK-Clip threshold on the per-head max attention logit; 0 = off", check="nonneg")
    soft_cap_coupling: str = setting("exact", "soft_cap strength: exact (Theorem 3.1 for this step's worst-case update norm, lr x the Newton-Schulz stretch x 1.02), reference (the Shakespeare reference code's: lr / sqrt(d_out/d_in), no stretch; sigma_max may then exceed w_max) or nanogpt (the 145M scripts': lr x the stretch of their coefficients, 1.14502, x 1.05; other constraints ignore it, so a FineWeb config can switch --constraint)", choices=("exact", "reference", "nanogpt"))
    num_steps: int = setting(1770, "optimizer steps", check="positive")
    batch_tokens: int = setting(393216, "global batch in tokens per step (all ranks, all micro-steps)", check="positive")
    micro_batch_tokens: int = setting(49152, "tokens per forward pass per rank; accumulation = batch_tokens / (world * micro_batch_tokens)", check="positive")
    lr_hidden: float = setting(0.05, "learning rate (RMS->RMS update norm for Muon) of hidden matrices", check="positive")
    lr_head: float = setting(0.005, "learning rate of the head", check="positive")
    lr_embed: float = setting(0.1, "learning rate of the embedding (Adam, or the RMS of each row's update with embed_update=rownorm); arch=speedrun: also its value embeddings", check="positive")
    lr_scalar: float = setting(0.04, "arch=speedrun: Adam learning rate of its scalars (x0 and value mixing weights, U-net skip weights; the record's 0.04)", check="positive")
    muon_scale: str = setting("rms", "Muon step of a (d_out, d_in) matrix: rms (lr x sqrt(d_out/d_in) x the orthogonalized update: its RMS->RMS norm is lr) or speedrun (lr x max(1, d_out/d_in)^0.5, the record's)", choices=("rms", "speedrun"))
    lr_alloc: str = setting("uniform", "uniform: each matrix steps at its group's lr; modula: each lr is multiplied by the matrix's share of the update under Modula's masses and sensitivities (blocks_mass; see modula_shares), as the reference code does", choices=("uniform", "modula"))
    blocks_mass: float = setting(16.0, "lr_alloc=modula: mass of all blocks together (embedding and head have mass 1)", check="positive")
    embed_update: str = setting("adam", "adam, or rownorm (the reference code's dualized embedding update: Muon's momentum of the gradient, each row scaled to RMS 1, rows below RMS 1/embed_max_inflation inflated at most embed_max_inflation times)", choices=("adam", "rownorm"), fixed=True)
    embed_max_inflation: float = setting(16.0, "embed_update=rownorm: largest factor by which a row of the momentum is scaled up", check="at_least_one")
    adam_beta1: float = setting(0.8, "Adam beta1 (embedding; AdamW matrices)", check="unit")
    adam_beta2: float = setting(0.95, "Adam beta2", check="unit")
    adam_eps: float = setting(1e-10, "Adam epsilon", check="positive")
    momentum: float = setting(0.95, "Muon momentum after warm-up", check="unit")
    nesterov: bool = setting(True, "Muon orthogonalizes the Nesterov look-ahead (true) or the momentum buffer itself, an EMA of the gradients (false, the reference code's)")
    momentum_warmup_start: float = setting(0.85, "Muon momentum at step 0", check="unit")
    momentum_warmup_steps: int = setting(300, "steps of linear momentum warm-up", check="nonneg")
    ns_steps: int = setting(5, "Newton-Schulz steps for Muon's orthogonalization (run in bf16, or fp32 with dtype=fp32)", check="positive")
    ns_coeffs: str = setting("polar_express", "Newton-Schulz coefficients: polar_express (ours: Polar Express, normalized with a 1.01 margin), reference (the 145M scripts' five fixed quintics after dividing by ||G||_F + 1e-7; needs ns_steps 5) or speedrun (the record's one quintic (3.4445, -4.7750, 2.0315) ns_steps times, after the same division)", choices=("polar_express", "reference", "speedrun"))
    hidden_init: str = setting("orthogonal", "init of W_q, W_k, W_v and W_in: orthogonal (exact, RMS->RMS norm min(1, w_max)) or ns_uniform (the 145M scripts': uniform entries through their 5-step Newton-Schulz, RMS->RMS norm up to ~1.15 at step 0; times min(1, w_max))", choices=("orthogonal", "ns_uniform"))
    embed_cap: str = setting("project", "how rows are held to RMS <= emb_w_max: project (every row, at init and after each step) or lookup (the 145M scripts' nn.Embedding(max_norm=emb_w_max sqrt(d_model)): a row is renormalized in place when a forward pass (training or eval) looks it up)", choices=("project", "lookup"), fixed=True)
    soft_cap_dtype: str = setting("fp32", "precision of the soft cap's polynomial: fp32, or bf16 (the 145M scripts': the capped weights come out rounded to bf16 every step); other constraints ignore it", choices=tuple(DTYPES))
    cooldown_frac: float = setting(0.4, "fraction of steps, at the end, of linear lr decay", check="unit")
    final_lr_frac: float = setting(0.1, "lr multiplier reached at the last step", check="unit")
    seed: int = setting(0, "seed of init and data order")
    # data
    train_bin: str = setting("data/fineweb10B/fineweb_train_*.bin", "glob of training shards")
    val_bin: str = setting("data/fineweb10B/fineweb_val_*.bin", "glob of validation shards")
    loader: str = setting("random", "training data: random (windows of seq_len + 1 drawn with replacement from all shards, seeded) or sequential (the 145M scripts': the shards in order, each token once, one sequence of micro_batch_tokens + 1 per rank and micro-step; needs seq_len = micro_batch_tokens, and refuses to start when the shards cannot cover the run)", choices=("random", "sequential"), fixed=True)
    val_tokens: int = setting(10485760, "validation tokens per eval (rounded down to whole sequences of val_seq_len)", check="positive")
    val_seq_len: int = setting(0, "length of each validation sequence, scored under the attention mask (documents, window) of the current step (0: seq_len; the 145M scripts: 262144)", check="nonneg")
    val_slice_windows: int = setting(0, "also score the reference code's validation slice at every eval: the first N stride-1 windows of the val split (its 20 batches: 1280 at batch 64), as slice_val_loss / slice_val_acc; 0 = off", check="nonneg")
    # runtime
    device: str = setting("auto", "auto, cpu, cuda or cuda:N")
    dtype: str = setting("bf16", "autocast dtype of matmuls: bf16 or fp32 (weights stay fp32)", choices=tuple(DTYPES))
    compile: bool = setting(True, "torch.compile the model (CUDA only)")
    eval_every: int = setting(125, "evaluate every N steps and at the end (0: only at the end)", check="nonneg")
    eval_at_start: bool = setting(False, "also evaluate at step 0, before training (the 145M scripts do)")
    stop_after: int = setting(0, "end the run after N steps, with an eval and a final checkpoint, while the lr, momentum and window schedules still follow num_steps (0: run all num_steps)", check="nonneg")
    init_weights: str = setting("", "torch file of initial weights, loaded after init and before step 0 on every rank (weights only; optimizers start fresh): a state dict in this GPT's names (embed.weight (vocab_size, d_model), blocks.<i>.attn.qkv (3, d, d) = W_q, W_k, W_v stacked as (d_out, d_in), blocks.<i>.attn.proj, blocks.<i>.mlp.fc (mlp_ratio d, d), blocks.<i>.mlp.proj, head (vocab_size, d_model)), or {'model': state dict}; every key and shape must match")
    log_every: int = setting(10, "print a training line every N steps", check="nonneg")
    save_every: int = setting(0, "write a resumable checkpoint every N steps (0: none)", check="nonneg")
    keep_last: int = setting(2, "periodic checkpoints to keep", check="positive")
    resume: str = setting("", "'latest' (newest checkpoint in the run dir; none yet: start the run, so a pre-emptible job can always pass it) or a checkpoint path")
    run_name: str = setting("", "run directory name under logs/ (default: derived from the settings and the time)")
    out_dir: str = setting("", "run directory (default logs/<run_name>)")
    debug: bool = setting(False, "check that weights are identical across ranks at every eval")
    wandb: bool = setting(False, "log metrics to Weights & Biases (rank 0)")
    wandb_project: str = setting("lipschitz-transformers", "W&B project")

    def __post_init__(self):
        validate_config(self)


# -----------------------------------------------------------------------------
# Model: Lipschitz GPT (and the baseline with norms put back). Part 2 has the attention masks of the
# 145M pipeline (doc_token, window_schedule) and the speedrun baseline's model


def rope_tables(seq_len: int, head_dim: int, dtype: torch.dtype = torch.float32, variant: str = "full"):
    """cos and sin (seq_len, head_dim / 2) of RoPE's angles; the certificate builds them in float64.
    full: frequencies ROPE_BASE^(-2i/head_dim). half_truncated (the 145M scripts'): head_dim/4
    frequencies ROPE_HALF_BASE^(-t), t = linspace(0, 1), then head_dim/4 zeros (pairs left unrotated)."""
    if variant == "half_truncated":
        f = (1.0 / ROPE_HALF_BASE) ** torch.linspace(0, 1, steps=head_dim // 4, dtype=dtype)
        inv = torch.cat([f, f.new_zeros(head_dim // 4)])
    else:
        inv = 1.0 / (ROPE_BASE ** (torch.arange(0, head_dim, 2, dtype=dtype) / head_dim))
    ang = torch.outer(torch.arange(seq_len, dtype=dtype), inv)
    return ang.cos(), ang.sin()


def apply_rope(x, cos, sin):
    """Rotate pairs (x1, x2) of the two halves of each head: an orthogonal map, so Lipschitz-neutral."""
    d = x.size(-1) // 2
    x1, x2 = x[..., :d], x[..., d:]
    cos, sin = cos[None, : x.size(1), None, :], sin[None, : x.size(1), None, :]
    return torch.cat([x1 * cos + x2 * sin, x2 * cos - x1 * sin], dim=-1).type_as(x)


def attend(q, k, v, scale: float, mask=None, dropout: float = 0.0):
    """Attention of q, k, v (B, H, T, D): causal SDPA (mask None), SDPA under a dense boolean mask,
    or FlexAttention under a BlockMask (compiled on CUDA; forward only on CPU in torch 2.13)."""
    if mask is None:
        return F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=scale, dropout_p=dropout)
    if torch.is_tensor(mask):
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale, dropout_p=dropout)
    if q.is_cuda:
        return _compiled_flex()(q, k, v, block_mask=mask, scale=scale)
    from torch.nn.attention.flex_attention import flex_attention
    return flex_attention(q, k, v, block_mask=mask, scale=scale)


def rms_norm(x):
    return F.rms_norm(x, (x.size(-1),))


def _dropout(x, p: float):
    """F.dropout when p > 0 (training only; callers pass 0 in eval): no RNG draw and no copy otherwise."""
    return F.dropout(x, p) if p > 0 else x


class Attention(nn.Module):
    def __init__(self, cfg: Config):
        super().__init__()
        self.n_head, self.head_dim = cfg.n_head, cfg.d_model // cfg.n_head
        self.baseline = cfg.arch == "baseline"
        self.scale = attn_scale(cfg)
        self.out_factor = attn_out_factor(cfg)
        self.dropout = cfg.dropout
        self.qkv = nn.Parameter(torch.empty(3, cfg.d_model, cfg.d_model))  # W_q, W_k, W_v: (d_out, d_in)
        self.proj = nn.Parameter(torch.zeros(cfg.d_model, cfg.d_model))
        self.track_max_logit = cfg.qk_clip_tau > 0  # QK-Clip reads max_logit after each training step
        self.register_buffer("max_logit", torch.zeros(cfg.n_head), persistent=False)

    def forward(self, x, cos, sin, mask=None):
        B, T, C = x.shape
        q, k, v = F.linear(x, self.qkv.flatten(0, 1)).view(B, T, 3, self.n_head, self.head_dim).unbind(2)
        if self.baseline:
            q, k = rms_norm(q), rms_norm(k)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)
        if self.track_max_logit and self.training:  # training steps only: eval data never steers QK-Clip
            self._record_max_logit(q, k)
        drop = self.dropout if self.training else 0.0
        y = attend(q, k, v, self.scale, mask, drop)
        y = y.transpose(1, 2).reshape(B, T, C)
        return _dropout(F.linear(y * self.out_factor, self.proj), drop)

    @torch.no_grad()
    def _record_max_logit(self, q, k):
        """Largest causal attention logit per head (for QK-Clip), as a running max."""
        T = q.size(2)
        s = (q.float() @ k.float().mT) * self.scale
        s = s.masked_fill(~torch.ones(T, T, dtype=torch.bool, device=q.device).tril(), float("-inf"))
        self.max_logit.copy_(torch.maximum(self.max_logit, s.amax(dim=(0, 2, 3))))


class MLP(nn.Module):
    def __init__(self, cfg: Config):
        super().__init__()
        self.fc = nn.Parameter(torch.empty(cfg.mlp_ratio * cfg.d_model, cfg.d_model))
        self.proj = nn.Parameter(torch.zeros(cfg.d_model, cfg.mlp_ratio * cfg.d_model))
        self.div = 1.0 if cfg.arch == "baseline" else GELU_MAX_SLOPE
        self.dropout = cfg.dropout

    def forward(self, x):
        # proj (gelu(h) / div) computed as (proj gelu(h)) / div: equal, and the division runs on the d-wide output
        out = F.linear(F.gelu(F.linear(x, self.fc)), self.proj) / self.div
        return _dropout(out, self.dropout if self.training else 0.0)


class Block(nn.Module):
    def __init__(self, cfg: Config):
        super().__init__()
        self.attn, self.mlp = Attention(cfg), MLP(cfg)
        self.baseline = cfg.arch == "baseline"
        self.skip, self.branch = residual_coeffs(cfg)

    def forward(self, x, cos, sin, acts=None, mask=None):
        for f in (lambda h: self.attn(h, cos, sin, mask), self.mlp):
            if self.baseline:
                x = x + f(rms_norm(x))
            else:
                x = self.skip * x + self.branch * f(x)
            if acts is not None:
                acts.append(x.detach())
        return x


@torch.compiler.disable  # an in-place write to a parameter: eager even inside the compiled model
@torch.no_grad()
def _renorm_rows(weight, idx, max_norm: float) -> None:
    """nn.Embedding's max_norm: rows of weight looked up by idx with L2 norm > max_norm scaled to it (in place)."""
    torch.embedding_renorm_(weight.detach(), idx.reshape(-1), max_norm, 2.0)


class GPT(nn.Module):
    def __init__(self, cfg: Config):
        super().__init__()
        self.cfg = cfg
        self.embed = nn.Embedding(cfg.vocab_size, cfg.d_model)
        self.blocks = nn.ModuleList(Block(cfg) for _ in range(cfg.n_layer))
        self.head = nn.Parameter(torch.zeros(cfg.vocab_size, cfg.d_model))
        self.register_rope(cfg)
        self.reset_parameters()

    def register_rope(self, cfg: Config) -> None:
        cos, sin = rope_tables(max(cfg.seq_len, val_len(cfg)), cfg.d_model // cfg.n_head, variant=cfg.rope)
        self.register_buffer("rope_cos", cos, persistent=False)
        self.register_buffer("rope_sin", sin, persistent=False)

    @torch.no_grad()
    def reset_parameters(self):
        """Paper init: q, k, v and W_in orthogonal at RMS->RMS norm min(1, w_max) (hidden_init=ns_uniform:
        the 145M scripts' Newton-Schulz of a uniform matrix instead); output projections and head zero;
        embedding rows Gaussian, projected to RMS <= emb_w_max (embed_cap=lookup: capped when looked up)."""
        cfg = self.cfg
        gain = 1.0 if cfg.constraint == "none" else min(1.0, cfg.w_max)
        for b in self.blocks:
            for W in list(b.attn.qkv) + [b.mlp.fc]:
                if cfg.hidden_init == "ns_uniform":  # the scripts' uniform bound sqrt(3) x 0.5 / sqrt(d_in), then their NS
                    W.uniform_(-NANOGPT_INIT_STD * math.sqrt(3 / W.size(1)), NANOGPT_INIT_STD * math.sqrt(3 / W.size(1)))
                    W.copy_(msign(W, len(NANOGPT_NS), DTYPES[cfg.dtype], "reference"))
                else:
                    nn.init.orthogonal_(W)
                W.mul_(gain * rms_scale(W))
            b.attn.proj.zero_()
            b.mlp.proj.zero_()
        nn.init.normal_(self.embed.weight)
        if cfg.arch not in UNCONSTRAINED_ARCHS and cfg.embed_cap == "project":
            self.embed.weight.copy_(project_rows(self.embed.weight, cfg.emb_w_max))
        self.head.zero_()

    def hidden_matrices(self):
        return [p for b in self.blocks for p in (b.attn.qkv, b.attn.proj, b.mlp.fc, b.mlp.proj)]

    def extra_adam_params(self, cfg: Config) -> list:
        """(parameter, lr) pairs Adam steps besides the embedding and the head: none here."""
        return []

    def logits_from_embeddings(self, x, cos, sin, acts=None, masks=None):
        """Blocks and head on embedding outputs x (B, T, d): the map the certificate bounds (causal
        attention; masks: one per layer, from attention_masks)."""
        return self.logits(self.blocks_forward(x, cos, sin, acts, masks))

    def blocks_forward(self, x, cos, sin, acts=None, masks=None):
        for i, block in enumerate(self.blocks):
            x = block(x, cos, sin, acts, None if masks is None else masks[i])
        return x

    def logits(self, x):
        """The head on the last block's output (any leading shape), in fp32 under autocast."""
        if self.cfg.arch == "baseline":
            x = rms_norm(x)
        logits = F.linear(x, self.head)
        logits = logits.to(torch.promote_types(logits.dtype, torch.float32)) * self.cfg.final_scale  # fp32 under autocast
        if self.cfg.arch == "baseline":
            logits = self.cfg.logit_softcap * torch.tanh(logits / self.cfg.logit_softcap)
        return logits

    @torch.compiler.disable  # built eagerly (cheap block bookkeeping), also when called inside a compiled forward
    def attention_masks(self, idx, step: int) -> list | None:
        """One attention mask per layer for the batch idx (B, T) at `step` (doc_token, window_schedule,
        layer_pattern): FlexAttention BlockMasks on CUDA (T a multiple of ATTN_BLOCK), dense boolean
        masks otherwise; None when attention is plainly causal."""
        cfg = self.cfg
        if not masked_attention(cfg):
            return None
        flex = idx.is_cuda and idx.size(-1) % ATTN_BLOCK == 0  # FlexAttention needs whole blocks (sampling may not have them)
        docs, build = doc_ids(idx, cfg.doc_token), flex_block_mask if flex else dense_mask
        windows = layer_windows(step, cfg)
        built = {w: build(docs, w) for w in set(windows)}
        return [built[w] for w in windows]

    def masks_for(self, idx, step: int | None, masks):
        """masks, or (None given) those of attention_masks at `step` (default num_steps), after checking
        that idx (B, T) fits the RoPE tables."""
        T = idx.size(1)
        if T > self.rope_cos.size(0):
            limit = "seq_len" if self.rope_cos.size(0) == self.cfg.seq_len else "val_seq_len"
            raise ValueError(f"sequence of {T} tokens is longer than {limit}={self.rope_cos.size(0)} (the RoPE tables)")
        return self.attention_masks(idx, self.cfg.num_steps if step is None else step) if masks is None else masks

    def embed_tokens(self, idx):
        """Embedding rows of idx; embed_cap=lookup renormalizes each looked-up row to RMS <= emb_w_max in
        place first (nn.Embedding's max_norm, an L2 norm of emb_w_max sqrt(d_model), as the 145M scripts)."""
        if self.cfg.embed_cap == "lookup":
            _renorm_rows(self.embed.weight, idx, self.cfg.emb_w_max * math.sqrt(self.cfg.d_model))
        return self.embed(idx)

    def features(self, idx, acts=None, step: int | None = None, masks=None):
        """The last block's output for idx (B, T), attention masked as at `step` (default: num_steps)
        or by `masks` (from attention_masks: the training loop builds them outside the compiled model)."""
        masks = self.masks_for(idx, step, masks)
        x = _dropout(self.embed_tokens(idx), self.cfg.dropout if self.training else 0.0)
        if acts is not None:
            acts.append(x.detach())
        return self.blocks_forward(x, self.rope_cos, self.rope_sin, acts, masks)

    def forward(self, idx, targets=None, acts=None, step: int | None = None, masks=None):
        logits = self.logits(self.features(idx, acts, step, masks))
        if targets is None:
            return logits
        return F.cross_entropy(logits.view(-1, logits.size(-1)), targets.reshape(-1))


def make_model(cfg: Config) -> GPT:
    """The model of cfg.arch: SpeedrunGPT for speedrun, else GPT."""
    return SpeedrunGPT(cfg) if cfg.arch == "speedrun" else GPT(cfg)


# -----------------------------------------------------------------------------
# Muon and the projection: after every step, each matrix W <- project(W - lr scale msign(momentum))
# (MatrixOptimizer._update); msign by Newton-Schulz; the default projection, the soft cap, with its
# strength from Theorem 3.1; embedding rows to RMS <= emb_w_max. In Part 2: the other constraints,
# the Newton-Schulz coefficient tables (Polar Express, the reference scripts', the speedrun's) and the
# optimizer's sharding and state


class MatrixOptimizer(torch.optim.Optimizer):
    """Muon (or AdamW) on 2-D (and stacked 3-D) weights, then the weight constraint of each group:
    W <- project(W - lr scale msign(momentum)). Settings come from the run's Config (optimizer,
    momentum, ns_steps, ns_coeffs, muon_scale, constraint, power_iters, wd, soft_cap_coupling, ...);
    a group may set its own lr, w_max and constraint. A group with rows=True (the embedding under
    embed_update=rownorm) steps along the row-normalized momentum instead (each row's update has RMS
    lr) and is projected to row RMS <= its w_max. `shares` maps a parameter to a tensor of shape
    p.shape[:-2]: its matrices step at lr x share (lr_alloc=modula).

    Same-shaped matrices of a group are stacked and processed in one batched call. Under
    torch.distributed, matrix i of a stack is owned by rank i % world: the owner computes its
    update and projection, then the new weights and power-iteration vectors are all-gathered,
    so every rank ends the step with bitwise identical weights. Momentum and Adam moments live
    on the owner only; `matrix_optimizer_state` collects them for checkpoints."""

    def __init__(self, params_groups, cfg: Config, shares: dict | None = None):
        super().__init__(params_groups, dict(lr=0.0, w_max=cfg.w_max, constraint=cfg.constraint, momentum=cfg.momentum))
        self.cfg, self.shares = cfg, shares or {}
        self.ns_dtype, self.cap_dtype = DTYPES[cfg.dtype], DTYPES[cfg.soft_cap_dtype]
        self.mark = lambda name: None  # timer hook (bench_step.py): mark("update") before each projection, mark("constraint") after

    @torch.no_grad()
    def step(self):
        rank, world = dist_info()
        pid = 0
        for group in self.param_groups:
            for shape, params in matrix_stacks(group):
                mine, new_w, new_v = params[rank::world], [], []
                if mine:
                    new_w, new_v = self._update(mine, group, [pid + rank + world * j for j in range(len(mine))])
                if world > 1:
                    new_w = gather_owned(params, new_w, shape, params[0].dtype)
                    if group["constraint"] in NEEDS_POWER_ITERATION:
                        new_v = [v.clone() for v in gather_owned(params, new_v, *state_entry_layout("v", params[0]))]
                torch._foreach_copy_(params, new_w)
                for p, v in zip(params, new_v):  # power-iteration vectors: empty unless the constraint needs them
                    self.state[p]["v"] = v
                pid += len(params)

    def _update(self, params, group, ids):
        """One step of a stack of same-shaped matrices (this rank's): the update, then the projection."""
        cfg, lr, states = self.cfg, self._lr(params, group["lr"]), [self.state[p] for p in params]
        W = torch.stack(params).float()
        G = torch.stack([p.grad if p.grad is not None else torch.zeros_like(p) for p in params]).float()
        if cfg.optimizer == "muon":
            mu = group["momentum"]
            buf = stacked_state(states, "momentum_buffer", G).lerp_(G, 1 - mu)
            m = G.lerp_(buf, mu) if cfg.nesterov else buf  # Nesterov look-ahead (G is this call's own copy), or the EMA
            if group.get("rows"):
                upd, step = normalize_rows(m, cfg.embed_max_inflation), lr
            else:
                upd, step = msign(m, cfg.ns_steps, self.ns_dtype, cfg.ns_coeffs), lr * muon_step_scale(W, cfg.muon_scale)
            if torch.is_tensor(step):  # per-matrix learning rates
                W.sub_(upd * step)
            else:
                W.add_(upd, alpha=-step)
        else:  # adamw: the decay is the constraint 'weight_decay'
            W = W - lr * adam_direction(G, states, cfg)
        self.mark("update")
        if group.get("rows"):
            W, v = project_rows(W, group["w_max"]), None
        else:
            v, iters = self._power_start(params, states, ids) if group["constraint"] in NEEDS_POWER_ITERATION else (None, 0)
            W, v = project(W, group["constraint"], group["w_max"], lr, cfg.wd, self.max_update_norm(lr, rms_scale(W)),
                           v, iters, self.cap_dtype)
        self.mark("constraint")
        return list(W), [] if v is None else list(v)

    def max_update_norm(self, lr, scale: float = 1.0):
        """The update norm the soft cap of a matrix with rms_scale `scale` is coupled to."""
        return max_update_norm(lr, self.cfg.ns_steps, self.cfg.soft_cap_coupling, scale, self.cfg.ns_coeffs)

    def _lr(self, params, lr: float):
        """lr of each matrix of a stack: the float lr, or a (K, ..., 1, 1) tensor of lr x share."""
        if not any(p in self.shares for p in params):
            return lr
        sh = torch.stack([self.shares.get(p, torch.ones(p.shape[:-2])).to(p.device, torch.float32) for p in params])
        return (lr * sh)[..., None, None]

    def _power_start(self, params, states, ids):
        """Start vectors of the power iteration: last step's (warm, power_iters products) or seeded ones (32)."""
        if "v" in states[0]:
            return torch.stack([s["v"] for s in states]), self.cfg.power_iters
        return torch.stack([power_start_vector(p, i) for p, i in zip(params, ids)]), 32


def project(W: torch.Tensor, name: str, w_max: float, lr=0.0, wd: float = 0.0, update_norm=0.0,
            v: torch.Tensor | None = None, iters: int = 0, dtype: torch.dtype = torch.float32):
    """Constraint `name` (a key of CONSTRAINTS) on each matrix of W (..., d_out, d_in), applied to its
    RMS->RMS-scaled form M = W / sqrt(d_out/d_in) so that w_max caps the RMS->RMS norm. What the methods
    need comes with it: this step's lr and wd, the soft cap's strength for updates of norm <= update_norm
    (computed in `dtype`), and for the power-iteration methods `iters` products from start vectors v.
    Returns the new W and the new power-iteration vectors (None when the method uses none). Entries the
    method left as they were keep W's own bits: (W / s) s is not W in floating point unless s is a power
    of 2 (the head's s = sqrt(50304 / 768) is not), so a matrix within its cap would otherwise move by a
    rounding step at every step."""
    scale = rms_scale(W)
    M = W / scale
    args = constraint_args(name, M, w_max, lr, wd, v, iters, update_norm, dtype)
    out = CONSTRAINTS[name](M.float(), args)
    return torch.where(out == M, W, (out * scale).to(W.dtype)), args.v


@dataclass
class ProjArgs:
    """What a constraint may use: cap, this step's lr and decay, soft-cap strength, and the
    power-iteration triplet (u, sigma, v) of M for the methods that need it."""
    w_max: float
    lr: float = 0.0
    wd: float = 0.0
    alpha: float = 0.0
    u: torch.Tensor | None = None
    sigma: torch.Tensor | None = None
    v: torch.Tensor | None = None
    dtype: torch.dtype = torch.float32  # precision of the soft cap's polynomial (soft_cap_dtype)


def constraint_args(name: str, M: torch.Tensor, w_max: float, lr: float, wd: float, v: torch.Tensor | None,
                    iters: int, max_update_norm: float, dtype: torch.dtype = torch.float32) -> ProjArgs:
    """What constraint `name` needs for the stack M: the power-iteration triplet (from start
    vectors v, `iters` products) and the soft-cap strength for updates of norm <= max_update_norm
    (its polynomial run in `dtype`)."""
    args = ProjArgs(w_max=w_max, lr=lr, wd=wd, dtype=dtype)
    if name in NEEDS_POWER_ITERATION:
        args.u, args.sigma, args.v = power_iteration(M, v, iters)
    if name == "soft_cap":
        if torch.is_tensor(max_update_norm):  # one strength per matrix (per-matrix learning rates)
            flat = max_update_norm.flatten().tolist()
            alphas = {x: soft_cap_alpha(w_max, x) for x in set(flat)}
            args.alpha = torch.tensor([alphas[x] for x in flat], device=M.device).view_as(max_update_norm)
        else:
            args.alpha = soft_cap_alpha(w_max, max_update_norm)
    return args


def ns_coefficients(steps: int, kind: str = "polar_express") -> list[tuple[float, float, float]]:
    if kind == "reference":
        return NANOGPT_NS[:steps]
    if kind == "speedrun":
        return [SPEEDRUN_NS] * steps
    return [POLAR_EXPRESS[min(t, len(POLAR_EXPRESS) - 1)] for t in range(steps)]


def msign(G: torch.Tensor, steps: int, dtype: torch.dtype = torch.bfloat16, kind: str = "polar_express") -> torch.Tensor:
    """Polar factor U V^T of each matrix in G (..., m, n) by Polar-Express Newton-Schulz.

    Normalizes by the Frobenius norm (so every singular value is in [0, 1/1.01]) after dividing
    by the largest entry (so 1e-30-sized matrices do not underflow); a zero matrix stays zero.
    kind=reference / speedrun: the 145M scripts' / the speedrun record's map instead, G / (||G||_F + 1e-7)
    in `dtype`, then NANOGPT_NS / SPEEDRUN_NS."""
    X, tall = _wide(G)
    if kind in ("reference", "speedrun"):
        X = X.to(dtype)
        X = quintic_steps(X / (torch.linalg.matrix_norm(X, keepdim=True) + NANOGPT_NS_EPS), ns_coefficients(steps, kind)).float()
        return X.mT if tall else X
    X = X.float()
    top = X.abs().amax(dim=(-2, -1), keepdim=True)  # pre-scale so the Frobenius norm cannot underflow
    X = X / torch.where(top > 0, top, torch.ones_like(top))
    X = (X / (torch.linalg.matrix_norm(X, keepdim=True) * PE_SAFETY + 1e-30)).to(dtype)
    X = quintic_steps(X, ns_coefficients(steps)).float()
    return X.mT if tall else X


def quintic_steps(X: torch.Tensor, coeffs, symmetric: bool = False) -> torch.Tensor:
    """X <- a X + (b A + c A^2) X for each (a, b, c) of coeffs, with A = X X^T (A = X X for a
    symmetric X): the odd quintic a x + b x^3 + c x^5 applied to every singular value."""
    for a, b, c in coeffs:
        A = X @ X if symmetric else X @ X.mT
        X = _mm_add(X, _mm_add(A, A, A, b, c), X, a, 1.0)
    return X


def rms_scale(W: torch.Tensor) -> float:
    """sqrt(d_out / d_in): a matrix's RMS->RMS norm is sigma_max(W) / rms_scale(W)."""
    return math.sqrt(W.size(-2) / W.size(-1))


def muon_step_scale(W: torch.Tensor, rule: str) -> float:
    """Factor of Muon's lr for matrix W (..., d_out, d_in): rms_scale (muon_scale=rms: the update's
    RMS->RMS norm is lr) or max(1, d_out/d_in)^0.5 (muon_scale=speedrun, the record's)."""
    if rule == "speedrun":
        return max(1.0, W.size(-2) / W.size(-1)) ** 0.5
    return rms_scale(W)


BF16_NS_MARGIN = 0.02   # measured bf16 noise on NS outputs is ~0.6% (bf16 matrix tests, Polar Express
                        # at 8+ steps: sigma in [0.994, 1.006]); the worst bf16 output measured in tests/test_constraints.py
                        # stays under this budget


def max_update_norm(lr, ns_steps: int = 5, coupling: str = "exact", scale: float = 1.0, ns_kind: str = "polar_express"):
    """Update norm the soft cap is coupled to. exact: the worst-case RMS->RMS norm of one Muon update,
    lr x the NS polynomial's largest stretch (with the bf16 margin). reference: the Shakespeare reference
    code's lr / sqrt(d_out/d_in) (its Linear.project divides the RMS->RMS norm by the scale again, and
    assumes no stretch). nanogpt: the 145M scripts' lr x 1.14502 x 1.05."""
    if coupling == "nanogpt":
        return lr * NANOGPT_NS_STRETCH * NANOGPT_CAP_MARGIN
    return lr * (ns_max_stretch(ns_steps, ns_kind) * (1 + BF16_NS_MARGIN)) if coupling == "exact" else lr / scale


def soft_cap_alpha(w_max: float, max_update_norm: float) -> float:
    """Strength of the spectral soft cap that keeps sigma <= w_max after a step (Theorem 3.1).

    With k = w_max + max_update_norm the largest reachable singular value, alpha is the
    smallest root >= 0 of f(k) = w_max for f(x) = x - 3a^2 x^5 + 3a^3 x^7 - a^4 x^9, i.e. of
    -k^9 a^4 + 3k^7 a^3 - 3k^5 a^2 + (k - w_max) = 0."""
    k = w_max + max_update_norm
    if k <= w_max:
        return 0.0
    roots = np.roots([-k**9, 3 * k**7, -3 * k**5, 0.0, k - w_max])
    real = sorted(r.real for r in roots if abs(r.imag) < 1e-9 and r.real >= 0)
    # The bound also needs f increasing on [0, k] (else a smaller singular value can land above
    # w_max): f' = p2'(p1(x)) p1'(x) with p2' > 0 and p1'(x) = 1 - 3 a x^2, so 3 a k^2 < 1.
    if not real or 3 * real[0] * k**2 >= 1:
        raise ValueError(f"soft cap cannot bring sigma = {k:.4g} back to w_max = {w_max} with a map that is "
                         f"increasing up to {k:.4g}: lower the learning rate (max update norm {max_update_norm:.4g})")
    return float(real[0])


def c_soft_cap(M, p):
    """Two odd cubics x - a x^3 then x + a x^3 on every singular value (alpha from the coupling:
    a float, or one value per matrix of the stack when their learning rates differ)."""
    if not torch.is_tensor(p.alpha) and p.alpha == 0.0:
        return M
    X, a = M.to(p.dtype), p.alpha.to(p.dtype) if torch.is_tensor(p.alpha) else p.alpha
    X = _gram_apply(X, 1.0, -a)
    return _gram_apply(X, 1.0, a).to(M.dtype)


def _gram_apply(M: torch.Tensor, a: float, b) -> torch.Tensor:
    """a M + b M M^T M, with the Gram matrix formed on the smaller side; b is a float (one fused
    GEMM) or a tensor broadcasting over the stack (one b per matrix)."""
    _, tall = _wide(M)
    if torch.is_tensor(b):
        return a * M + b * (M @ (M.mT @ M) if tall else (M @ M.mT) @ M)
    return _mm_add(M, M, M.mT @ M, a, b) if tall else _mm_add(M, M @ M.mT, M, a, b)


def project_rows(W: torch.Tensor, cap: float) -> torch.Tensor:
    """Each row with RMS above cap scaled to RMS cap (1 - 2 eps of W's dtype); every other row is
    returned bitwise unchanged: embedding rows (and a non-spectral head).

    Idempotent in floating point: the RMS is accumulated in float64 (error ~1e-16), and a scaled row's
    true RMS is at most cap (1 - 2 eps)(1 + eps / 2)^2 < cap (the factor and the product each round
    once in W's dtype), so projecting again finds it within the cap and leaves it alone; rows no token
    touched never move."""
    rms = torch.linalg.vector_norm(W, dim=-1, keepdim=True, dtype=torch.float64) / math.sqrt(W.size(-1))
    factor = (cap * (1 - 2 * torch.finfo(W.dtype).eps) / rms).to(W.dtype)
    return W * torch.where(rms > cap, factor, 1.0)  # x 1.0: the other rows' bits


# -----------------------------------------------------------------------------
# The training step and loop: schedules, the optimizers, what follows the gradients, train()
# (the run it drives, Run, and its signals, Stopper: Part 2)


def run_steps(cfg: Config) -> int:
    """Steps this run trains: stop_after when set (the schedules still follow num_steps), else num_steps."""
    return cfg.stop_after or cfg.num_steps


def lr_factor(step: int, cfg: Config) -> float:
    """Flat, then linear decay to final_lr_frac over the last cooldown_frac of the steps."""
    t = step / cfg.num_steps
    if t < 1 - cfg.cooldown_frac:
        return 1.0
    w = (1 - t) / cfg.cooldown_frac
    return w + (1 - w) * cfg.final_lr_frac


def momentum_at(step: int, cfg: Config) -> float:
    frac = min(step / cfg.momentum_warmup_steps, 1.0) if cfg.momentum_warmup_steps else 1.0
    return (1 - frac) * cfg.momentum_warmup_start + frac * cfg.momentum


def set_schedule(mat_opt: MatrixOptimizer, adam, step: int, cfg: Config) -> float:
    """Learning rates (each group's base_lr x lr_factor) and Muon momentum of this step; returns the factor."""
    frac = lr_factor(step, cfg)
    for g in mat_opt.param_groups:
        g["lr"] = g["base_lr"] * frac
        g["momentum"] = momentum_at(step, cfg)
    for g in adam.param_groups if adam is not None else []:
        g["lr"] = g["base_lr"] * frac
    return frac


def build_optimizers(model: GPT, cfg: Config):
    """MatrixOptimizer for the hidden matrices, the spectral head and (embed_update=rownorm) the
    embedding; Adam for the rest, or None when nothing is left for it."""
    shares = lr_shares(model, cfg)
    groups = [dict(params=model.hidden_matrices(), lr=cfg.lr_hidden, base_lr=cfg.lr_hidden, w_max=cfg.w_max)]
    adam_params = []
    for p, lr, w_max, matrix in ((model.embed.weight, cfg.lr_embed, cfg.emb_w_max, cfg.embed_update == "rownorm"),
                                 (model.head, cfg.lr_head, cfg.head_w_max, cfg.head_spectral)):
        if matrix:
            rows = dict(rows=True, constraint="none") if p is model.embed.weight else {}
            groups.append(dict(params=[p], lr=lr, base_lr=lr, w_max=w_max, **rows))
        else:  # Adam: a share, if any, scales the group's lr
            lr = lr * float(shares.get(p, 1.0))
            adam_params.append(dict(params=[p], lr=lr, base_lr=lr))
    adam_params += [dict(params=[p], lr=lr, base_lr=lr) for p, lr in model.extra_adam_params(cfg)]
    mat = MatrixOptimizer(groups, cfg, shares)
    adam = None
    if adam_params:
        adam = torch.optim.Adam(adam_params, betas=(cfg.adam_beta1, cfg.adam_beta2), eps=cfg.adam_eps,
                                fused=next(model.parameters()).is_cuda)
    return mat, adam


@torch.no_grad()
def project_rowwise(model: GPT, cfg: Config) -> None:
    """Embedding rows (when Adam steps them; MatrixOptimizer projects them under embed_update=rownorm)
    and a non-spectral head's rows. Lipschitz archs only: baseline and speedrun have no constraints."""
    if cfg.arch in UNCONSTRAINED_ARCHS:
        return
    if cfg.embed_update == "adam" and cfg.embed_cap == "project":
        model.embed.weight.copy_(project_rows(model.embed.weight, cfg.emb_w_max))
    if not cfg.head_spectral:
        model.head.copy_(project_rows(model.head, cfg.head_w_max))


def optimizer_step(model: GPT, mat_opt: MatrixOptimizer, adam, cfg: Config) -> int:
    """Everything after the gradients of a step: Muon/AdamW + constraint, Adam, row projections,
    QK-Clip, zeroed gradients. Returns the number of heads QK-Clip scaled (bench_step.py times this)."""
    mat_opt.step()
    if adam is not None:
        adam.step()
    project_rowwise(model, cfg)
    clipped = qk_clip(model, cfg.qk_clip_tau) if cfg.qk_clip_tau > 0 else 0
    model.zero_grad(set_to_none=True)
    return clipped


class TrainingDiverged(RuntimeError):
    pass


def train(cfg: Config) -> dict:
    """Train cfg's model; returns the final metrics (after a signal: where it stopped and its checkpoint)."""
    with Stopper() as stopper:  # from the start: a signal during setup stops at the first step boundary
        run = Run(cfg)  # checks, builds and resumes everything, then writes the run directory
        model, mat_opt, adam, step = run.model, run.mat_opt, run.adam, run.step
        metrics, train_loss, train_s, t0 = {}, None, 0.0, time.perf_counter()
        end = run_steps(cfg)
        while True:
            last = step >= end
            if last or (cfg.eval_every and step % cfg.eval_every == 0 and step > 0) or (step == 0 and cfg.eval_at_start):
                metrics = run.evaluate(step, train_loss)
            if last:
                return run.finish(step, metrics, train_s, t0)
            if any_rank(stopper.requested, run.device):  # a signal to any rank: all save and exit together
                return run.stop(step)
            # one step: the global batch in micro-batches (gradients accumulated, then averaged over ranks),
            # Muon or AdamW, the weight constraint
            t_step = run.clock()
            frac = set_schedule(mat_opt, adam, step, cfg)
            loss_sum = torch.zeros((), device=run.device)
            for x, y in run.loader.next_batch(run.rows, run.rank, run.world, run.accum, run.device):
                masks = model.attention_masks(x, step)  # built outside the compiled model; None: causal
                with run.autocast:
                    loss = run.fwd(x, y, masks=masks)
                (loss / run.accum).backward()
                loss_sum += loss.detach()
            loss_sum = all_reduce_grads(model, loss_sum)
            clipped = optimizer_step(model, mat_opt, adam, cfg)
            train_loss = float(loss_sum) / (run.accum * run.world)
            bad = nonfinite_tensor(model, loss_sum)  # identical on every rank: all stop together
            step += 1
            dt = run.clock() - t_step
            train_s += dt
            if bad:
                raise TrainingDiverged(f"step {step}: non-finite {bad} (train loss {train_loss}); stopped before writing "
                                       f"anything. Last good checkpoint: {run.last_ckpt}")
            if cfg.debug:
                check_ranks_agree(model, step, run.device)
            if cfg.log_every and (step % cfg.log_every == 0 or step == 1):
                run.log(f"step:{step}/{cfg.num_steps} train_loss:{train_loss:.4f} lr_frac:{frac:.3f} "
                        f"step_ms:{1000 * dt:.1f} tok/s:{cfg.batch_tokens / dt:.0f}" + (f" qk_clipped:{clipped}" if clipped else ""),
                        record={"step": step, "train_loss": train_loss, "lr_frac": frac})
            if cfg.save_every and step % cfg.save_every == 0 and step < end:
                run.save_checkpoint(step)


# =============================================================================
# Part 2: the machinery: the other constraints and their numerics, the optimizer's sharding and
# state, Modula step sizes, the speedrun baseline, attention masks, data, evaluation, checkpoints,
# processes, runs, configuration parsing and rules, main.
# =============================================================================


# -----------------------------------------------------------------------------
# Weight constraints: pure functions on the RMS->RMS-scaled matrices M (..., m, n), with what they
# need: Newton-Schulz coefficients and composites, power iteration, the hard cap's Gram-matrix
# numerics; the CONSTRAINTS table; QK-Clip

# Polar Express (Amsel et al. 2025, arXiv 2505.16932) degree-5 coefficients for l = 1e-3 and
# cushion 0.02407; rows 1-7 are then divided as p(x / 1.01) for rounding safety, the 8th row is the
# classic convergent tail repeated for any further step. Any prefix is the optimal T-step map.
PE_TAIL = (1.875, -1.25, 0.375)  # (15 x - 10 x^3 + 3 x^5) / 8: p(1) = 1, p'(1) = p''(1) = 0
_PE_RAW = [
    (8.28721201814563, -23.595886519098837, 17.300387312530933),
    (4.107059111542203, -2.9478499167379106, 0.5448431082926601),
    (3.9486908534822946, -2.908902115962949, 0.5518191394370137),
    (3.3184196573706015, -2.488488024314874, 0.51004894012372),
    (2.300652019954817, -1.6689039845747493, 0.4188073119525673),
    (1.891301407787398, -1.2679958271945868, 0.37680408948524835),
    (1.8750014808534479, -1.2500016453999487, 0.3750001645474248),
]
PE_SAFETY = 1.01
POLAR_EXPRESS = [(a / PE_SAFETY, b / PE_SAFETY**3, c / PE_SAFETY**5) for a, b, c in _PE_RAW] + [PE_TAIL]

MSIGN_EXACT_STEPS = 12  # fp32 msign for the hard cap / Stiefel: converged for normalized sigma >= 1e-4

# The 145M reference scripts' orthogonalization (ns_coeffs=reference): G / (||G||_F + 1e-7), then these
# five quintics (nanogpt/train_spectral_cap.py, `orthogonalize`). Their composite's largest output on
# [0, 1] is 1.14502 (ns_max_stretch), the constant the scripts' soft-cap coupling uses, times 1.05.
NANOGPT_NS = [(4.0848, -6.8946, 2.9270), (3.9505, -6.3029, 2.6377), (3.7418, -5.5913, 2.3037),
              (2.8769, -3.1427, 1.2046), (2.8366, -3.0525, 1.2012)]
NANOGPT_NS_EPS = 1e-7
NANOGPT_NS_STRETCH = 1.14502
NANOGPT_CAP_MARGIN = 1.05
NANOGPT_INIT_STD = 0.5    # hidden_init=ns_uniform: entries uniform with std 0.5 / sqrt(d_in) before the NS map

# ns_coeffs=speedrun: the modded-nanogpt record's (2025-02-01) single quintic, applied ns_steps times after
# the same G / (||G||_F + 1e-7); chosen for slope at 0, not convergence: on a 1e-6 grid its 5-step composite
# maps [0.01, 1] into [0.68, 1.13] (largest output 1.20: ns_max_stretch(5, "speedrun")).
SPEEDRUN_NS = (3.4445, -4.7750, 2.0315)


def _mm_add(C: torch.Tensor, A: torch.Tensor, B: torch.Tensor, beta: float, alpha: float) -> torch.Tensor:
    """beta C + alpha A @ B for matrices or equally shaped stacks (..., m, k) @ (..., k, n): one
    batched GEMM with the scaling and the sum fused (baddbmm), not three elementwise passes."""
    def flat(X):
        return X.reshape(-1, X.size(-2), X.size(-1))
    return torch.baddbmm(flat(C), flat(A), flat(B), beta=beta, alpha=alpha).reshape(C.shape)


def _wide(M: torch.Tensor) -> tuple[torch.Tensor, bool]:
    """(M, False) when M (..., m, n) has m <= n, else (M^T, True): the orientation whose Gram
    matrix X X^T is the smaller one."""
    return (M, False) if M.size(-2) <= M.size(-1) else (M.mT, True)


def quintic_composite(x: np.ndarray, coeffs) -> tuple[np.ndarray, np.ndarray]:
    """The composite of the odd quintics a x + b x^3 + c x^5 of `coeffs` at x (float64) and its
    derivative: what quintic_steps does to each singular value, in exact arithmetic."""
    y, dy = x.copy(), np.ones_like(x)
    for a, b, c in coeffs:
        dy = dy * (a + 3 * b * y**2 + 5 * c * y**4)
        y = a * y + b * y**3 + c * y**5
    return y, dy


@functools.cache
def ns_max_stretch(steps: int, kind: str = "polar_express") -> float:
    """Largest output singular value of `steps` Newton-Schulz steps over inputs in [0, 1].

    Derived, not copied: the composite odd polynomial evaluated in float64 on a grid of spacing
    1e-6, plus the grid's worst-case miss (spacing x the composite's largest slope)."""
    x = np.linspace(0.0, 1.0, 1_000_001)
    y, dy = quintic_composite(x, ns_coefficients(steps, kind))
    return float(y.max() + np.abs(dy).max() * (x[1] - x[0]))


POWER_KRYLOV_DIM = 8  # Rayleigh-Ritz space of power_iteration: its last 7 products with M^T M, plus the start


def power_iteration(M: torch.Tensor, v: torch.Tensor, iters: int):
    """Top singular triplet estimate of each matrix in M (..., m, n) from start vectors v (..., n).

    `iters` products with M^T M from v; the last min(iters, POWER_KRYLOV_DIM - 1, n - 1) of them
    build an orthonormal Krylov basis (Lanczos with full re-orthogonalization: matmuls only, no
    QR call) and Rayleigh-Ritz picks the best vector in it: never worse than plain power
    iteration, and ~3x closer when the top of the spectrum is clustered. Returns (u, sigma, v),
    M v = sigma u. sigma is a lower estimate of sigma_max: use it to steer projections, never in
    a certificate. An all-zero matrix gives sigma = 0 and keeps v, so a warm start never collapses."""
    M = M.float()
    v = F.normalize(v.float(), dim=-1, eps=1e-30).unsqueeze(-1)   # (..., n, 1)
    iters = max(iters, 1)
    k = min(iters, POWER_KRYLOV_DIM - 1, M.size(-1) - 1)
    for _ in range(iters - k):
        w = M.mT @ (M @ v)
        v = torch.where(w.norm(dim=-2, keepdim=True) > 0, F.normalize(w, dim=-2, eps=1e-30), v)
    Q = v
    for _ in range(k):
        w = M.mT @ (M @ Q[..., -1:])
        for _ in range(2):
            w = w - Q @ (Q.mT @ w)
        Q = torch.cat([Q, F.normalize(w, dim=-2, eps=1e-30)], dim=-1)   # (..., n, k + 1)
    MQ = M @ Q
    y = torch.linalg.eigh(MQ.mT @ MQ).eigenvectors[..., -1:]   # top Ritz vector of the small Gram
    x = Q @ y
    v = torch.where(x.norm(dim=-2, keepdim=True) > 0.5, x, v).squeeze(-1)
    Mv = (M @ v.unsqueeze(-1)).squeeze(-1)
    return F.normalize(Mv, dim=-1, eps=1e-30), Mv.norm(dim=-1), v


def spectral_norm_exact(W: torch.Tensor) -> torch.Tensor:
    """sigma_max of each matrix in W (..., m, n) from the float64 Gram matrix on the smaller side
    (eigvalsh); relative error ~1e-13, used for logging and by the certificate."""
    X, _ = _wide(W.detach().double())
    return torch.linalg.eigvalsh(X @ X.mT)[..., -1].clamp_min(0).sqrt()


def _rank1(p: ProjArgs) -> torch.Tensor:
    return p.u.unsqueeze(-1) * p.v.unsqueeze(-2)


def _bcast(x: torch.Tensor) -> torch.Tensor:
    return x.unsqueeze(-1).unsqueeze(-1)


def c_none(M, p):
    """No constraint."""
    return M


def c_weight_decay(M, p):
    """Decoupled, lr-coupled weight decay: M <- (1 - lr wd) M."""
    return M * (1.0 - p.lr * p.wd)


def c_spectral_wd(M, p):
    """Spectral weight decay: top singular value times (1 - wd)."""
    return M - p.wd * _bcast(p.sigma) * _rank1(p)


def c_spectral_normalize(M, p):
    """Divide by max(1, sigma_1 / w_max); sigma_1 is the power-iteration (lower) estimate."""
    return M / _bcast(torch.clamp(p.sigma / p.w_max, min=1.0))


def c_spectral_hammer(M, p):
    """Set the top singular value to w_max (one direction, from power iteration; no guarantee
    on the others, which may stay above w_max)."""
    return M + _bcast(p.w_max - p.sigma) * _rank1(p)


# Exact hard cap, all on the m x m Gram matrix G = X X^T of X = M / cap (wide orientation).
# With B = G - I and S = sign(B) (Su's de-nesting: sign(sigma - 1) = sign(sigma^2 - 1)),
# C = (G + I + B S) / 2 has eigenvalues max(sigma^2, 1), so C^{-1/2} X = U min(sigma, 1) V^T.
# C >= I is well conditioned: C^{-1/2} never amplifies rounding (unlike msign(X) on tiny
# singular values), and the only m x n products are G and the final C^{-1/2} X.
HARD_CAP_TOL = 1e-3        # relative accuracy the step counts below are derived for
HARD_CAP_PASS_RANGE = 2.0  # one pass handles sigma_max <= 2 cap; larger inputs get a cascade


@functools.cache
def _sign_steps(norm_bound: float) -> int:
    """Polar Express steps for sign(B) with eigenvalues |b| <= norm_bound: a wrong sign fraction e
    at b moves the output singular value by ~ e |b| / 4, so require e(x) x <= TOL / norm_bound."""
    x = np.logspace(-12, 0, 4000) / PE_SAFETY
    steps = 1
    while (np.abs(1 - quintic_composite(x, ns_coefficients(steps))[0]) * x).max() > HARD_CAP_TOL / norm_bound:
        steps += 1
    return steps


def _inv_sqrt_steps(s_min: float) -> int:
    """Quintic steps taking every normalized singular value in [s_min, 1] to 1 within 1e-7."""
    s, steps = s_min, 0
    while s > 0 and 1 - s > 1e-7:
        s, steps = s * (PE_TAIL[0] + PE_TAIL[1] * s**2 + PE_TAIL[2] * s**4), steps + 1
    return steps


def _gram_upper_bound(G: torch.Tensor) -> torch.Tensor:
    """Upper bound on lambda_max of each PSD G (..., m, m): the Schatten-16 norm, computed on
    G / ||G||_F so that nothing overflows; at most m^(1/16) (1.5 for m = 768) times too large."""
    f = torch.linalg.matrix_norm(G, keepdim=True)
    P = G / (f + 1e-30)
    for _ in range(3):
        P = P @ P
    return f * torch.linalg.matrix_norm(P, keepdim=True) ** 0.125


def _sym_sign(B: torch.Tensor, steps: int) -> torch.Tensor:
    """sign(B) of symmetric B (..., m, m) with spectral norm <= 1 (Polar Express steps)."""
    B = quintic_steps(B, ns_coefficients(steps), symmetric=True)
    return 0.5 * (B + B.mT)


def _hard_cap_pass(X: torch.Tensor, cap: torch.Tensor, rho: float, G: torch.Tensor) -> torch.Tensor:
    """U min(sigma, cap) V^T of wide X (..., m, n) with Gram G = X X^T, given sigma_max(X) <= rho cap."""
    G = G / cap**2
    eye = torch.eye(G.size(-1), device=G.device, dtype=G.dtype)
    nb = max(1.0, rho**2 - 1.0) * 1.01               # ||G - I||_2 <= max(1, lambda_max - 1), 1% rounding slack
    B = G - eye
    S = _sym_sign(B / nb, _sign_steps(math.ceil(nb * 100) / 100))
    C = 0.5 * (G + eye + B @ S)
    C = 0.5 * (C + C.mT)
    nu = max(1.0, rho**2) * 1.01                     # eigenvalues of C / nu lie in [1 / nu, 1 / 1.01]
    A, Q = C / nu, None
    a, b, c = PE_TAIL
    steps = _inv_sqrt_steps(math.floor(1e4 / math.sqrt(nu)) / 1e4)  # >= 1: nu > 1
    for i in range(steps):                           # Q <- p(A) Q and A <- p(A)^2 A: Q -> (C / nu)^{-1/2}
        P = _mm_add(b * A + a * eye, A, A, 1.0, c)
        Q = P if Q is None else P @ Q
        if i < steps - 1:
            A = P @ (P @ A)
    return (Q @ X) / math.sqrt(nu)


def c_hard_cap(M, p):
    """Exact min(sigma, w_max) on every singular value (to HARD_CAP_TOL relative, fp32).

    Su's de-nested sign formula on the Gram matrix (see the comment above). Inputs with
    sigma_max > HARD_CAP_PASS_RANGE w_max (bounded by the Schatten-16 norm, one host sync) are
    first clipped at geometrically decreasing caps; clipping at c >= w_max and then at w_max
    equals clipping at w_max, so the cascade is exact and each pass sees a bounded range."""
    X, tall = _wide(M.float())
    w = float(p.w_max)
    G = X @ X.mT
    ub = _gram_upper_bound(G).sqrt() * (1 + 1e-3) / w   # sigma_max / w_max, with fp32 slack
    top = float(ub.max())
    if top <= 1.0:  # every matrix certifiably within the cap: left bitwise unchanged
        return M
    R = HARD_CAP_PASS_RANGE
    passes = 1 if top <= R else math.ceil(math.log(top) / math.log(R))
    for k in range(1, passes + 1):
        caps = torch.clamp(ub / R**k, min=1.0) if k < passes else torch.ones_like(ub)
        rho = min(top, R * (1 + 2 * HARD_CAP_TOL)) if passes > 1 else top
        X = _hard_cap_pass(X, caps * w, max(rho, 1.0), G if k == 1 else X @ X.mT)
    X = X.mT if tall else X
    return torch.where(ub <= 1.0, M, X.to(M.dtype))  # ub is (..., 1, 1): per matrix of the stack


# The published hard-cap polynomial (F. Cesista, seed atom.py::_hard_cap): four odd quintics on
# X = M / w_max without normalization. Measured in float64 on a 1e-5 grid: error 0.034 on [0, 1.5]
# (h(1) = 0.966); max of h on [0, x] is 1.0109 for every x <= 4.05 and then explodes (sign flip
# near 4.06, h(4.5) ~ 3e81). The limit is applied to the power-iteration sigma, a lower estimate
# (a few % low when cold): 3.5 leaves a 15% margin below 4.05.
HARD_CAP_POLY = [(0.805032, 0.206361, -0.019763), (0.649867, 0.162935, -0.011150),
                 (1.810259, -0.200265, 0.008251), (1.004384, -0.183490, 0.014413)]
HARD_CAP_POLY_MAX_INPUT = 3.5  # sigma / w_max
HARD_CAP_POLY_MAX_OUTPUT = 1.011  # sup of h on [0, 4.05]: the polynomial's own overshoot of the cap


def c_hard_cap_poly(M, p):
    """The paper's fixed hard-cap polynomial (reproduction only; refuses sigma > 3.5 w_max)."""
    ratio = float((p.sigma / p.w_max).max())
    if ratio > HARD_CAP_POLY_MAX_INPUT:
        raise ValueError(f"hard_cap_poly is only valid for sigma_max <= {HARD_CAP_POLY_MAX_INPUT} w_max, got ~{ratio:.3g} w_max; "
                         "use constraint hard_cap (exact) instead")
    X, tall = _wide(M.float() / p.w_max)
    X = quintic_steps(X, HARD_CAP_POLY)
    return (X.mT if tall else X) * p.w_max


def c_stiefel(M, p):
    """All singular values to w_max: w_max msign(M) (fp32, 12 steps: exact for singular values
    >= 4e-5 ||M||_F; smaller ones come out between 0 and w_max; a zero matrix stays zero)."""
    return msign(M, MSIGN_EXACT_STEPS, torch.float32) * p.w_max


def c_svd_clip(M, p):
    """Exact reference: SVD, clip singular values at w_max, recompose (float64; a matrix within the
    cap comes back bitwise unchanged, the float64 round trip being far below fp32's rounding)."""
    U, S, Vh = torch.linalg.svd(M.double(), full_matrices=False)
    return ((U * S.clamp(max=p.w_max).unsqueeze(-2)) @ Vh).to(M.dtype)


CONSTRAINTS = {
    "none": c_none, "weight_decay": c_weight_decay, "spectral_wd": c_spectral_wd,
    "spectral_normalize": c_spectral_normalize, "spectral_hammer": c_spectral_hammer,
    "soft_cap": c_soft_cap, "hard_cap": c_hard_cap, "hard_cap_poly": c_hard_cap_poly,
    "stiefel": c_stiefel, "svd_clip": c_svd_clip,
}
NEEDS_POWER_ITERATION = {"spectral_wd", "spectral_normalize", "spectral_hammer", "hard_cap_poly"}

# Methods after which sigma_max <= w_max holds (hard_cap, stiefel, svd_clip: to 1e-3 relative;
# soft_cap: by Theorem 3.1 given the coupling). spectral_normalize is not among them: it holds
# only as far as the power-iteration sigma_1 is exact, and the warm-started estimate lags a
# clustered top by up to ~0.9% under Muon-sized steps (scripts/bench_constraints.py).
GUARANTEED = {"soft_cap", "hard_cap", "stiefel", "svd_clip"}


@torch.no_grad()
def qk_clip(model: GPT, tau: float) -> int:
    """QK-Clip (Kimi K2): for each head whose max logit this step exceeded tau, scale its W_q and
    W_k rows by sqrt(tau / S_max). Returns the number of heads clipped."""
    n = 0
    _, world = dist_info()
    for b in model.blocks:
        att = b.attn
        S = att.max_logit.clone()
        if world > 1:
            dist.all_reduce(S, op=dist.ReduceOp.MAX)
        D = att.head_dim
        for h in torch.nonzero(S > tau).flatten().tolist():
            g = math.sqrt(tau / float(S[h]))
            att.qkv[:2, h * D:(h + 1) * D].mul_(g)  # W_q and W_k rows of head h
            n += 1
        att.max_logit.zero_()
    return n


# -----------------------------------------------------------------------------
# The optimizer's machinery: ranks, stacks, state, Adam's direction, checkpointed state


def dist_info() -> tuple[int, int]:
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def any_rank(flag: bool, device) -> bool:
    """Collective: whether flag is true on any rank (the flag itself without a process group)."""
    if dist_info()[1] == 1:
        return flag
    t = torch.tensor([float(flag)], device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return bool(t.item())


def gather_owned(params: list, mine: list, shape: tuple, dtype: torch.dtype) -> list:
    """Collective: entry i (of `shape`) of params[i], whose owner is rank i % world; each rank passes
    the entries of params[rank::world] in order as mine, and every rank gets all of them."""
    _, world = dist_info()
    K, device = -(-len(params) // world), params[0].device
    buf = torch.zeros((K,) + shape, device=device, dtype=dtype)
    if mine:
        buf[: len(mine)] = torch.stack(mine)
    out = torch.empty((world * K,) + shape, device=device, dtype=dtype)
    dist.all_gather_into_tensor(out, buf)
    return [out[(i % world) * K + i // world] for i in range(len(params))]


def matrix_stacks(group) -> list:
    """(shape, params) of a group's parameters by shape, in a fixed order (a 3-D param is a stack of matrices)."""
    by_shape: dict[tuple, list] = {}
    for p in group["params"]:
        by_shape.setdefault(tuple(p.shape), []).append(p)
    return list(by_shape.items())


def power_start_vector(p, idx: int) -> torch.Tensor:
    """Seeded start vectors of the power iteration of parameter p (one per matrix), the same on every rank."""
    g = torch.Generator().manual_seed(1000003 * idx + p.size(-1))
    return torch.randn(p.shape[:-2] + (p.size(-1),), generator=g).to(p.device)


def state_entry_layout(key: str, p) -> tuple:
    """(shape, dtype) of optimizer state entry `key` of parameter p: Adam's step count, the power-iteration
    vectors (one per matrix of p) or a tensor shaped like p."""
    layouts = {"t": ((), torch.int64), "v": (tuple(p.shape[:-2]) + (p.size(-1),), torch.float32)}
    return layouts.get(key, (tuple(p.shape), torch.float32))


def stacked_state(states, key, like):
    """One stacked tensor of a state entry (zeros where missing) whose rows are the per-param
    entries (views): reused as is on the next step unless an entry was replaced (a loaded
    checkpoint), so a step neither stacks the state nor splits it back."""
    bufs = [s.get(key) for s in states]
    base = bufs[0]._base if bufs[0] is not None else None
    if base is not None and base.shape == like.shape and all(
            b is not None and b._base is base and b.data_ptr() == base[i].data_ptr() for i, b in enumerate(bufs)):
        return base
    base = torch.stack([b if b is not None else torch.zeros_like(g) for b, g in zip(bufs, like)])
    for s, b in zip(states, base):
        s[key] = b
    return base


def adam_direction(G: torch.Tensor, states: list, cfg: Config) -> torch.Tensor:
    """AdamW's bias-corrected m / (sqrt(v) + eps) for the stacked gradients G (optimizer=adamw)."""
    b1, b2 = cfg.adam_beta1, cfg.adam_beta2
    m = stacked_state(states, "exp_avg", G).lerp_(G, 1 - b1)
    v2 = stacked_state(states, "exp_avg_sq", G).mul_(b2).addcmul_(G, G, value=1 - b2)
    t = states[0].get("t", 0) + 1
    for s in states:
        s["t"] = t
    return (m / (1 - b1**t)) / ((v2 / (1 - b2**t)).sqrt() + cfg.adam_eps)


def matrix_optimizer_state(opt: MatrixOptimizer) -> dict:
    """Optimizer state of every matrix, gathered from its owner rank (collective call)."""
    rank, world = dist_info()
    out = {}
    for group in opt.param_groups:
        keys = ("momentum_buffer",) if opt.cfg.optimizer == "muon" else ("exp_avg", "exp_avg_sq", "t")
        keys += ("v",) if group["constraint"] in NEEDS_POWER_ITERATION else ()
        for shape, params in matrix_stacks(group):
            entries = [{} for _ in params]
            for key in keys:
                mine = [opt.state.get(p, {}).get(key) for p in params[rank::world]]
                if world > 1:  # every owner has the key (a stack steps together) or none has: before step 1
                    if any_rank(any(t is None for t in mine), params[0].device):
                        continue
                    mine = gather_owned(params, [torch.as_tensor(t, device=params[0].device) for t in mine],
                                        *state_entry_layout(key, params[0]))
                for e, t in zip(entries, mine):
                    if t is not None:
                        e[key] = int(t) if key == "t" else t.detach().cpu().clone()
            for e in entries:
                out[str(len(out))] = e
    return {"state": out}


def load_matrix_optimizer_state(opt: MatrixOptimizer, sd: dict) -> None:
    """The inverse of matrix_optimizer_state (every rank loads every entry)."""
    pid = 0
    for group in opt.param_groups:
        for shape, params in matrix_stacks(group):
            for p in params:
                entry = sd["state"].get(str(pid), {})
                opt.state[p] = {k: (v.to(p.device) if torch.is_tensor(v) else v) for k, v in entry.items()}
                pid += 1


# -----------------------------------------------------------------------------
# Per-module step sizes: Modula's masses and sensitivities (lr_alloc=modula)
#
# Modula (Large et al. 2024, "Scalable Optimization in the Modular Norm", arXiv 2405.14813) splits
# one update budget t over a network by two numbers per module: its mass (every matrix 1, the
# blocks together scaled to blocks_mass) and its sensitivity (a matrix 1, a scalar multiplier c:
# c; a composition the product; branches that meet in a sum, or in attention's q-k-v product, the
# sum). Branches get t x their mass fraction; in a composition f_n o ... o f_1, part f_i gets
# t x (its mass fraction) / (sensitivities of f_{i+1} .. f_n): what comes after amplifies it.
# Then every matrix's update moves the output by at most t in total. The tree below mirrors this
# file's forward pass (residual_coeffs, attn_out_factor, softmax_scale, final_scale); a node is
# ("atom", name, mass), ("scale", c), ("seq", children in order of application) or ("par", children).


def modula_tree(cfg: Config) -> tuple:
    L = cfg.n_layer
    m = cfg.blocks_mass / (6 * L)  # six matrices per layer share the blocks' mass
    skip, branch = residual_coeffs(cfg)

    def residual(f):
        return ("par", [("scale", skip), ("seq", [f, ("scale", branch)])])

    layers = []
    for i in range(L):
        p = f"blocks.{i}."
        scores = ("seq", [("par", [("atom", p + "attn.q", m), ("atom", p + "attn.k", m)]), ("scale", cfg.softmax_scale)])
        attn = ("seq", [("par", [("atom", p + "attn.v", m), scores]), ("scale", attn_out_factor(cfg)), ("atom", p + "attn.proj", m)])
        mlp = ("seq", [("atom", p + "mlp.fc", m), ("scale", 1.0), ("atom", p + "mlp.proj", m)])  # gelu / GELU_MAX_SLOPE: 1
        layers += [residual(attn), residual(mlp)]
    return ("seq", [("atom", "embed.weight", 1.0), *layers, ("atom", "head", 1.0), ("scale", cfg.final_scale)])


def _mass(n) -> float:
    return n[2] if n[0] == "atom" else 0.0 if n[0] == "scale" else sum(_mass(c) for c in n[1])


def _sensitivity(n) -> float:
    if n[0] in ("atom", "scale"):
        return 1.0 if n[0] == "atom" else n[1]
    s = [_sensitivity(c) for c in n[1]]
    return math.prod(s) if n[0] == "seq" else sum(s)


def _allocate(n, t: float, out: dict) -> None:
    if n[0] == "atom":
        out[n[1]] = t
    elif n[0] != "scale":
        total = _mass(n)
        for i, c in enumerate(n[1]):
            after = math.prod(_sensitivity(d) for d in n[1][i + 1:]) if n[0] == "seq" else 1.0
            _allocate(c, t * _mass(c) / total / after, out)


def modula_shares(cfg: Config) -> dict[str, float]:
    """Each matrix's share of the update under Modula's rules (keys as matrix_norms: q, k, v apart)."""
    out: dict[str, float] = {}
    _allocate(modula_tree(cfg), 1.0, out)
    return out


def lr_shares(model, cfg: Config) -> dict:
    """{parameter: tensor of shape p.shape[:-2]} of lr multipliers; empty for lr_alloc=uniform."""
    if cfg.lr_alloc == "uniform":
        return {}
    sh = modula_shares(cfg)
    return {p: torch.tensor([sh[k] for k, _ in named_matrices({name: p})]).view(p.shape[:-2])
            for name, p in model.named_parameters()}


def normalize_rows(G: torch.Tensor, max_inflation: float) -> torch.Tensor:
    """Each row of G divided by max(RMS(row), 1 / max_inflation): rows to RMS 1, small rows scaled
    up at most max_inflation times, zero rows (tokens absent from the batch) stay zero. The
    duality map of the embedding in Modula: the steepest direction under a max-row-RMS norm."""
    rms = G.float().pow(2).mean(dim=-1, keepdim=True).sqrt()
    return G / torch.clamp(rms, min=1.0 / max_inflation).to(G.dtype)


# -----------------------------------------------------------------------------
# arch = "speedrun": the modded-nanogpt record of 2025-02-01 (KellerJordan/modded-nanogpt,
# records/track_1_short/2025-02-01_RuleTweak; 1770 steps, val loss 3.2788 on 8 x H100), the paper's
# "Baseline (speedrun)" row. SpeedrunGPT has GPT's interface (features, logits, attention_masks,
# forward) on the record's model, built from the pieces below; the record's attention masks, RoPE,
# loader, Newton-Schulz map, Muon step scale and learning rates are configuration
# (configs/paper/speedrun_baseline.toml). Constants are the record's.

SPEEDRUN_ATTN_SCALE = 0.12       # softmax(0.12 q.k) on QK-normed heads, instead of 1/sqrt(head_dim)
SPEEDRUN_VALUE_EMBEDS = 3        # value embeddings 0, 1, 2 feed layers 0, 1, 2 and again the last three
SPEEDRUN_NO_ATTN_LAYER = 7       # the record's 8th layer is MLP only
SPEEDRUN_INIT_STD = 0.5          # q, k, v and W_in: uniform entries of std 0.5 / sqrt(d_in)
SPEEDRUN_X0_MIX = (1.0, 0.0)     # initial (a, b) of each block's x <- a x + b x0
SPEEDRUN_V_MIX = (0.5, 0.5)      # initial (a, b) of v <- a v + b ve (v <- a v where a layer has no ve)
SPEEDRUN_FP8_SCALES = (2.0, 2.0**9, 2.0**19)  # FP8 head: scales of x, W (e4m3) and the output gradient (e5m2)


def relu2(x):
    return F.relu(x).square()


def value_embedding_layers(n_layer: int) -> list:
    """Which value embedding each layer mixes into v, or None: 0, 1, 2, None, ..., None, 0, 1, 2."""
    k = SPEEDRUN_VALUE_EMBEDS
    return list(range(k)) + [None] * (n_layer - 2 * k) + list(range(k))


class FP8Linear(torch.autograd.Function):
    """x W^T (x: (N, d_in), W: (d_out, d_in)) through float8 matmuls (torch._scaled_mm, CUDA with FP8):
    x s_x and W s_w rounded to e4m3, the output gradient g s_g to e5m2, each product unscaled after;
    output and input gradient bf16, weight gradient fp32 (the record's FP8 head)."""

    @staticmethod
    def forward(ctx, x, w, s_x: float, s_w: float, s_g: float):
        xf = (x.to(torch.bfloat16) * s_x).to(torch.float8_e4m3fn)
        wf = (w * s_w).to(torch.float8_e4m3fn)
        ctx.save_for_backward(xf, wf)
        ctx.scales = s_x, s_w, s_g
        return torch._scaled_mm(xf, wf.t(), scale_a=_inv(s_x, x), scale_b=_inv(s_w, x),
                                out_dtype=torch.bfloat16, use_fast_accum=True)

    @staticmethod
    def backward(ctx, g):
        xf, wf = ctx.saved_tensors
        s_x, s_w, s_g = ctx.scales
        gf = (g.contiguous() * s_g).to(torch.float8_e5m2)
        # _scaled_mm wants its first operand row-major and its second column-major
        gx = torch._scaled_mm(gf, wf.t().contiguous().t(), scale_a=_inv(s_g, g), scale_b=_inv(s_w, g),
                              out_dtype=torch.bfloat16)
        gw = torch._scaled_mm(xf.t().contiguous(), gf.t().contiguous().t(), scale_a=_inv(s_x, g),
                              scale_b=_inv(s_g, g), out_dtype=torch.float32).t()
        return gx, gw, None, None, None


def _inv(s: float, like: torch.Tensor) -> torch.Tensor:
    return torch.tensor(1.0 / s, dtype=torch.float32, device=like.device)


class SpeedrunAttention(nn.Module):
    """QK-normed, RoPE'd attention at scale SPEEDRUN_ATTN_SCALE whose values mix in a value embedding."""

    def __init__(self, cfg: Config):
        super().__init__()
        self.n_head, self.head_dim = cfg.n_head, cfg.d_model // cfg.n_head
        self.qkv = nn.Parameter(torch.empty(3, cfg.d_model, cfg.d_model))  # W_q, W_k, W_v: (d_out, d_in)
        self.proj = nn.Parameter(torch.zeros(cfg.d_model, cfg.d_model))
        self.lambdas = nn.Parameter(torch.tensor(SPEEDRUN_V_MIX))

    def forward(self, x, ve, cos, sin, mask=None):
        B, T, C = x.shape
        q, k, v = F.linear(x, self.qkv.flatten(0, 1)).view(B, T, 3, self.n_head, self.head_dim).unbind(2)
        q, k = apply_rope(rms_norm(q), cos, sin), apply_rope(rms_norm(k), cos, sin)
        v = self.lambdas[0] * v if ve is None else self.lambdas[0] * v + self.lambdas[1] * ve.view_as(v)
        y = attend(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), SPEEDRUN_ATTN_SCALE, mask)
        return F.linear(y.transpose(1, 2).reshape(B, T, C), self.proj)


class SpeedrunMLP(nn.Module):
    def __init__(self, cfg: Config):
        super().__init__()
        self.fc = nn.Parameter(torch.empty(cfg.mlp_ratio * cfg.d_model, cfg.d_model))
        self.proj = nn.Parameter(torch.zeros(cfg.d_model, cfg.mlp_ratio * cfg.d_model))

    def forward(self, x):
        return F.linear(relu2(F.linear(x, self.fc)), self.proj)


class SpeedrunBlock(nn.Module):
    """x <- a x + b x0, then pre-norm attention (if the layer has it) and MLP residuals."""

    def __init__(self, cfg: Config, attention: bool):
        super().__init__()
        self.lambdas = nn.Parameter(torch.tensor(SPEEDRUN_X0_MIX))
        self.attn = SpeedrunAttention(cfg) if attention else None
        self.mlp = SpeedrunMLP(cfg)

    def forward(self, x, x0, ve, cos, sin, mask=None, acts=None):
        x = self.lambdas[0] * x + self.lambdas[1] * x0
        branches = ([lambda h: self.attn(h, ve, cos, sin, mask)] if self.attn is not None else []) + [self.mlp]
        for f in branches:
            x = x + f(rms_norm(x))
            if acts is not None:
                acts.append(x.detach())
        return x


class SpeedrunGPT(GPT):
    """The record's GPT: x0 = norm(embedding); blocks in a U-net (the first half's outputs are added,
    weighted by skip_weights, to the inputs of the second half in reverse order); value embeddings
    (value_embedding_layers); final norm; head (FP8Linear in CUDA training forwards when fp8_head);
    logits 2c sigmoid(2z / c), c = logit_softcap (30 sigmoid(z / 7.5) at c = 15)."""

    def __init__(self, cfg: Config):
        nn.Module.__init__(self)
        self.cfg = cfg
        self.embed = nn.Embedding(cfg.vocab_size, cfg.d_model)
        self.value_embeds = nn.ModuleList(nn.Embedding(cfg.vocab_size, cfg.d_model) for _ in range(SPEEDRUN_VALUE_EMBEDS))
        self.blocks = nn.ModuleList(SpeedrunBlock(cfg, attention=i != SPEEDRUN_NO_ATTN_LAYER) for i in range(cfg.n_layer))
        self.skip_weights = nn.Parameter(torch.ones(cfg.n_layer // 2))
        self.head = nn.Parameter(torch.zeros(cfg.vocab_size, cfg.d_model))
        self.register_rope(cfg)
        self.reset_parameters()

    @torch.no_grad()
    def reset_parameters(self):
        """The record's init: embeddings N(0, 1); q, k, v, W_in uniform of std SPEEDRUN_INIT_STD / sqrt(d_in);
        output projections and head zero; mixing weights SPEEDRUN_X0_MIX, SPEEDRUN_V_MIX; skip weights 1."""
        for e in [self.embed, *self.value_embeds]:
            nn.init.normal_(e.weight)
        for b in self.blocks:
            for W in ([*b.attn.qkv] if b.attn is not None else []) + [b.mlp.fc]:
                bound = math.sqrt(3.0) * SPEEDRUN_INIT_STD / math.sqrt(W.size(-1))
                W.uniform_(-bound, bound)
            if b.attn is not None:
                b.attn.proj.zero_()
                b.attn.lambdas.copy_(torch.tensor(SPEEDRUN_V_MIX))
            b.mlp.proj.zero_()
            b.lambdas.copy_(torch.tensor(SPEEDRUN_X0_MIX))
        self.skip_weights.fill_(1.0)
        self.head.zero_()

    def hidden_matrices(self):
        return [p for b in self.blocks for p in ((b.attn.qkv, b.attn.proj) if b.attn is not None else ()) + (b.mlp.fc, b.mlp.proj)]

    def extra_adam_params(self, cfg: Config) -> list:
        """(parameter, lr) Adam steps besides the embedding and head: value embeddings at lr_embed and
        every scalar (mixing and skip weights) at lr_scalar, the record's groups."""
        return [(e.weight, cfg.lr_embed) for e in self.value_embeds] + [(p, cfg.lr_scalar) for p in self.parameters() if p.ndim < 2]

    def features(self, idx, acts=None, step: int | None = None, masks=None):
        masks = self.masks_for(idx, step, masks)
        x = x0 = rms_norm(self.embed(idx))
        if acts is not None:
            acts.append(x.detach())
        ve = [e(idx) for e in self.value_embeds]
        ves = [None if j is None else ve[j] for j in value_embedding_layers(len(self.blocks))]
        half, skips = len(self.skip_weights), []
        for i, block in enumerate(self.blocks):
            if i >= half:
                x = x + self.skip_weights[i - half] * skips.pop()
            x = block(x, x0, ves[i], self.rope_cos, self.rope_sin, None if masks is None else masks[i], acts)
            if i < half:
                skips.append(x)
        return x

    def logits(self, x):
        x = rms_norm(x)
        if self.training and self.cfg.fp8_head and x.is_cuda:
            shape = x.shape[:-1]
            z = FP8Linear.apply(x.reshape(-1, x.size(-1)), self.head, *SPEEDRUN_FP8_SCALES).view(*shape, -1)
        else:
            z = F.linear(x, self.head)
        c = self.cfg.logit_softcap
        return 2 * c * torch.sigmoid(z.float() / (c / 2))


# -----------------------------------------------------------------------------
# Attention masks: causal, within documents, in a block-wise window that grows over the steps.
# The 145M reference scripts' FlexAttention masks, as a rule on token pairs: query q sees key k iff
# k <= q, both lie in the same document (documents begin at doc_token), and k's block of ATTN_BLOCK
# tokens is among the last W blocks up to q's (W = window_blocks, at least 1; short layers W // 2).
# On CUDA a FlexAttention BlockMask, elsewhere the same rule as a dense boolean mask for SDPA.

ATTN_BLOCK = 128      # FlexAttention block of the reference scripts; windows are whole blocks
WINDOW_GROWTH = 1728  # the scripts' window: smallest multiple of ATTN_BLOCK >= 1728 x step / num_steps (128 -> 1792)


def masked_attention(cfg) -> bool:
    return cfg.doc_token >= 0 or cfg.window_schedule != "none"


def val_len(cfg) -> int:
    return cfg.val_seq_len or cfg.seq_len


def window_blocks(step: int, cfg) -> int | None:
    """Window of a long layer at `step`, in blocks (its own block and the ones before), or None (no window)."""
    if cfg.window_schedule == "none":
        return None
    return max(1, math.ceil(WINDOW_GROWTH * (step / cfg.num_steps) / ATTN_BLOCK))


def layer_windows(step: int, cfg) -> list:
    """Window of each layer at `step`: long layers (L) window_blocks, short ones (S) half of it, >= 1 block."""
    w = window_blocks(step, cfg)
    return [w if w is None or c == "L" else max(1, w // 2) for c in (cfg.layer_pattern or "L" * cfg.n_layer)]


def doc_ids(idx: torch.Tensor, doc_token: int) -> torch.Tensor:
    """Document index of every position of idx (..., T): the number of doc_tokens up to and including it."""
    if doc_token < 0:
        return torch.zeros_like(idx, dtype=torch.int32)
    return (idx == doc_token).cumsum(-1, dtype=torch.int32)


def mask_rule(q, k, doc_q, doc_k, window: int | None):
    """Whether query position q may attend to key position k (broadcasting tensors)."""
    ok = (k <= q) & (doc_q == doc_k)
    return ok if window is None else ok & (q // ATTN_BLOCK - k // ATTN_BLOCK < window)


def dense_mask(docs: torch.Tensor, window: int | None) -> torch.Tensor:
    """mask_rule for every pair of a batch of sequences: bool (B, 1, T, T), True = attend (for SDPA)."""
    pos = torch.arange(docs.size(-1), device=docs.device)
    return mask_rule(pos[:, None], pos[None, :], docs[:, :, None], docs[:, None, :], window)[:, None]


def flex_block_mask(docs: torch.Tensor, window: int | None):
    """mask_rule as a FlexAttention BlockMask for docs (B, T), T a multiple of ATTN_BLOCK. Blocks are
    classified from each block's first and last document index (documents are contiguous): a key
    block is skipped, fully visible, or partial (mask_rule is applied inside)."""
    from torch.nn.attention.flex_attention import BlockMask
    B, T = docs.shape
    n = T // ATTN_BLOCK
    blocks = docs.reshape(B, n, ATTN_BLOCK)
    lo, hi = blocks[..., 0], blocks[..., -1]
    i = torch.arange(n, device=docs.device)
    near = (i[:, None] - i[None, :] < window) if window is not None else torch.ones(n, n, dtype=torch.bool, device=docs.device)
    same_any = (lo[:, :, None] <= hi[:, None, :]) & (hi[:, :, None] >= lo[:, None, :])
    same_all = (lo[:, :, None] == hi[:, None, :]) & (hi[:, :, None] == lo[:, None, :])
    full = (i[:, None] > i[None, :]) & same_all & near
    partial = (i[:, None] >= i[None, :]) & same_any & near & ~full

    def ordered(blocks):  # (B, 1, n) counts and (B, 1, n, n) indices, the visible blocks first
        order = blocks.to(torch.int8).argsort(dim=-1, descending=True, stable=True)
        return blocks.sum(-1, dtype=torch.int32)[:, None].contiguous(), order.to(torch.int32)[:, None].contiguous()

    # The whole rule again token by token (the eager path reads only this); the window as a tensor, so
    # that compiled kernels see an input, not a constant that changes with the step (no recompiles).
    win = None if window is None else torch.tensor(window, device=docs.device)

    def mask_mod(b, h, q, k):
        return mask_rule(q, k, docs[b, q], docs[b, k], win)

    return BlockMask.from_kv_blocks(*ordered(partial), *ordered(full), BLOCK_SIZE=ATTN_BLOCK, mask_mod=mask_mod)


@functools.cache
def _compiled_flex():
    from torch.nn.attention.flex_attention import flex_attention
    return torch.compile(flex_attention, dynamic=False)


# -----------------------------------------------------------------------------
# Data: random training windows and the validation split from the speedrun's .bin shards
# (the format itself: data/shards.py)


def find_shards(pattern: str, what: str) -> list[str]:
    files = sorted(glob.glob(pattern))
    if not files:
        raise DataError(f"no {what} shards match '{pattern}': prepare the data first "
                        f"(python data/shakespeare_char.py, or python data/cached_fineweb10B.py N) or fix --{what}_bin")
    return files


def check_data_meta(cfg: Config) -> None:
    """If a meta.json (JSON only, never a pickle) sits next to the train shards, its vocab_size
    must fit in the config's. Read before any shard, so the mismatch is a config error."""
    path = os.path.join(os.path.dirname(cfg.train_bin), "meta.json")
    if not os.path.isfile(path):
        return
    try:
        with open(path, "rb") as fh:
            meta = json.loads(fh.read().decode("utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise DataError(f"{path}: not a readable JSON meta file ({e}); re-create it with the data script") from None
    v = meta.get("vocab_size") if isinstance(meta, dict) else None
    if not isinstance(v, int) or isinstance(v, bool) or v <= 0:
        raise DataError(f"{path}: expected a positive integer 'vocab_size', got {v!r}; re-create it with the data script")
    if cfg.vocab_size < v:
        raise ConfigError(f"vocab_size={cfg.vocab_size} in the config is smaller than vocab_size={v} of the data "
                          f"({path}); set --vocab_size {v} (or larger)")


class TrainLoader:
    """Random windows of seq_len + 1 tokens from all shards, drawn from one seeded generator on
    every rank: the global batch of a step is the same whatever the world size, and each rank
    and micro-step takes its own rows. The generator's state is the loader's resume position."""

    def __init__(self, pattern: str, seq_len: int, vocab_size: int, seed: int):
        files = find_shards(pattern, "train")
        self.shards = [read_shard(f) for f in files]
        for f, s in zip(files, self.shards):  # a whole-shard check (~0.1 s per 100M tokens): fail now, not at step 10k
            check_token_range(s, vocab_size, f)
        self.seq_len = seq_len
        starts = [max(len(s) - seq_len, 0) for s in self.shards]
        if sum(starts) == 0:
            raise DataError(f"train shards '{pattern}' hold fewer than seq_len + 1 = {seq_len + 1} tokens")
        self.cum = torch.tensor(np.cumsum(starts), dtype=torch.int64)
        self.gen = torch.Generator().manual_seed(seed)

    def next_batch(self, rows: int, rank: int, world: int, accum: int, device):
        """Draw one step's global batch (rows per micro-batch per rank) and return this rank's
        `accum` micro-batches as (x, y) pairs."""
        total = rows * world * accum
        pos = torch.randint(int(self.cum[-1]), (total,), generator=self.gen)
        shard = torch.searchsorted(self.cum, pos, right=True)
        offset = pos - torch.cat([self.cum.new_zeros(1), self.cum])[shard]
        out = []
        for a in range(accum):
            lo = (a * world + rank) * rows
            batch = [torch.from_numpy(self.shards[i][o: o + self.seq_len + 1].astype(np.int64))
                     for i, o in zip(shard[lo: lo + rows].tolist(), offset[lo: lo + rows].tolist())]
            b = torch.stack(batch)
            b = (b.pin_memory() if device.type == "cuda" else b).to(device, non_blocking=True)
            out.append((b[:, :-1], b[:, 1:]))
        return out

    def state_dict(self):
        return {"gen": self.gen.get_state()}

    def load_state_dict(self, sd):
        self.gen.set_state(sd["gen"])


def steps_in_shard(n_tokens: int, batch_tokens: int) -> int:
    """Steps a shard of n_tokens gives the sequential loader: reads start at 0, B, 2B, ... while
    start + B + 1 < n_tokens (B = batch_tokens), the rule of the 145M scripts' loader."""
    return (n_tokens - batch_tokens - 2) // batch_tokens + 1 if n_tokens >= batch_tokens + 2 else 0


class SequentialLoader:
    """The 145M reference scripts' training stream: the shards in sorted order, each token once. Step s
    reads B = batch_tokens + 1 tokens from offset p of its shard (p = 0, B, 2B, ... while p + B + 1 <
    shard length; then the next shard from 0); sequence j = a * world + rank of the step (micro-step a)
    is tokens[p + j L : p + (j + 1) L + 1], L = micro_batch_tokens. With world x accum equal to the
    scripts' world size this is their token layout exactly (rank r takes sequence r). The position is
    a function of the step count alone: the loader's resume state."""

    def __init__(self, pattern: str, batch_tokens: int, seq_len: int, vocab_size: int, steps: int):
        files = find_shards(pattern, "train")
        sizes = [len(read_shard(f)) for f in files]  # headers and memory maps only: nothing is read yet
        per = [steps_in_shard(n, batch_tokens) for n in sizes]
        if sum(per) < steps:
            best = max(per)
            need = "no shard holds one step" if best == 0 else (
                f"at {best} steps per shard of {max(sizes)} tokens that is {-(-steps // best)} shards "
                f"(FineWeb: python data/cached_fineweb10B.py {-(-steps // best)})")
            raise DataError(f"train shards '{pattern}': {len(files)} shard(s) of {sum(sizes)} tokens cover {sum(per)} steps "
                            f"of batch_tokens={batch_tokens} read in order, each token once; this run needs {steps} steps: "
                            f"{need}. Add shards, or lower num_steps / stop_after")
        self.files, self.sizes, self.per = files, sizes, per
        self.batch_tokens, self.seq_len, self.step = batch_tokens, seq_len, 0
        used, left = 0, steps
        while left > 0:  # range-check every shard the run reads (~0.1 s per 100M tokens): fail now, not at step 10k
            check_token_range(read_shard(files[used]), vocab_size, files[used])
            left -= per[used]
            used += 1
        self._cached = (-1, None)

    def position(self, step: int) -> tuple[int, int]:
        """(shard index, token offset) of step's batch."""
        for i, n in enumerate(self.per):
            if step < n:
                return i, step * self.batch_tokens
            step -= n
        raise DataError(f"the train shards cover {sum(self.per)} steps; step {sum(self.per) + step} is past them")

    def next_batch(self, rows: int, rank: int, world: int, accum: int, device):
        """This rank's `accum` micro-batches of one step, each (x, y) of shape (1, seq_len)."""
        shard, p = self.position(self.step)
        if self._cached[0] != shard:
            self._cached = (shard, read_shard(self.files[shard]))
        toks, L, out = self._cached[1], self.seq_len, []
        for a in range(accum):
            lo = p + (a * world + rank) * L
            b = torch.from_numpy(toks[lo: lo + L + 1].astype(np.int64))[None]
            b = (b.pin_memory() if device.type == "cuda" else b).to(device, non_blocking=True)
            out.append((b[:, :-1], b[:, 1:]))
        self.step += 1
        return out

    def state_dict(self):
        return {"step": self.step, "files": [os.path.basename(f) for f in self.files], "tokens": self.sizes}

    def load_state_dict(self, sd):
        names = [os.path.basename(f) for f in self.files]
        if sd["files"][: len(names)] != names[: len(sd["files"])] or sd["tokens"][: len(names)] != self.sizes[: len(sd["tokens"])]:
            raise ValueError("the train shards differ from the checkpoint's (names or sizes): the sequential stream "
                             "would not continue where it stopped; restore the shards it was trained on")
        self.step = int(sd["step"])


def load_val_tokens(pattern: str, n_tokens: int, seq_len: int, vocab_size: int) -> torch.Tensor:
    """The first n_tokens (whole windows of seq_len) of the validation shards, range-checked."""
    chunks, have = [], 0
    for f in find_shards(pattern, "val"):
        t = torch.from_numpy(read_shard(f)[: n_tokens + 1 - have].astype(np.int64))
        check_token_range(t, vocab_size, f)
        chunks.append(t)
        have += t.numel()
        if have >= n_tokens + 1:
            break
    toks = torch.cat(chunks)
    n_win = (toks.numel() - 1) // seq_len
    if n_win == 0:
        raise DataError(f"val shards '{pattern}' hold fewer than seq_len + 1 = {seq_len + 1} tokens")
    return toks[: n_win * seq_len + 1]


def load_val_slice(cfg: Config) -> torch.Tensor:
    """The tokens of the reference code's validation slice: val_slice_windows stride-1 windows from
    the start of the val split (its unshuffled loader's first 20 batches), range-checked."""
    need = cfg.val_slice_windows + cfg.seq_len
    toks = load_val_tokens(cfg.val_bin, need + cfg.seq_len, cfg.seq_len, cfg.vocab_size)
    if toks.numel() < need:
        raise DataError(f"val shards '{cfg.val_bin}' hold {toks.numel()} tokens, fewer than the {need} that "
                        f"val_slice_windows={cfg.val_slice_windows} stride-1 windows of seq_len + 1 need")
    return toks[:need]


# -----------------------------------------------------------------------------
# Evaluation and the logged norms


def named_matrices(params: dict):
    """(key, matrix) of every weight as the forward pass uses it, in parameter order; attn.qkv gives
    three keys attn.q, attn.k, attn.v. The keys of matrix_norms and of the certificate's norms."""
    for name, p in params.items():
        if name.endswith("attn.qkv"):
            yield from ((name[:-3] + n, p[i]) for i, n in enumerate("qkv"))
        else:
            yield name, p


def matrix_norms(model: GPT) -> dict[str, float]:
    """RMS->RMS norm of every matrix as the forward pass uses it (float64 Gram eigenvalues); each
    embedding's (speedrun: and value embedding's) largest row RMS. Scalars (speedrun) are left out."""
    out = {}
    for key, W in named_matrices(dict(model.named_parameters())):
        if key == "embed.weight" or key.startswith("value_embeds."):
            out[key.removesuffix(".weight") + ".max_row_rms"] = float(W.detach().double().pow(2).mean(-1).sqrt().max())
        elif W.ndim < 2:
            continue
        else:
            out[key] = float(spectral_norm_exact(W)) / rms_scale(W)
    return out


class ActivationMax:
    """Receives each residual-stream activation the model appends (the `acts` protocol of
    GPT.forward) and keeps only the running max |entry| and max row RMS in out (2,), so an eval
    holds no activations."""

    def __init__(self, out: torch.Tensor):
        self.out = out

    def append(self, a: torch.Tensor) -> None:
        a = a.float()
        torch.maximum(self.out, torch.stack([a.abs().max(), a.pow(2).mean(-1).sqrt().max()]).double(), out=self.out)


EVAL_LOGIT_TOKENS = 1 << 15  # evaluate applies the head to at most this many positions at once: 6.6 GB of fp32
                             # logits at vocab 50304 (a 262,144-token val sequence at once would need 53 GB)


@torch.no_grad()
def evaluate(model: GPT, val: torch.Tensor, cfg: Config, device, autocast_ctx, rows: int,
             starts: torch.Tensor | None = None, seq_len: int | None = None, step: int | None = None) -> dict:
    """Val loss and accuracy over the sequences val[s : s + seq_len + 1], s in starts (default: every
    whole non-overlapping sequence), seq_len default cfg.seq_len, attention masked as at `step`
    (default num_steps), split over ranks and all-reduced; the largest activation entry / RMS of the
    residual stream and the largest |logit| (max_logit)."""
    rank, world = dist_info()
    T = seq_len or cfg.seq_len
    if starts is None:
        starts = torch.arange((val.numel() - 1) // T) * T
    idx = starts[rank::world]
    stats = torch.zeros(6, dtype=torch.float64, device=device)  # loss sum, correct, count, max|x|, max rms, max|logit|
    model.eval()
    for i in range(0, len(idx), rows):
        pos = idx[i:i + rows, None] + torch.arange(T + 1)[None]
        b = val[pos].to(device)
        x, y = b[:, :-1].reshape(-1, T), b[:, 1:].reshape(-1)
        with autocast_ctx:
            h = model.features(x, acts=ActivationMax(stats[3:5]), step=step)
            h = h.reshape(-1, h.size(-1))
            for lo in range(0, h.size(0), EVAL_LOGIT_TOKENS):
                logits, t = model.logits(h[lo:lo + EVAL_LOGIT_TOKENS]), y[lo:lo + EVAL_LOGIT_TOKENS]
                stats[0] += F.cross_entropy(logits, t, reduction="sum").double()
                stats[1] += (logits.argmax(-1) == t).sum()
                stats[5] = torch.maximum(stats[5], logits.abs().max().double())
        stats[2] += y.numel()
    model.train()
    if world > 1:
        dist.all_reduce(stats[:3])
        dist.all_reduce(stats[3:], op=dist.ReduceOp.MAX)
    return {"val_loss": float(stats[0] / stats[2]), "val_acc": float(stats[1] / stats[2]),
            "max_act_entry": float(stats[3]), "max_act_rms": float(stats[4]), "max_logit": float(stats[5])}


# -----------------------------------------------------------------------------
# Checkpoints and run files: atomic writes, weights_only loading, checksums


def atomic_save(obj, path: str) -> None:
    """Write bytes as they are, anything else with torch.save, by data/shards.py's atomic write (the
    old file or the new one, never a partial one); a failed write is a CheckpointError naming path."""
    try:
        atomic_write(path, (lambda fh: fh.write(obj)) if isinstance(obj, bytes) else (lambda fh: torch.save(obj, fh)))
    except OSError as e:
        raise CheckpointError(f"{path}: write failed ({e}); the previous file, if any, is untouched") from None


class CheckpointError(ValueError):
    pass


def content_checksum(obj) -> str:
    """SHA-256 of a checkpoint's content (tensors' dtype, shape and bytes; other values' repr),
    walked in sorted-key order. torch's zip reader does not verify CRCs: a flipped bit in the
    weights would load silently. The stored checksum catches it (~1 s per GB)."""
    import hashlib
    h = hashlib.sha256()

    def walk(x):
        if torch.is_tensor(x):
            t = x.detach().cpu().contiguous()
            h.update(f"T{t.dtype}{tuple(t.shape)}".encode())
            h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")
        elif isinstance(x, dict):
            keys = sorted((k for k in x if k != "checksum"), key=repr)
            h.update(f"D{len(keys)}".encode())
            for k in keys:
                h.update(repr(k).encode())
                walk(x[k])
        elif isinstance(x, (list, tuple)):
            h.update(f"L{len(x)}".encode())
            for v in x:
                walk(v)
        else:
            h.update(f"V{x!r}".encode())
    walk(obj)
    return h.hexdigest()


def load_checkpoint(path: str, map_location="cpu") -> dict:
    """Load a checkpoint of this repo with weights_only=True (no pickled code runs), check its
    structure and, when it has one, its content checksum."""
    if not os.path.isfile(path):
        raise CheckpointError(f"{path}: no such checkpoint")
    try:
        ck = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as e:  # torch raises many types for truncated zips / pickles that need code
        msg = str(e).strip().splitlines()[0][:200] if str(e).strip() else type(e).__name__
        raise CheckpointError(f"{path}: not a loadable checkpoint of this repo ({msg})") from None
    if not isinstance(ck, dict) or not isinstance(ck.get("model"), dict) or not isinstance(ck.get("config"), dict):
        raise CheckpointError(f"{path}: not a checkpoint of this repo (expected a dict with 'model' and 'config' dicts)")
    if not all(isinstance(k, str) and torch.is_tensor(v) for k, v in ck["model"].items()):
        raise CheckpointError(f"{path}: 'model' is not a state dict of named tensors")
    if "checksum" in ck and ck["checksum"] != content_checksum(ck):
        raise CheckpointError(f"{path}: content checksum mismatch: the file is corrupt (bit flips or a partial copy); "
                              "use an earlier checkpoint")
    return ck


def config_from_checkpoint(ck: dict, path: str = "checkpoint") -> Config:
    """The saved config of a loaded checkpoint, validated; any fault is a CheckpointError naming path."""
    try:
        cfg = config_from_dict(ck["config"], f"{path} config")
    except ConfigError as e:
        raise CheckpointError(f"{path}: invalid config ({e})") from None
    return cfg


def load_init_weights(model: GPT, path: str) -> None:
    """init_weights: replace the model's weights by those of `path`, a state dict in this GPT's names or
    {'model': state dict} (any float dtype; stored in the model's). Every key and shape must match."""
    if not os.path.isfile(path):
        raise ConfigError(f"init_weights={path}: no such file")
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # torch raises many types for files that are not (safe) torch pickles
        msg = str(e).strip().splitlines()[0][:200] if str(e).strip() else type(e).__name__
        raise CheckpointError(f"init_weights={path}: not a loadable torch file ({msg})") from None
    sd = obj["model"] if isinstance(obj, dict) and isinstance(obj.get("model"), dict) else obj
    if not isinstance(sd, dict) or not all(isinstance(k, str) and torch.is_tensor(v) for k, v in sd.items()):
        raise CheckpointError(f"init_weights={path}: expected a state dict of named tensors or {{'model': state dict}}")
    own = model.state_dict()
    problems = [f"missing {k} {tuple(v.shape)}" for k, v in own.items() if k not in sd]
    problems += [f"unexpected {k}" for k in sd if k not in own]
    problems += [f"{k} has shape {tuple(sd[k].shape)}, the model {tuple(v.shape)}" for k, v in own.items()
                 if k in sd and sd[k].shape != v.shape]
    problems += [f"{k} is not floating point and finite" for k, v in own.items()
                 if k in sd and sd[k].shape == v.shape and not (sd[k].is_floating_point() and bool(torch.isfinite(sd[k]).all()))]
    if problems:
        raise CheckpointError(f"init_weights={path} does not fit this config's GPT ({'; '.join(problems[:6])}"
                              f"{'; ...' if len(problems) > 6 else ''}); see --help init_weights for the names")
    with torch.no_grad():
        for k, v in own.items():
            v.copy_(sd[k])


def model_from_checkpoint(path: str, map_location="cpu") -> tuple[GPT, Config, dict]:
    """Rebuild the model of a checkpoint from its saved config; needs nothing else."""
    ck = load_checkpoint(path, map_location)
    cfg = config_from_checkpoint(ck, path)
    model = make_model(cfg)
    try:
        model.load_state_dict(ck["model"])
    except RuntimeError as e:
        raise CheckpointError(f"{path}: weights do not match its config ({str(e).splitlines()[0]})") from None
    return model, cfg, ck


CKPT_STEP_PREFIX = "ckpt_step"  # periodic checkpoints are ckpt_step<N>.pt, N zero-padded to 6 digits
FINAL_CKPT = "ckpt_final.pt"    # weights and config at the end of a run; its presence marks the run finished


def step_of(path: str) -> int:
    """N of a periodic checkpoint ckpt_step<N>.pt, or -1 when the name is not of that form."""
    digits = os.path.basename(path)[len(CKPT_STEP_PREFIX):-len(".pt")]
    return int(digits) if digits.isdigit() else -1


def list_checkpoints(run_dir: str) -> list[str]:
    """Periodic checkpoints of a run directory, oldest first (temporary files of interrupted writes
    never match)."""
    paths = glob.glob(os.path.join(glob.escape(run_dir), f"{CKPT_STEP_PREFIX}*.pt"))
    return sorted((p for p in paths if step_of(p) >= 0), key=step_of)


def remove_stale_tmp(run_dir: str) -> list[str]:
    """Delete <file>.tmp.<pid> left in run_dir by a killed writer (the run dir belongs to one run)."""
    stale = glob.glob(os.path.join(glob.escape(run_dir), f"*{TMP_TAG}*"))
    for p in stale:
        with contextlib.suppress(OSError):
            os.remove(p)
    return stale


def system_info() -> str:
    lines = [f"python {sys.version.split()[0]}, torch {torch.__version__}, numpy {np.__version__}",
             f"host {platform.node()}, {platform.platform()}, {os.cpu_count()} cpus"]
    if torch.cuda.is_available():
        lines.append(f"cuda {torch.version.cuda}: " + ", ".join(torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())))
    with contextlib.suppress(Exception):
        lines.append("git " + subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True,
                                             cwd=os.path.dirname(os.path.abspath(__file__)), timeout=5).stdout.strip())
    return "\n".join(lines)


# -----------------------------------------------------------------------------
# Processes: torchrun, signals, gradients and errors across ranks


def setup_distributed(cfg: Config):
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if cfg.device == "auto":
        dev = f"cuda:{local_rank}" if torch.cuda.is_available() else "cpu"
    else:
        dev = cfg.device if cfg.device != "cuda" else f"cuda:{local_rank}"
        if world > 1 and dev.startswith("cuda:") and dev != f"cuda:{local_rank}":
            raise ConfigError(f"device={cfg.device} under torchrun would put every rank on one GPU; "
                              "use --device cuda (each rank takes cuda:LOCAL_RANK) or auto")
    if dev.startswith("cuda"):
        if not torch.cuda.is_available():
            raise ConfigError(f"device={cfg.device} but CUDA is not available; use --device cpu")
        torch.cuda.set_device(dev)
    if world > 1 and not dist.is_initialized():
        dist.init_process_group("nccl" if dev.startswith("cuda") else "gloo", device_id=torch.device(dev) if dev.startswith("cuda") else None)
    return rank, world, torch.device(dev)


def all_reduce_grads(model: GPT, loss_sum: torch.Tensor) -> torch.Tensor:
    """Collective: every gradient averaged over ranks and the loss summed, in one flat all-reduce;
    returns the summed loss."""
    world = dist_info()[1]
    if world == 1:
        return loss_sum
    grads = [p.grad for p in model.parameters() if p.grad is not None]
    flat = torch.cat([g.reshape(-1) for g in grads] + [loss_sum.reshape(1)])
    dist.all_reduce(flat)
    flat[:-1].div_(world)
    torch._foreach_copy_(grads, [c.view_as(g) for c, g in zip(torch.split(flat[:-1], [g.numel() for g in grads]), grads)])
    return flat[-1]


class Stopper:
    """SIGTERM / SIGINT set a flag; the loop saves a checkpoint and exits cleanly at the next step
    boundary. A second signal interrupts at once (the previous checkpoint stays loadable)."""

    def __init__(self):
        self.requested = False
        self._old = {}

    def __enter__(self):
        for s in (signal.SIGTERM, signal.SIGINT):
            with contextlib.suppress(ValueError):  # not the main thread: no handlers, no flag
                self._old[s] = signal.signal(s, self._handle)
        return self

    def _handle(self, signum, frame):
        if self.requested:
            raise KeyboardInterrupt(f"second {signal.Signals(signum).name}")
        self.requested = True

    def __exit__(self, *exc):
        for s, h in self._old.items():
            signal.signal(s, h)


class OtherRankFailed(RuntimeError):
    pass


class RanksDisagree(RuntimeError):
    pass


@contextlib.contextmanager
def agreed_errors(device, os_error: str = ""):
    """Collective: a config, data or checkpoint error raised in the block (with os_error, also an
    OSError, as a CheckpointError starting with os_error) is raised on every rank when the block
    ends: the failing rank raises its own, the others a pointer to it, so none waits forever."""
    err = None
    try:
        yield
    except (ConfigError, DataError, CheckpointError) as e:
        err = e
    except OSError as e:
        if not os_error:
            raise
        err = CheckpointError(f"{os_error} ({e})")
    if any_rank(err is not None, device) and err is None:
        raise OtherRankFailed("another rank stopped with an error (its message is printed above)")
    if err is not None:
        raise err


def check_ranks_agree(model: GPT, step: int, device) -> None:
    """Debug check (collective): every parameter is bitwise equal to rank 0's; if not, every rank raises."""
    rank, world = dist_info()
    if world == 1:
        return
    bad = []
    for name, p in model.named_parameters():
        ref = p.detach().clone()
        dist.broadcast(ref, src=0)
        if not torch.equal(ref, p.detach()):
            bad.append(name)
    if any_rank(bool(bad), device):
        where = f"rank {rank} differs from rank 0 in {', '.join(bad)}" if bad else "another rank differs from rank 0"
        raise RanksDisagree(f"step {step}: weights are not identical across ranks ({where}); "
                            "the sharded optimizer or the gradient all-reduce is broken")


def nonfinite_tensor(model: GPT, loss: torch.Tensor) -> str | None:
    """Name of the first non-finite value among the loss and the weights, or None (one sync)."""
    named = list(model.named_parameters())
    ok = torch.stack([torch.isfinite(loss).all()] + [torch.isfinite(p.detach()).all() for _, p in named])
    if bool(ok.all()):
        return None
    i = int((~ok).nonzero()[0, 0])
    return "loss" if i == 0 else f"weight {named[i - 1][0]}"


# -----------------------------------------------------------------------------
# Runs: the run directory, resume, checkpoints, logs


def default_run_name(cfg: Config) -> str:
    stamp = datetime.datetime.now().strftime("%Y%m%d-%H%M%S")
    return f"{cfg.arch}_{cfg.optimizer}_{cfg.constraint}_w{cfg.w_max:g}_s{cfg.seed}_{stamp}"


def resolve_run(cfg: Config) -> tuple[str, str, dict | None]:
    """The run directory and, when resuming, the checkpoint, checked against the config.
    Read-only: nothing is written before every rank has passed every check."""
    if not cfg.resume:
        cfg.run_name = cfg.run_name or default_run_name(cfg)
        run_dir = cfg.out_dir or os.path.join("logs", cfg.run_name)
        if os.path.exists(os.path.join(run_dir, "config.json")):
            raise ConfigError(f"run directory {run_dir} already holds a run; pass --resume latest to continue it, "
                              "or choose another --run_name / --out_dir")
        return run_dir, "", None
    if cfg.resume == "latest":
        if not cfg.out_dir and not cfg.run_name:
            raise ConfigError("--resume latest needs --run_name or --out_dir of the run to continue")
        run_dir = cfg.out_dir or os.path.join("logs", cfg.run_name)
        if os.path.exists(os.path.join(run_dir, FINAL_CKPT)):
            raise ConfigError(f"--resume latest: {run_dir} holds {FINAL_CKPT}: that run has finished")
        ckpts = list_checkpoints(run_dir)
        if not ckpts:  # first launch, or killed before its first checkpoint: (re)start the run
            cfg.run_name = cfg.run_name or os.path.basename(os.path.normpath(run_dir))
            return run_dir, "", None
        resume_path = ckpts[-1]
    else:
        resume_path = cfg.resume
        run_dir = cfg.out_dir or os.path.dirname(os.path.abspath(resume_path))
    ck = load_checkpoint(resume_path)
    old = config_from_checkpoint(ck, resume_path)
    changed = [f"{f.name}: {getattr(old, f.name)} -> {getattr(cfg, f.name)}" for f in fields(Config)
               if f.metadata["fixed"] and getattr(old, f.name) != getattr(cfg, f.name)]
    if changed:
        raise ConfigError(f"--resume {resume_path}: the config changes the model ({'; '.join(changed)}); "
                          "resume with the checkpoint's settings")
    if not isinstance(ck.get("optimizers"), dict) or not isinstance(ck.get("step"), int) or ck["step"] < 0:
        raise CheckpointError(f"{resume_path}: holds no optimizer state or step (a final checkpoint?); resume from a ckpt_step*.pt")
    if ck["step"] > cfg.num_steps:
        raise ConfigError(f"--resume {resume_path}: the checkpoint is at step {ck['step']}, past --num_steps {cfg.num_steps}")
    if os.path.exists(os.path.join(run_dir, FINAL_CKPT)):
        raise ConfigError(f"{run_dir} holds {FINAL_CKPT}: that run has finished. To train on from {resume_path}, "
                          "also pass a new --out_dir")
    newer = [p for p in list_checkpoints(run_dir) if step_of(p) > ck["step"]]
    if newer:
        raise ConfigError(f"--resume {resume_path}: {run_dir} holds a newer checkpoint ({os.path.basename(newer[-1])}) "
                          "that this run would prune; resume from it (--resume latest), or pass a new --out_dir")
    cfg.run_name = cfg.run_name or old.run_name
    return run_dir, resume_path, ck


def restore(ck: dict, path: str, model: GPT, mat_opt: MatrixOptimizer, adam, loader: TrainLoader) -> int:
    """Load model, optimizer, loader and RNG state from a resumable checkpoint; returns its step."""
    try:
        model.load_state_dict(ck["model"])
        load_matrix_optimizer_state(mat_opt, ck["optimizers"]["matrix"])
        for p, st in mat_opt.state.items():
            for k, t in st.items():
                if torch.is_tensor(t) and tuple(t.shape) != state_entry_layout(k, p)[0]:
                    raise ValueError(f"optimizer state '{k}' of shape {tuple(t.shape)} for a parameter of shape {tuple(p.shape)}")
        if adam is not None:
            adam.load_state_dict(ck["optimizers"]["adam"])
        loader.load_state_dict(ck["loader"])
        torch.set_rng_state(ck["rng"]["torch"])
        if ck["rng"].get("cuda") is not None and model.head.is_cuda:
            torch.cuda.set_rng_state(ck["rng"]["cuda"], model.head.device)
    except (KeyError, TypeError, ValueError, RuntimeError, AttributeError, IndexError) as e:
        msg = (str(e).strip().splitlines() or [""])[0][:200]
        raise CheckpointError(f"{path}: cannot restore the training state ({type(e).__name__}: {msg}); "
                              "the file does not match this model and optimizer") from None
    return ck["step"]


def write_run_files(cfg: Config, run_dir: str, resume_path: str, shape: str):
    """Rank 0: config.json with the settings in force (a resume may change some, e.g. num_steps;
    log.txt records which) and log.txt, opened for appending: on a new run this file's code, then
    the system and `shape`. Returns the open log file."""
    os.makedirs(run_dir, exist_ok=True)
    stale = remove_stale_tmp(run_dir)
    cfg_path, changed = os.path.join(run_dir, "config.json"), []
    if os.path.exists(cfg_path):
        with contextlib.suppress(OSError, ValueError), open(cfg_path) as fh:
            old = json.load(fh)
            changed = [f"{k}: {old.get(k)!r} -> {v!r}" for k, v in dataclasses.asdict(cfg).items() if old.get(k) != v]
    atomic_save(json.dumps(dataclasses.asdict(cfg), indent=2).encode(), cfg_path)
    logf = open(os.path.join(run_dir, "log.txt"), "a")
    if changed:
        logf.write("config changed on resume: " + "; ".join(changed) + "\n")
    if not resume_path:
        with open(os.path.abspath(__file__)) as src:
            logf.write(src.read() + "\n" + "=" * 100 + "\n")
    logf.write(system_info() + "\n" + f"{shape} removed_tmp:{len(stale)}\n")
    logf.flush()
    return logf


class Run:
    """A training run as the loop uses it, the same on every rank: processes, run directory and log,
    model and its forward (compiled on CUDA), optimizers, data. Its methods are the loop's
    bookkeeping: log, evaluate, save_checkpoint, stop, finish."""

    def __init__(self, cfg: Config):
        """Open the run (cfg was validated when it was made): every check (run directory, checkpoint,
        data) on every rank before anything is written or compiled, errors agreed across ranks; then the
        model and optimizers (resumed from the checkpoint, if any) and the run directory's config.json
        and log.txt."""
        self.cfg, (self.rank, self.world, self.device) = cfg, setup_distributed(cfg)
        rank, world, device = self.rank, self.world, self.device
        if world > 1 and not cfg.resume:  # the time-stamped default name must be the same on every rank
            name = [cfg.run_name or default_run_name(cfg)]
            dist.broadcast_object_list(name, src=0)
            cfg.run_name = name[0]
        with agreed_errors(device):
            self.accum, self.rows = grad_accum_steps(cfg, world), cfg.micro_batch_tokens // cfg.seq_len
            self.run_dir, self.resume_path, ck = resolve_run(cfg)
            cfg.out_dir = self.run_dir
            check_data_meta(cfg)
            if cfg.loader == "sequential":
                self.loader = SequentialLoader(cfg.train_bin, cfg.batch_tokens, cfg.seq_len, cfg.vocab_size, run_steps(cfg))
            else:
                self.loader = TrainLoader(cfg.train_bin, cfg.seq_len, cfg.vocab_size, cfg.seed)
            self.val = load_val_tokens(cfg.val_bin, cfg.val_tokens, val_len(cfg), cfg.vocab_size)
            self.val_slice = load_val_slice(cfg) if cfg.val_slice_windows else None
            torch.manual_seed(cfg.seed)
            self.model = make_model(cfg).to(device)
            if cfg.init_weights and ck is None:  # a resume restores its own weights
                load_init_weights(self.model, cfg.init_weights)
            self.mat_opt, self.adam = build_optimizers(self.model, cfg)
            self.step = restore(ck, self.resume_path, self.model, self.mat_opt, self.adam, self.loader) if ck is not None else 0
            del ck
        self.last_ckpt = self.resume_path or "(none)"
        self.last_saved_step = self.step if self.resume_path else -1
        self.logf = self.wandb = None
        with agreed_errors(device, os_error=f"{self.run_dir}: cannot write the run directory"):
            if rank == 0:
                self.logf = write_run_files(cfg, self.run_dir, self.resume_path, f"world_size:{world} grad_accum:{self.accum} "
                                            f"rows_per_micro:{self.rows} resume:{self.resume_path or '-'}")
        self.autocast = torch.autocast(device.type, dtype=DTYPES[cfg.dtype],
                                       enabled=cfg.dtype == "bf16")
        self.fwd = torch.compile(self.model) if (cfg.compile and device.type == "cuda") else self.model
        if rank == 0:
            print(f"run dir {self.run_dir}: {sum(p.numel() for p in self.model.parameters()) / 1e6:.2f}M params, "
                  f"world {world}, accum {self.accum}, device {device}, dtype {cfg.dtype}"
                  + (f", resumed at step {self.step}" if self.resume_path else ""))
        if rank == 0 and cfg.wandb:
            import wandb  # optional dependency, imported only when asked for
            self.wandb = wandb.init(project=cfg.wandb_project, name=cfg.run_name, config=dataclasses.asdict(cfg), resume="allow")

    def clock(self) -> float:
        """perf_counter once the device has finished its queued work."""
        if self.device.type == "cuda":
            torch.cuda.synchronize()
        return time.perf_counter()

    def log(self, line: str, record: dict | None = None) -> None:
        """Rank 0: print the line, append it to log.txt, and record (if any) to metrics.jsonl."""
        if self.rank == 0:
            print(line, flush=True)
            self.logf.write(line + "\n")
            self.logf.flush()
            if record is not None:
                with open(os.path.join(self.run_dir, "metrics.jsonl"), "a") as fh:
                    fh.write(json.dumps(record) + "\n")

    def evaluate(self, step: int, train_loss: float | None) -> dict:
        """Val loss and accuracy (and on the reference's slice), activation maxima and, on rank 0,
        every matrix's norm; logged and returned. train_loss is None before the first step."""
        cfg = self.cfg
        m = evaluate(self.model, self.val, cfg, self.device, self.autocast, max(1, cfg.micro_batch_tokens // val_len(cfg)),
                     seq_len=val_len(cfg), step=step)
        if self.val_slice is not None:
            sl = evaluate(self.model, self.val_slice, cfg, self.device, self.autocast, self.rows,
                          torch.arange(cfg.val_slice_windows))
            m["slice_val_loss"], m["slice_val_acc"] = sl["val_loss"], sl["val_acc"]
        m["step"], m["train_loss"] = step, train_loss
        if cfg.debug:
            check_ranks_agree(self.model, step, self.device)
        if self.rank == 0:  # float64 norms of every matrix: rank 0 only
            m["norms"] = n = matrix_norms(self.model)
            sl = f"slice_val_loss:{m['slice_val_loss']:.4f} " if "slice_val_loss" in m else ""
            self.log(f"step:{step}/{cfg.num_steps} val_loss:{m['val_loss']:.4f} val_acc:{m['val_acc']:.4f} {sl}"
                     f"max_act_entry:{m['max_act_entry']:.4g} max_logit:{m['max_logit']:.4g} max_act_rms:{m['max_act_rms']:.4g} "
                     f"max_hidden_norm:{max(v for k, v in n.items() if k.startswith('blocks')):.4f} head_norm:{n['head']:.4f}",
                     record=m)
        if self.wandb:
            self.wandb.log({k: v for k, v in m.items() if k != "norms"}, step=step)
        return m

    def save_checkpoint(self, step: int, kind: str = "step") -> str:
        """Collective. 'step': ckpt_step<N>.pt, resumable (weights, config, optimizer, loader and RNG
        state; older ones beyond keep_last are deleted); 'final': ckpt_final.pt (weights and config)."""
        cfg, cuda = self.cfg, self.device.type == "cuda"
        obj = {"model": {k: v.detach().cpu() for k, v in self.model.state_dict().items()},
               "config": dataclasses.asdict(cfg), "step": step, "format_version": 1}
        if kind == "step":
            obj["optimizers"] = {"matrix": matrix_optimizer_state(self.mat_opt),
                                 "adam": self.adam.state_dict() if self.adam is not None else {}}
            obj["loader"] = self.loader.state_dict()
            obj["rng"] = {"torch": torch.get_rng_state(), "cuda": torch.cuda.get_rng_state(self.device) if cuda else None}
        path = os.path.join(self.run_dir, f"{CKPT_STEP_PREFIX}{step:06d}.pt" if kind == "step" else FINAL_CKPT)
        with agreed_errors(self.device, os_error=f"{self.run_dir}: cannot prune old checkpoints"):
            if self.rank == 0:
                if kind == "final" and os.path.exists(path):
                    raise CheckpointError(f"{path} exists; not overwriting it")
                obj["checksum"] = content_checksum(obj)
                atomic_save(obj, path)
                for old in list_checkpoints(self.run_dir)[: -cfg.keep_last] if kind == "step" else []:
                    os.remove(old)
        self.last_ckpt, self.last_saved_step = path, step
        return path

    def stop(self, step: int) -> dict:
        """After SIGTERM / SIGINT: a resumable checkpoint (unless this step has one), then exit."""
        path = self.save_checkpoint(step) if self.last_saved_step != step else self.last_ckpt
        self.log(f"stopped by signal at step {step}; continue with --resume latest --out_dir {self.run_dir}")
        if self.logf:
            self.logf.close()
        return {"stopped": True, "step": step, "checkpoint": path, "run_dir": self.run_dir}

    def finish(self, step: int, metrics: dict, train_s: float, t0: float) -> dict:
        """ckpt_final.pt and (rank 0) its certificate, saved next to it; returns the final metrics."""
        final = self.save_checkpoint(step, "final")
        metrics.update(checkpoint=final, run_dir=self.run_dir, train_time_s=train_s)
        self.log(f"done in {time.perf_counter() - t0:.1f}s ({train_s:.1f}s training); checkpoint {final}")
        if self.rank == 0:
            import lipschitz_bound  # the certificate is a standalone script that imports this file
            metrics["certificate"] = lipschitz_bound.save_certificate(self.run_dir)
            self.log(lipschitz_bound.summary_line(metrics["certificate"]))
        if self.logf:
            self.logf.close()
        if self.wandb:
            self.wandb.finish()
        return metrics


# -----------------------------------------------------------------------------
# Configuration: parsing (command line > --config TOML > defaults) and the rules between fields


class ConfigError(ValueError):
    pass


BOOL_WORDS = {"true": True, "1": True, "false": False, "0": False}  # a bool on the command line


def _coerce(name: str, typ: str, value, source: str):
    """value as the field's type: TOML values as they are (ints accepted for floats), command-line text parsed."""
    typ, v = {"int": int, "float": float, "str": str, "bool": bool}[typ], value
    if isinstance(v, str) and typ is not str:
        with contextlib.suppress(ValueError):
            v = BOOL_WORDS.get(v.lower(), v) if typ is bool else typ(v)
    if typ is float and type(v) is int:
        v = float(v)
    if type(v) is typ:  # type(True) is bool, not int: a bool is no number here
        return v
    raise ConfigError(f"{source}: '{name}' must be of type {typ.__name__}, got {value!r}")


def coerced(d: dict, source: str) -> dict:
    """The settings of d (a TOML table, a saved config, command-line strings) as their fields' types."""
    known = {f.name: f.type for f in fields(Config)}
    for k in d:
        if k not in known:
            close = [n for n in known if n.startswith(k[:4])]
            raise ConfigError(f"{source}: unknown key '{k}'" + (f" (did you mean {', '.join(close)}?)" if close else "") + "; see python train_gpt.py --help")
    return {k: _coerce(k, known[k], v, source) for k, v in d.items()}


def config_from_dict(d: dict, source: str, base: Config | None = None) -> Config:
    """base (default: the defaults) with the settings of d, validated once."""
    return Config(**(dataclasses.asdict(base) if base is not None else {}) | coerced(d, source))


def parse_config(argv: list[str] | None = None) -> Config:
    p = argparse.ArgumentParser(
        description="Train a GPT with enforced Lipschitz constants (Newhouse et al. 2025). "
        "Settings: command line > --config file > these defaults (the paper's 145M hyperparameters; "
        "configs/nanogpt_145m.toml adds the reference scripts' pipeline).",
    )
    p.add_argument("--config", default="", help="TOML file of settings (flat key = value)")
    for f in fields(Config):
        p.add_argument(f"--{f.name}", default=None, metavar="|".join(choices_of(f)) or f.type.upper(),
                       help=f"{f.metadata['help']} (default: {f.default!r})")
    args = p.parse_args(argv)
    table = {}
    if args.config:
        if not os.path.isfile(args.config):
            raise ConfigError(f"--config {args.config}: no such file")
        try:
            with open(args.config, "rb") as fh:
                table = tomllib.load(fh)
        except (tomllib.TOMLDecodeError, UnicodeDecodeError) as e:
            raise ConfigError(f"--config {args.config}: not valid TOML ({e})") from None
        table = coerced(table, args.config)
    overrides = coerced({k: v for k, v in vars(args).items() if k != "config" and v is not None}, "command line")
    return Config(**(table | overrides))  # validated once, on the settings in force


def validate_config(cfg: Config) -> None:
    """Every error a config can have, found before any data is read or any kernel compiled: each field's
    choices and range (from its setting), then the rules between fields."""
    for f in fields(cfg):
        v, allowed, check = getattr(cfg, f.name), choices_of(f), f.metadata["check"]
        if allowed and v not in allowed:
            raise ConfigError(f"{f.name}={v!r} is not one of {', '.join(allowed)}")
        if check and not CHECKS[check][1](v):
            raise ConfigError(f"{f.name} must be {CHECKS[check][0]}, got {v}")
    if cfg.d_model % cfg.n_head or (cfg.d_model // cfg.n_head) % 2:
        raise ConfigError(f"d_model={cfg.d_model} must be a multiple of n_head={cfg.n_head} with an even head size (RoPE)")
    if cfg.micro_batch_tokens % cfg.seq_len:
        raise ConfigError(f"micro_batch_tokens={cfg.micro_batch_tokens} must be a multiple of seq_len={cfg.seq_len}")
    if cfg.rope == "half_truncated" and (cfg.d_model // cfg.n_head) % 4:
        raise ConfigError(f"rope=half_truncated needs a head size divisible by 4, got {cfg.d_model // cfg.n_head}")
    if not -1 <= cfg.doc_token < cfg.vocab_size:
        raise ConfigError(f"doc_token={cfg.doc_token} must be -1 (off) or a token id below vocab_size={cfg.vocab_size}")
    if cfg.layer_pattern and (len(cfg.layer_pattern) != cfg.n_layer or set(cfg.layer_pattern) - set("LS")):
        raise ConfigError(f"layer_pattern={cfg.layer_pattern!r} must be {cfg.n_layer} letters L or S, one per layer")
    if "S" in cfg.layer_pattern and cfg.window_schedule == "none":
        raise ConfigError(f"layer_pattern={cfg.layer_pattern!r} has short layers but window_schedule=none has no window to halve; "
                          "set window_schedule or clear layer_pattern")
    if masked_attention(cfg):
        for k, n in (("seq_len", cfg.seq_len), ("val_seq_len", val_len(cfg))):
            if n % ATTN_BLOCK:
                raise ConfigError(f"{k}={n} must be a multiple of {ATTN_BLOCK} (the attention block) "
                                  "with doc_token or window_schedule set")
        if cfg.qk_clip_tau > 0:
            raise ConfigError("qk_clip_tau tracks causal logits only; it cannot be combined with doc_token or window_schedule")
    if cfg.loader == "sequential" and cfg.seq_len != cfg.micro_batch_tokens:
        raise ConfigError(f"loader=sequential trains on one sequence of micro_batch_tokens per rank and micro-step: "
                          f"set seq_len={cfg.micro_batch_tokens} (now {cfg.seq_len})")
    if cfg.ns_coeffs == "reference" and cfg.ns_steps != len(NANOGPT_NS):
        raise ConfigError(f"ns_coeffs=reference is {len(NANOGPT_NS)} fixed steps; set ns_steps={len(NANOGPT_NS)} (now {cfg.ns_steps})")
    if cfg.embed_cap == "lookup" and (cfg.embed_update != "adam" or cfg.arch in UNCONSTRAINED_ARCHS):
        raise ConfigError("embed_cap=lookup renormalizes the rows that Adam steps (embed_update=adam) in a Lipschitz arch; "
                          "use embed_cap=project")
    if cfg.stop_after > cfg.num_steps:
        raise ConfigError(f"stop_after={cfg.stop_after} is past num_steps={cfg.num_steps}; stop_after ends a run early "
                          "inside its schedule (0: run all num_steps)")
    if cfg.arch in UNCONSTRAINED_ARCHS and cfg.constraint != "none":
        raise ConfigError(f"arch={cfg.arch} has no weight constraints (constraint={cfg.constraint!r}); add --constraint none")
    if cfg.arch == "speedrun":
        if cfg.n_layer % 2 or cfg.n_layer < SPEEDRUN_NO_ATTN_LAYER + 1:
            raise ConfigError(f"arch=speedrun needs an even n_layer >= {SPEEDRUN_NO_ATTN_LAYER + 1} (U-net halves, "
                              f"{SPEEDRUN_VALUE_EMBEDS} value-embedded layers at each end, no attention in layer "
                              f"{SPEEDRUN_NO_ATTN_LAYER}); got {cfg.n_layer}")
        if cfg.final_scale != 1.0 or cfg.head_spectral or cfg.qk_clip_tau > 0 or cfg.hidden_init != "orthogonal":
            raise ConfigError("arch=speedrun has its own init, an Adam head, no final_scale and no QK-Clip: set head_spectral = false "
                              "and leave final_scale (1), qk_clip_tau (0) and hidden_init (orthogonal) at their defaults")
    if cfg.dropout > 0 and masked_attention(cfg):
        raise ConfigError("dropout is not supported with doc_token or window_schedule (FlexAttention has no dropout)")
    if cfg.dropout > 0 and cfg.arch != "baseline":
        raise ConfigError(f"dropout={cfg.dropout} is for arch=baseline only (the Lipschitz map the certificate bounds has none)")
    if cfg.lr_alloc == "modula" and cfg.arch in UNCONSTRAINED_ARCHS:
        raise ConfigError("lr_alloc=modula derives step sizes from the Lipschitz architecture's scalars; "
                          f"arch={cfg.arch} (RMSNorm) has no such sensitivities: use lr_alloc=uniform")
    if cfg.embed_update == "rownorm" and (cfg.optimizer != "muon" or cfg.arch in UNCONSTRAINED_ARCHS):
        raise ConfigError("embed_update=rownorm is the Modula update of a capped embedding and uses Muon's momentum: "
                          "it needs optimizer=muon and a Lipschitz arch; use embed_update=adam")
    if cfg.soft_cap_coupling == "reference" and cfg.constraint != "soft_cap":
        raise ConfigError(f"soft_cap_coupling={cfg.soft_cap_coupling} is only used by constraint soft_cap, not {cfg.constraint}")
    if cfg.optimizer == "adamw" and cfg.constraint == "soft_cap":
        raise ConfigError("soft_cap needs a bound on each update's spectral norm, which Muon gives and AdamW does not; "
                          "use --optimizer muon, or another constraint (spectral_hammer, weight_decay, hard_cap, ...) with adamw")
    if cfg.constraint in ("weight_decay", "spectral_wd") and cfg.wd == 0:
        raise ConfigError(f"constraint {cfg.constraint} needs --wd > 0")
    if cfg.wd > 0 and cfg.constraint not in ("weight_decay", "spectral_wd"):
        raise ConfigError(f"--wd {cfg.wd} is only used by constraint weight_decay or spectral_wd, not {cfg.constraint}")


def grad_accum_steps(cfg: Config, world_size: int) -> int:
    per_step = world_size * cfg.micro_batch_tokens
    if cfg.batch_tokens % per_step:
        raise ConfigError(
            f"batch_tokens={cfg.batch_tokens} is not divisible by world_size x micro_batch_tokens = "
            f"{world_size} x {cfg.micro_batch_tokens} = {per_step}; pick batch_tokens a multiple of {per_step} "
            f"or a micro_batch_tokens that divides {cfg.batch_tokens // world_size if cfg.batch_tokens % world_size == 0 else cfg.batch_tokens}")
    return cfg.batch_tokens // per_step


# -----------------------------------------------------------------------------
# Command line

USER_ERRORS = (ConfigError, DataError, CheckpointError, TrainingDiverged, RanksDisagree, OtherRankFailed, OSError)


def main(argv=None) -> int:
    """Command-line entry: every expected failure is one line 'error: ...' on stderr and exit code 2."""
    try:
        train(parse_config(argv))  # returns the final metrics, or where a signal stopped it: both exit 0
    except USER_ERRORS as e:
        print(f"error: {' '.join(str(e).split())}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("error: interrupted twice; the last checkpoint written is intact (resume with --resume latest)", file=sys.stderr)
        return 130
    finally:
        if dist.is_available() and dist.is_initialized():
            dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main())

#!/usr/bin/env bash
# The whole GPU check in one call (~5-7 minutes on one H100), needing no network and no data
# beyond data/shakespeare_char (synthetic shards stand in when it is missing):
#   1. nvidia-smi, torch/CUDA versions, and a torch.compile + bf16 correctness check;
#   2. scripts/bench_step.py on configs/nanogpt_145m.toml (bf16, torch.compile, one 49,152-token
#      micro-step + the optimizer step): step time, tokens/s, MFU against the measured bf16
#      matmul rate, peak memory, against the plain LayerNorm/AdamW recipe in bf16;
#   3. the same benchmark for configs/shakespeare_char.toml (plain recipe in fp32 and bf16);
#   4. 50 training steps of a tiny config (the quickstart model) on the CPU in fp32 and on the GPU
#      in bf16 with torch.compile, same seed and data: the per-step train losses must agree
#      within LOSS_TOL (bf16 tolerance);
#   5. the 145M configs' attention on CUDA (FlexAttention BlockMasks with documents, window and long/
#      short layers): loss and gradients against the dense masks, eager and compiled, no recompiles
#      as the window grows (tests/test_nanogpt_pipeline.py -k cuda).
# Outputs (logs, JSON figures, summary.txt) go to $OUT if set, else logs/gpu_check/.
# On a machine without CUDA it says so and runs the CPU benchmark of step 3 only.
#   bash scripts/gpu_check.sh            # PYTHON=python3, LOSS_TOL=0.05 by default
set -u
cd "$(dirname "$0")/.."
OUT_DIR="${OUT:-logs/gpu_check}"
PY="${PYTHON:-python3}"
LOSS_TOL="${LOSS_TOL:-0.05}"
mkdir -p "$OUT_DIR"
SUMMARY="$OUT_DIR/summary.txt"
: > "$SUMMARY"
failed=""

note() { echo "$*" | tee -a "$SUMMARY"; }

# part NAME SECONDS CMD...: run CMD under a time limit, log to $OUT_DIR/NAME.log, record its status
part() {
    local name=$1 limit=$2
    shift 2
    note "=== $name (limit ${limit}s, started $(date +%T)): $*"
    local t0=$SECONDS
    timeout --kill-after=15 "$limit" "$@" 2>&1 | tee "$OUT_DIR/$name.log"
    local rc=${PIPESTATUS[0]}
    note "--- $name: exit $rc after $((SECONDS - t0))s$([ "$rc" = 124 ] && echo ' (TIMED OUT)')"
    [ "$rc" = 0 ] || failed="$failed $name"
    return 0
}

note "gpu_check $(date -u +%FT%TZ), git $(git rev-parse --short HEAD 2>/dev/null || echo '?'), outputs in $OUT_DIR"

# 1. environment, compile and bf16 ------------------------------------------------------------
command -v nvidia-smi > /dev/null && nvidia-smi 2>&1 | tee "$OUT_DIR/nvidia-smi.txt"
part env_compile_bf16 240 "$PY" - <<'EOF'
import sys, time
import torch
import torch.nn.functional as F
print(f"python {sys.version.split()[0]}, torch {torch.__version__}, cuda {torch.version.cuda}, "
      f"cudnn {torch.backends.cudnn.version()}, cuda available {torch.cuda.is_available()}")
if not torch.cuda.is_available():
    print("NO CUDA on this machine: the GPU parts are skipped; CPU figures only")
    sys.exit(3)
dev = torch.device("cuda")
p = torch.cuda.get_device_properties(dev)
print(f"{p.name}, {p.total_memory / 2**30:.1f} GiB, compute capability {p.major}.{p.minor}, "
      f"bf16 supported {torch.cuda.is_bf16_supported()}")
g = torch.Generator().manual_seed(0)
x = torch.randn(4096, 768, generator=g).to(dev)
w = (torch.randn(3072, 768, generator=g) / 768 ** 0.5).to(dev)
def f(x, w):
    return F.gelu(x @ w.T).square().mean(-1)
ref = f(x.double(), w.double())
t0 = time.time()
with torch.autocast("cuda", dtype=torch.bfloat16):
    got = torch.compile(f)(x, w).double()
torch.cuda.synchronize()
rel = float(((got - ref).abs() / ref.abs().clamp_min(1e-6)).max())
print(f"torch.compile + bf16 autocast vs float64 eager: max relative error {rel:.2e} "
      f"(compiled in {time.time() - t0:.1f}s; bf16 tolerance 2e-2)")
sys.exit(0 if rel < 2e-2 else 1)
EOF
if grep -q "NO CUDA" "$OUT_DIR/env_compile_bf16.log"; then
    note "no CUDA here: running the CPU benchmark of configs/shakespeare_char.toml only"
    failed=""
    part bench_shakespeare_cpu 600 "$PY" scripts/bench_step.py --config configs/shakespeare_char.toml --dtype bf16 \
        --json "$OUT_DIR/bench_shakespeare_cpu.json"
    note "FAILED parts:${failed:- none}"
    exit 0
fi

# 2. 145M step: one micro-step of micro_batch_tokens (49,152) + the optimizer step ------------------
part bench_145m 300 "$PY" scripts/bench_step.py --config configs/nanogpt_145m.toml --dtype bf16 --compile \
    --plain_dtypes bf16 --warmup 3 --steps 10 --json "$OUT_DIR/bench_145m.json"

# 3. Shakespeare step on the GPU -----------------------------------------------------------------
part bench_shakespeare 180 "$PY" scripts/bench_step.py --config configs/shakespeare_char.toml --dtype bf16 --compile \
    --warmup 3 --steps 20 --json "$OUT_DIR/bench_shakespeare.json"

# 4. 50-step loss match: CPU fp32 vs GPU bf16 + compile ---------------------------------------------
LM="$OUT_DIR/loss_match"
rm -rf "$LM"
mkdir -p "$LM"
DATA_ARGS=()
if [ ! -f data/shakespeare_char/train_000000.bin ] || [ ! -f data/shakespeare_char/val_000000.bin ]; then
    note "data/shakespeare_char is missing: the loss match uses synthetic learnable shards in $LM/data"
    "$PY" - "$LM/data" <<'EOF'
import os, sys
import numpy as np
sys.path.insert(0, os.getcwd())
from data.shards import write_shard
root = sys.argv[1]
os.makedirs(root, exist_ok=True)
rng = np.random.default_rng(0)
def seq(n):  # a repeating ramp over 65 symbols with 20% noise: learnable in a few steps
    base = np.arange(n) % 65
    return np.where(rng.random(n) < 0.2, rng.integers(0, 65, n), base)
write_shard(os.path.join(root, "train_000000.bin"), seq(200_000))
write_shard(os.path.join(root, "val_000000.bin"), seq(20_000))
EOF
    DATA_ARGS=(--train_bin "$LM/data/train_*.bin" --val_bin "$LM/data/val_*.bin")
fi
TINY=(--config configs/quickstart.toml --num_steps 50 --log_every 1 --eval_every 0 --val_tokens 4096 --seed 0 "${DATA_ARGS[@]}")
part loss_match_cpu_fp32 240 "$PY" train_gpt.py "${TINY[@]}" --device cpu --dtype fp32 --compile false --out_dir "$LM/cpu_fp32"
part loss_match_gpu_bf16 240 "$PY" train_gpt.py "${TINY[@]}" --device cuda --dtype bf16 --compile true --out_dir "$LM/gpu_bf16"
part loss_match_compare 60 "$PY" - "$LM/cpu_fp32/metrics.jsonl" "$LM/gpu_bf16/metrics.jsonl" "$LOSS_TOL" <<'EOF'
import json, sys
def losses(path):
    out = {}
    with open(path) as fh:
        for line in fh:
            r = json.loads(line)
            if "train_loss" in r and "lr_frac" in r:  # the per-step training lines, not the eval records
                out[r["step"]] = r["train_loss"]
    return out
a, b, tol = losses(sys.argv[1]), losses(sys.argv[2]), float(sys.argv[3])
steps = sorted(set(a) & set(b))
if len(steps) < 50:
    sys.exit(f"only {len(steps)} common logged steps (cpu {len(a)}, gpu {len(b)}); expected 50")
diffs = {s: abs(a[s] - b[s]) for s in steps}
print(f"{'step':>5}{'cpu fp32':>11}{'gpu bf16':>11}{'|diff|':>9}")
for s in steps:
    if s in (1, 2, 5) or s % 10 == 0:
        print(f"{s:>5}{a[s]:>11.4f}{b[s]:>11.4f}{diffs[s]:>9.4f}")
worst = max(diffs, key=diffs.get)
mean = sum(diffs.values()) / len(diffs)
ok = diffs[worst] <= tol
print(f"loss match over {len(steps)} steps: max |diff| {diffs[worst]:.4f} at step {worst}, mean {mean:.4f}, "
      f"loss {a[steps[0]]:.3f} -> {a[steps[-1]]:.3f} (cpu); tolerance {tol}: {'PASS' if ok else 'FAIL'}")
sys.exit(0 if ok else 1)
EOF

# 5. FlexAttention masks on CUDA against the dense masks ------------------------------------------------
part flex_attention_cuda 300 "$PY" -m pytest -q -x tests/test_nanogpt_pipeline.py -k cuda

# summary -------------------------------------------------------------------------------------------
note ""
note "=== figures"
for f in bench_145m bench_shakespeare; do
    [ -f "$OUT_DIR/$f.log" ] && { note "[$f]"; grep -E "^(matmul ceiling|variant|ours|plain|  [a-z_]+ \(|configured)" "$OUT_DIR/$f.log" | tee -a "$SUMMARY" > /dev/null; }
done
[ -f "$OUT_DIR/loss_match_compare.log" ] && grep "loss match" "$OUT_DIR/loss_match_compare.log" | tee -a "$SUMMARY" > /dev/null
note "FAILED parts:${failed:- none}"
cat "$SUMMARY" | sed -n '/=== figures/,$p'

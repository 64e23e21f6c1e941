#!/usr/bin/env bash
# The tiny-Shakespeare Lipschitz-vs-loss frontier (the paper's small-scale experiment), in one command:
# Muon x soft_cap over w_max x softmax_scale x final_scale, Muon x {spectral_normalize, hard_cap} over
# w_max, AdamW + spectral_hammer and AdamW + weight_decay, the unconstrained Lipschitz architecture,
# the baseline architecture, a learning-rate check and a second seed for the points that matter; then
# the results table (with each run's certificate, which the trainer saves) and the frontier plots.
#
#   scripts/shakespeare_frontier.sh --full --jobs 12      # the paper's protocol (GPU: ~1 min a run)
#   scripts/shakespeare_frontier.sh --short               # reduced protocol for 2 CPU cores (not the paper's numbers)
#
# Options
#   --full | --short   protocol: full = 2000 steps of 64 x 256 tokens (paper); short = 400 steps of 16 x 256
#                      and a smaller grid
#   --jobs N           runs at once (default 1; one GPU holds a dozen of these small runs at once)
#   --out DIR          sweep directory (default logs/shakespeare_<protocol>)
#   --only REGEX       only the runs whose name matches this extended regex (e.g. 'hard_cap|baseline'); the
#                      table and plots still cover every finished run in DIR
#   --dry_run          print the runs, train nothing
#   -- ARGS            passed to every train_gpt.py run (e.g. --device cpu --dtype fp32)
# Re-running fills gaps: runs with ckpt_final.pt are skipped, interrupted ones with a checkpoint resume. Output: DIR/<run>/, DIR/results.md,
# DIR/frontier.png (tight certificate) and DIR/frontier_paper.png (published algorithm).
set -euo pipefail
REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
PY="${PYTHON:-python}"
die() { echo "shakespeare_frontier.sh: error: $*" >&2; exit 2; }

PROTO=short JOBS=1 OUT="" DRY=0 ONLY="" EXTRA=()
while [ $# -gt 0 ]; do
  case "$1" in
    --full) PROTO=full; shift ;;
    --short) PROTO=short; shift ;;
    --jobs) JOBS="${2:?--jobs needs a number}"; shift 2 ;;
    --out) OUT="${2:?--out needs a directory}"; shift 2 ;;
    --only) ONLY="${2:?--only needs a regex}"; shift 2 ;;
    --dry_run) DRY=1; shift ;;
    -h|--help) sed -n '2,/^set -euo/p' "${BASH_SOURCE[0]}" | sed '$d' | sed 's/^# \{0,1\}//'; exit 0 ;;
    --) shift; EXTRA=("$@"); break ;;
    *) die "unknown option '$1'; see --help" ;;
  esac
done
[[ "$JOBS" =~ ^[1-9][0-9]*$ ]] || die "--jobs must be a positive integer, got '$JOBS'"
OUT="${OUT:-logs/shakespeare_$PROTO}"
CONFIG="$REPO/configs/shakespeare_char.toml"
BASELINE="$REPO/configs/paper/shakespeare_baseline.toml"

# The frontier is traced by w_max (all matrices, head included) and by the two scales that trade
# loss for certified bound: softmax_scale s (attention sharpness) and final_scale (logit scale).
if [ "$PROTO" = full ]; then
  PROTO_ARGS=(--num_steps 2000)
  W_GRID="1.0 2.0 3.0"; SS_GRID="4 16"; FS_GRID="2 8"
  BASE_ARGS=(--num_steps 2000 --n_layer 3 --n_head 4 --d_model 256)   # baseline at the Lipschitz model's shape
  NANOGPT_BASE=1                                                       # and nanoGPT's own (d 384, 6 layers, 5000 steps)
else
  PROTO_ARGS=(--num_steps 400 --batch_tokens 4096 --micro_batch_tokens 4096 --eval_every 200 --momentum_warmup_steps 50)
  W_GRID="1.0 2.0 3.0"; SS_GRID="16"; FS_GRID="2 8"
  BASE_ARGS=(--num_steps 400 --batch_tokens 4096 --micro_batch_tokens 4096 --eval_every 200 --n_layer 3 --n_head 4 --d_model 256)
  NANOGPT_BASE=0
fi
REF="--softmax_scale 16 --final_scale 2"   # the reference scales for the other methods, seeds and lr checks
ADAM_LR=0.003

# one line per run: NAME CONFIG ARGS...
RUNS=()
[ "$NANOGPT_BASE" = 1 ] && RUNS+=("baseline_nanogpt_s0 $BASELINE --seed 0")   # longest first
RUNS+=("baseline_s0 $BASELINE ${BASE_ARGS[*]} --seed 0")
for w in $W_GRID; do for ss in $SS_GRID; do for fs in $FS_GRID; do
  RUNS+=("muon_soft_cap_w${w}_ss${ss}_fs${fs}_s0 $CONFIG --constraint soft_cap --w_max $w --head_w_max $w --softmax_scale $ss --final_scale $fs --seed 0")
done; done; done
for c in spectral_normalize hard_cap; do for w in $W_GRID; do
  RUNS+=("muon_${c}_w${w}_ss16_fs2_s0 $CONFIG --constraint $c --w_max $w --head_w_max $w $REF --seed 0")
done; done
for w in 1.0 2.0; do RUNS+=("muon_soft_cap_w${w}_ss16_fs2_s1 $CONFIG --constraint soft_cap --w_max $w --head_w_max $w $REF --seed 1"); done
RUNS+=("muon_soft_cap_w2.0_ss16_fs2_lr0.02_s0 $CONFIG --constraint soft_cap --w_max 2.0 --head_w_max 2.0 $REF --lr_hidden 0.02 --lr_head 0.02 --seed 0")
RUNS+=("muon_none_ss16_fs2_s0 $CONFIG --constraint none $REF --seed 0")
for w in 1.0 3.0; do
  RUNS+=("adamw_spectral_hammer_w${w}_ss16_fs2_s0 $CONFIG --optimizer adamw --constraint spectral_hammer --w_max $w --head_w_max $w $REF --lr_hidden $ADAM_LR --lr_head $ADAM_LR --adam_beta1 0.9 --seed 0")
done
for wd in 0.1 1.0; do
  RUNS+=("adamw_weight_decay_wd${wd}_ss16_fs2_s0 $CONFIG --optimizer adamw --constraint weight_decay --wd $wd $REF --lr_hidden $ADAM_LR --lr_head $ADAM_LR --adam_beta1 0.9 --seed 0")
done

if [ -n "$ONLY" ]; then
  KEEP=()
  for r in "${RUNS[@]}"; do
    if [[ "${r%% *}" =~ $ONLY ]]; then KEEP+=("$r"); fi
  done
  [ "${#KEEP[@]}" -gt 0 ] || die "--only '$ONLY' matches none of the ${#RUNS[@]} runs (see --dry_run)"
  RUNS=("${KEEP[@]}")
fi

run_one() {  # NAME CONFIG ARGS...
  local name=$1 config=$2; shift 2
  local dir="$OUT/$name"
  if [ -f "$dir/ckpt_final.pt" ]; then echo "$name: finished, skipped"; return 0; fi
  local proto=("${PROTO_ARGS[@]}")
  if compgen -G "$dir/ckpt_step*.pt" >/dev/null; then
    proto+=(--resume latest)   # an interrupted run with a checkpoint continues (as in sweep_sigma_max.sh)
  elif [ -e "$dir" ]; then
    echo "$name: $dir holds an unfinished run without a checkpoint; delete it (rm -r '$dir') to retry" >&2; return 1
  fi
  [[ "$name" == baseline* ]] && proto=("${proto[@]:${#PROTO_ARGS[@]}}")
  if "$PY" "$REPO/train_gpt.py" --config "$config" "${proto[@]}" "$@" "${EXTRA[@]+"${EXTRA[@]}"}" --out_dir "$dir" \
      > "$OUT/$name.out" 2>&1; then
    echo "$name: $(grep -E 'val_loss' "$dir/log.txt" | tail -1)"
  else
    echo "$name: FAILED (see $OUT/$name.out)" >&2; return 1
  fi
}

echo "shakespeare frontier ($PROTO protocol): ${#RUNS[@]} runs into $OUT, $JOBS at a time"
if [ "$DRY" = 1 ]; then printf '%s\n' "${RUNS[@]}"; exit 0; fi
mkdir -p "$OUT"
export -f run_one
export OUT PY REPO
export PROTO_ARGS_STR="${PROTO_ARGS[*]}" EXTRA_STR="${EXTRA[*]+"${EXTRA[*]}"}"
status=0
printf '%s\n' "${RUNS[@]}" | xargs -P "$JOBS" -L 1 bash -c \
  'set -f; PROTO_ARGS=($PROTO_ARGS_STR); EXTRA=($EXTRA_STR); set +f; run_one "$@"' _ || status=$?  # -f: no glob expansion of passed args

DIRS=()
for d in "$OUT"/*/; do [ -f "$d/ckpt_final.pt" ] && DIRS+=("${d%/}"); done
[ "${#DIRS[@]}" -gt 0 ] || die "no run finished in $OUT"
"$PY" "$REPO/scripts/results_table.py" --certify --out "$OUT/results.md" "${DIRS[@]}"
"$PY" "$REPO/scripts/plot_frontier.py" --mode tight --out "$OUT/frontier.png" --title "tiny Shakespeare ($PROTO), tight certificate" "${DIRS[@]}"
"$PY" "$REPO/scripts/plot_frontier.py" --mode paper --out "$OUT/frontier_paper.png" --title "tiny Shakespeare ($PROTO), published algorithm" "${DIRS[@]}"
echo "done: $OUT/results.md, $OUT/frontier.png"
[ "$status" = 0 ] || die "some runs failed (listed above); re-run the same command to retry them"

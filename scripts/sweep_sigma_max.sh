#!/usr/bin/env bash
# Train one config over a grid of sigma_max (w_max) values, constraints and seeds, one run directory
# each, then the results table (with each run's certificate, which the trainer saves) and the frontier plot.
#
#   scripts/sweep_sigma_max.sh --config configs/shakespeare_char.toml --w_max "1 2 4"
#   scripts/sweep_sigma_max.sh --config configs/shakespeare_char.toml --w_max "1 2 4 8" \
#       --constraints "soft_cap spectral_normalize hard_cap" --seeds "0 1 2" --out logs/sweep_shakespeare
#   scripts/sweep_sigma_max.sh --config configs/paper/w8_soft_cap.toml --w_max "2 4 8 16" --nproc 8 \
#       --paper_softmax_scale -- --save_every 250
#
# Options
#   --config FILE          train_gpt.py TOML config (required)
#   --w_max "LIST"         sigma_max values (required)
#   --constraints "LIST"   constraints (default: the config's)
#   --seeds "LIST"         seeds (default: the config's)
#   --nproc N              GPUs (or CPU processes) per run: torchrun when N > 1, python otherwise (default 1)
#   --out DIR              sweep directory (default logs/sweep_<config name>); run dirs are
#                          DIR/<constraint>_w<w_max>_s<seed>
#   --paper_softmax_scale  softmax_scale 24 at w_max 1, else sqrt(128)/w_max^2 (the published 145M scripts)
#   --tie_head             also cap the head at each w_max (head_w_max = w_max, as the Shakespeare configs
#                          and the reference code do; without it the head keeps the config's head_w_max)
#   --dry_run              print the commands, run nothing
#   -- ARGS                passed to every train_gpt.py run (e.g. --num_steps 500 --device cpu)
# Environment: PYTHON (default python), TORCHRUN (default torchrun).
#
# Re-running the same command fills gaps: a run with ckpt_final.pt is skipped, an interrupted run with
# a ckpt_step*.pt is resumed (--resume latest), and a run directory holding neither stops the sweep
# (train_gpt.py never overwrites a run). Each run's certificate is DIR/<run>/certificate.json, the table
# as DIR/results.md, the plot as DIR/frontier.png.
set -euo pipefail

REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
PY="${PYTHON:-python}"
TORCHRUN="${TORCHRUN:-torchrun}"

die() { echo "sweep_sigma_max.sh: error: $*" >&2; exit 2; }
usage() { sed -n '2,/^set -euo/p' "${BASH_SOURCE[0]}" | sed '$d' | sed 's/^# \{0,1\}//'; exit "${1:-0}"; }

CONFIG="" W_LIST="" C_LIST="" S_LIST="" NPROC=1 OUT="" PAPER_SCALE=0 TIE_HEAD=0 DRY=0
EXTRA=()
while [ $# -gt 0 ]; do
  case "$1" in
    --config) CONFIG="${2:?--config needs a file}"; shift 2 ;;
    --w_max|--sigma_max) W_LIST="${2:?--w_max needs a list}"; shift 2 ;;
    --constraints) C_LIST="${2:?--constraints needs a list}"; shift 2 ;;
    --seeds) S_LIST="${2:?--seeds needs a list}"; shift 2 ;;
    --nproc) NPROC="${2:?--nproc needs a number}"; shift 2 ;;
    --out) OUT="${2:?--out needs a directory}"; shift 2 ;;
    --paper_softmax_scale) PAPER_SCALE=1; shift ;;
    --tie_head) TIE_HEAD=1; shift ;;
    --dry_run) DRY=1; shift ;;
    -h|--help) usage 0 ;;
    --) shift; EXTRA=("$@"); break ;;
    *) die "unknown option '$1' (train_gpt.py settings go after --); see --help" ;;
  esac
done

[ -n "$CONFIG" ] || die "--config FILE is required"
[ -f "$CONFIG" ] || die "--config $CONFIG: no such file"
[ -n "$W_LIST" ] || die "--w_max \"LIST\" is required, e.g. --w_max \"1 2 4\""
[[ "$NPROC" =~ ^[1-9][0-9]*$ ]] || die "--nproc must be a positive integer, got '$NPROC'"
for a in "${EXTRA[@]+"${EXTRA[@]}"}"; do
  case "$a" in
    --out_dir|--out_dir=*|--run_name|--run_name=*|--resume|--resume=*|--w_max|--w_max=*|--constraint|--constraint=*|--seed|--seed=*|--config|--config=*)
      die "'$a' after -- is set by the sweep itself; use the sweep's own options" ;;
  esac
done
if [ "$NPROC" -gt 1 ] && [ "$DRY" = 0 ]; then
  command -v "$TORCHRUN" >/dev/null || die "--nproc $NPROC needs torchrun ('$TORCHRUN' not found; set TORCHRUN=...)"
fi
OUT="${OUT:-logs/sweep_$(basename "${CONFIG%.*}")}"

# Resolve defaults and validate every setting of the grid before the first run starts.
GRID="$(SWEEP_REPO="$REPO" "$PY" - "$CONFIG" "$W_LIST" "$C_LIST" "$S_LIST" "$PAPER_SCALE" "$TIE_HEAD" "${EXTRA[@]+"${EXTRA[@]}"}" <<'PYEOF'
import math, os, sys
sys.path.insert(0, os.environ["SWEEP_REPO"])
import train_gpt
config, w_list, c_list, s_list, paper_scale, tie_head = sys.argv[1], sys.argv[2].split(), sys.argv[3].split(), sys.argv[4].split(), sys.argv[5] == "1", sys.argv[6] == "1"
extra = sys.argv[7:]
if tie_head and any(a.split("=")[0] == "--head_w_max" for a in extra):
    print("sweep_sigma_max.sh: error: --tie_head sets head_w_max; do not also pass --head_w_max after --", file=sys.stderr)
    sys.exit(2)
try:
    base = train_gpt.parse_config(["--config", config] + extra)
    for w in w_list:
        if not (float(w) > 0):
            raise train_gpt.ConfigError(f"w_max {w} must be > 0")
    for c in c_list or [base.constraint]:
        for w in w_list:
            scale = (24.0 if float(w) == 1 else math.sqrt(128) / float(w) ** 2) if paper_scale else None
            for s in s_list or [str(base.seed)]:
                args = ["--config", config, "--w_max", w, "--constraint", c, "--seed", s] + extra
                if tie_head:
                    args += ["--head_w_max", w]
                if scale is not None:
                    args += ["--softmax_scale", repr(scale)]
                train_gpt.parse_config(args)
                print(c, w, s, "-" if scale is None else repr(scale))
except (train_gpt.ConfigError, ValueError) as e:
    print(f"sweep_sigma_max.sh: error: {e}", file=sys.stderr)
    sys.exit(2)
PYEOF
)" || exit 2

[ "$DRY" = 1 ] || mkdir -p "$OUT"
N_RUNS=$(printf '%s\n' "$GRID" | wc -l)
echo "sweep: $N_RUNS runs of $CONFIG into $OUT ($([ "$NPROC" -gt 1 ] && echo "torchrun x$NPROC" || echo "1 process"))"
if [ "$NPROC" -gt 1 ]; then LAUNCH=("$TORCHRUN" --standalone "--nproc_per_node=$NPROC"); else LAUNCH=("$PY"); fi

i=0
while read -r c w s scale; do
  i=$((i + 1))
  dir="$OUT/${c}_w${w}_s${s}"
  cmd=("${LAUNCH[@]}" "$REPO/train_gpt.py" --config "$CONFIG" --w_max "$w" --constraint "$c" --seed "$s" --out_dir "$dir")
  [ "$scale" = "-" ] || cmd+=(--softmax_scale "$scale")
  [ "$TIE_HEAD" = 0 ] || cmd+=(--head_w_max "$w")
  cmd+=("${EXTRA[@]+"${EXTRA[@]}"}")
  if [ -f "$dir/ckpt_final.pt" ]; then
    echo "[$i/$N_RUNS] $dir: finished, skipped"
    continue
  elif [ -f "$dir/config.json" ]; then
    if compgen -G "$dir/ckpt_step*.pt" >/dev/null; then
      echo "[$i/$N_RUNS] $dir: interrupted, resuming from its latest checkpoint"
      cmd+=(--resume latest)
    else
      die "$dir holds an unfinished run without a checkpoint to resume; delete it (rm -r '$dir') and re-run this command (finished runs are kept)"
    fi
  else
    echo "[$i/$N_RUNS] $dir: training"
  fi
  if [ "$DRY" = 1 ]; then printf '%q ' "${cmd[@]}"; echo; continue; fi
  if ! "${cmd[@]}"; then
    die "run $dir failed (see its output above and $dir/log.txt); fix the cause and re-run this command: finished runs are kept"
  fi
done <<< "$GRID"
[ "$DRY" = 1 ] && exit 0

RUNS=()
for d in "$OUT"/*/; do [ -f "$d/config.json" ] && RUNS+=("${d%/}"); done
"$PY" "$REPO/scripts/results_table.py" --certify --out "$OUT/results.md" "${RUNS[@]}" \
  || die "results_table.py failed on $OUT"
if "$PY" "$REPO/scripts/plot_frontier.py" --out "$OUT/frontier.png" "${RUNS[@]}"; then
  echo "sweep done: $OUT/results.md, $OUT/frontier.png"
else
  echo "sweep_sigma_max.sh: warning: no frontier plot (plot_frontier.py's error is above; re-run it alone once fixed:" \
       "$PY scripts/plot_frontier.py --out $OUT/frontier.png $OUT/*/)" >&2
  echo "sweep done: $OUT/results.md (no frontier plot)"
fi

"""Check that a change of train_gpt.py (a refactor) leaves training bitwise unchanged.

Runs short fp32 CPU trainings of several configs with the code of a git revision and with the working
tree, then compares everything each run wrote: every metrics.jsonl record, every checkpoint (weights,
optimizer, loader and RNG state) and certificate.json, all exactly (timings and paths aside).

    python scripts/bitwise_check.py                          # HEAD against the working tree, all configs (~10-15 min, 2 cores)
    python scripts/bitwise_check.py --before 6306035 --only quick,pipeline --steps 10
    python scripts/bitwise_check.py --compare DIR_A DIR_B    # two earlier outputs

The configs cover the constraints' code paths (soft cap, hard cap, spectral normalize, svd_clip, weight
decay), AdamW with QK-Clip, Modula step sizes with the rownorm embedding, the 145M pipeline's options
(documents, windows, sequential loader, reference Newton-Schulz, bf16 soft cap), the speedrun and
baseline archs. Needs the Shakespeare shards (python data/shakespeare_char.py) and git.
"""

import argparse
import glob
import json
import os
import shutil
import subprocess
import sys
import tempfile

import torch

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
QUICK = ["--config", "configs/quickstart.toml"]
CONFIGS = {
    "quick": QUICK,
    "reference": ["--config", "configs/paper/shakespeare_reference.toml", "--val_tokens", "8192", "--val_slice_windows", "128"],
    "hard_cap": QUICK + ["--constraint", "hard_cap"],
    "adamw_qk_clip": QUICK + ["--optimizer", "adamw", "--constraint", "spectral_hammer", "--lr_hidden", "0.002",
                              "--lr_head", "0.002", "--qk_clip_tau", "30"],
    "pipeline": QUICK + ["--doc_token", "0", "--window_schedule", "reference", "--layer_pattern", "LSL", "--rope",
                         "half_truncated", "--ns_coeffs", "reference", "--hidden_init", "ns_uniform", "--embed_cap", "lookup",
                         "--soft_cap_coupling", "nanogpt", "--soft_cap_dtype", "bf16", "--loader", "sequential", "--seq_len",
                         "512", "--micro_batch_tokens", "512", "--batch_tokens", "2048", "--eval_at_start", "true",
                         "--val_seq_len", "1024"],
    "speedrun": QUICK + ["--arch", "speedrun", "--n_layer", "8", "--d_model", "128", "--constraint", "none", "--head_spectral",
                         "false", "--ns_coeffs", "speedrun", "--muon_scale", "speedrun", "--final_scale", "1"],
    "baseline_dropout": QUICK + ["--arch", "baseline", "--constraint", "none", "--dropout", "0.1", "--final_scale", "1"],
    "svd_clip_rownorm": QUICK + ["--constraint", "svd_clip", "--embed_update", "rownorm", "--head_spectral", "false",
                                 "--lr_alloc", "modula"],
    "spectral_normalize": QUICK + ["--constraint", "spectral_normalize", "--power_iters", "2", "--nesterov", "false"],
    "weight_decay": QUICK + ["--constraint", "weight_decay", "--wd", "0.1", "--stop_after", "20"],
}
# what may differ between two identical runs: where they were written and how long they took
NOT_COMPARED = {"out_dir", "run_name", "checkpoint", "run_dir", "path", "train_time_s", "certify_s", "checksum"}


def differences(a, b, where: str) -> list[str]:
    """Where two loaded run files differ: tensors by dtype, shape and exact values, everything else by ==."""
    if torch.is_tensor(a) or torch.is_tensor(b):
        same = torch.is_tensor(a) and torch.is_tensor(b) and a.dtype == b.dtype and a.shape == b.shape and torch.equal(a, b)
        return [] if same else [where]
    if isinstance(a, dict) and isinstance(b, dict):
        ka, kb = set(a) - NOT_COMPARED, set(b) - NOT_COMPARED
        if ka != kb:
            return [f"{where}: keys {sorted(map(str, ka ^ kb))}"]
        return [d for k in sorted(ka, key=repr) for d in differences(a[k], b[k], f"{where}.{k}")]
    if isinstance(a, (list, tuple)) and isinstance(b, (list, tuple)):
        if len(a) != len(b):
            return [f"{where}: length {len(a)} != {len(b)}"]
        return [d for i, (x, y) in enumerate(zip(a, b)) for d in differences(x, y, f"{where}[{i}]")]
    if isinstance(a, float) and isinstance(b, float) and a != a and b != b:  # NaN == NaN here
        return []
    return [] if a == b else [f"{where}: {a!r} != {b!r}"]


def compare_run(da: str, db: str) -> list[str]:
    """Differences between two run directories (file names, metrics, checkpoints, certificate)."""
    names = sorted(os.path.basename(f) for f in glob.glob(os.path.join(da, "*")) if not f.endswith("log.txt"))
    other = sorted(os.path.basename(f) for f in glob.glob(os.path.join(db, "*")) if not f.endswith("log.txt"))
    if names != other:
        return [f"files {names} != {other}"]
    out = []
    for n in names:
        pa, pb = os.path.join(da, n), os.path.join(db, n)
        if n.endswith(".pt"):
            out += differences(torch.load(pa, weights_only=True), torch.load(pb, weights_only=True), n)
        elif n.endswith(".jsonl"):
            out += differences([json.loads(x) for x in open(pa)], [json.loads(x) for x in open(pb)], n)
        elif n.endswith(".json"):
            out += differences(json.load(open(pa)), json.load(open(pb)), n)
    return out


def compare(dir_a: str, dir_b: str) -> bool:
    ok = True
    for run in sorted(d for d in os.listdir(dir_a) if os.path.isdir(os.path.join(dir_a, d))):
        diffs = compare_run(os.path.join(dir_a, run), os.path.join(dir_b, run))
        records = sum(1 for _ in open(os.path.join(dir_a, run, "metrics.jsonl")))
        ckpts = len(glob.glob(os.path.join(dir_a, run, "*.pt")))
        print(f"{run}: {records} metrics records, {ckpts} checkpoints: " + ("identical" if not diffs else
              f"DIFFER in {len(diffs)} places: " + "; ".join(diffs[:4])), flush=True)
        ok &= not diffs
    return ok


def train_all(code_dir: str, out: str, names: list[str], steps: int) -> None:
    """Each config for `steps` steps with the train_gpt.py of code_dir (one thread: reproducible on any core count)."""
    env = dict(os.environ, OMP_NUM_THREADS="1")
    every = str(max(1, steps // 3))
    for name in names:
        run_dir = os.path.join(out, name)
        cmd = [sys.executable, "train_gpt.py", *CONFIGS[name], "--num_steps", str(steps), "--log_every", "1",
               "--eval_every", every, "--save_every", every, "--dtype", "fp32", "--device", "cpu", "--out_dir", run_dir]
        if name == "weight_decay":
            cmd[cmd.index("--stop_after") + 1] = str(max(1, 2 * steps // 3))
        r = subprocess.run(cmd, cwd=code_dir, env=env, capture_output=True, text=True)
        if r.returncode:
            sys.exit(f"error: {name} failed with the code in {code_dir}:\n{r.stderr[-2000:]}")
        print(f"  trained {name} ({code_dir})", flush=True)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--before", default="HEAD", help="git revision whose code is the reference (default HEAD)")
    ap.add_argument("--only", default="", help=f"comma-separated subset of {','.join(CONFIGS)}")
    ap.add_argument("--steps", type=int, default=30, help="training steps per run (default 30)")
    ap.add_argument("--out", default="", help="keep the runs here (default: a temporary directory, removed)")
    ap.add_argument("--compare", nargs=2, metavar="DIR", help="only compare two earlier outputs of this script")
    args = ap.parse_args(argv)
    if args.compare:
        return 0 if compare(*args.compare) else 1
    names = args.only.split(",") if args.only else list(CONFIGS)
    bad = [n for n in names if n not in CONFIGS]
    if bad or args.steps < 3:
        ap.error(f"unknown config(s) {', '.join(bad)}; choose from {','.join(CONFIGS)}" if bad else "--steps must be >= 3")
    data = os.path.join(REPO, "data", "shakespeare_char")
    if not glob.glob(os.path.join(data, "train_*.bin")):
        ap.error(f"no Shakespeare shards in {data}: run python data/shakespeare_char.py first")
    if args.out and os.path.exists(args.out):
        ap.error(f"--out {args.out} exists; choose a new directory (runs are never overwritten)")
    work = args.out or tempfile.mkdtemp(prefix="bitwise_check_")
    before_code = os.path.join(work, "code_before")
    subprocess.run(["git", "-C", REPO, "worktree", "add", "--detach", before_code, args.before], check=True,
                   capture_output=True)
    try:
        shutil.copytree(data, os.path.join(before_code, "data", "shakespeare_char"), dirs_exist_ok=True)
        train_all(before_code, os.path.join(work, "before"), names, args.steps)
        train_all(REPO, os.path.join(work, "after"), names, args.steps)
        ok = compare(os.path.join(work, "before"), os.path.join(work, "after"))
    finally:
        subprocess.run(["git", "-C", REPO, "worktree", "remove", "--force", before_code], capture_output=True)
        if not args.out:
            shutil.rmtree(work, ignore_errors=True)
    print(f"{args.before} vs the working tree: " + ("bitwise identical" if ok else "DIFFERENT"))
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())

"""Markdown table of finished runs in the layout of the paper's NanoGPT table.

    python scripts/results_table.py logs/sweep_w/*/                  # print the table
    python scripts/results_table.py logs/sweep_w/*/ --certify --out logs/sweep_w/results.md

One row per setting; runs that differ only in seed (and in run-time keys such as out_dir or device)
are one row showing mean +- sample std over seeds. Per run it reads config.json, the last eval
line of metrics.jsonl (val_loss, val_acc, max_act_entry, step, and slice_val_loss when the run scored
the reference code's validation slice) and certificate.json, which train_gpt.py saves next to
ckpt_final.pt (what `python lipschitz_bound.py RUN/ckpt_final.pt --mode all --json` prints). With
--certify a finished run without one (its process ended between the final checkpoint and the
certificate) is certified and the file saved.

Columns: bound paper = the published certificate algorithm (not a sound upper bound with several
heads, see lipschitz_bound.py); bound tight = the sound per-head certificate. Both are written
10^k with k = log10 of the bound (mean +- std of k over seeds). A baseline run has no certificate (inf).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

# Config keys that do not change what a run computes: runs differing only in these (and the seed)
# are repetitions of one setting.
RUNTIME_KEYS = {"seed", "run_name", "out_dir", "resume", "device", "compile", "debug", "wandb", "wandb_project",
                "eval_every", "log_every", "save_every", "keep_last", "train_bin", "val_bin"}
CERT_FILE = "certificate.json"  # lipschitz_bound.CERTIFICATE_FILE, not imported: reading a table needs no torch
CERT_MODES = ("paper", "tight")


class ResultsError(ValueError):
    pass


def _read_json(path: str, lines: bool = False):
    """The JSON object of path (lines=True: one per non-empty line); a malformed file is a ResultsError."""
    try:
        with open(path, "rb") as fh:
            text = fh.read().decode("utf-8")
        return [json.loads(ln) for ln in text.splitlines() if ln.strip()] if lines else json.loads(text)
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ResultsError(f"{path}: not valid JSON ({e}); the run's files are damaged") from None


def _float(x) -> float:
    """JSON numbers, or the strings 'inf' / 'nan' lipschitz_bound writes for non-finite values."""
    return float(x) if x is not None else math.nan


def cert_log10(cert: dict | None, mode: str) -> float:
    """log10 of the bound of one mode; +inf for an uncertified run; nan when unknown."""
    if cert is None:
        return math.nan
    if not cert.get("certified", True):
        return math.inf
    modes = cert.get("modes") or {cert.get("mode"): cert}
    if mode not in modes:
        return math.nan
    return _float(modes[mode].get("log10_bound"))


def load_run(run_dir: str, certify: bool = False) -> dict:
    """One run's settings and final results; raises ResultsError naming what is missing."""
    cfg_path, met_path = os.path.join(run_dir, "config.json"), os.path.join(run_dir, "metrics.jsonl")
    if not os.path.isfile(cfg_path):
        raise ResultsError(f"{run_dir}: no config.json (not a run directory of train_gpt.py)")
    if not os.path.isfile(met_path):
        raise ResultsError(f"{run_dir}: no metrics.jsonl (the run has not reached an eval)")
    cfg = _read_json(cfg_path)
    evals = [rec for rec in _read_json(met_path, lines=True) if isinstance(rec, dict) and "val_loss" in rec]
    if not evals:
        raise ResultsError(f"{met_path} holds no eval yet (no line with val_loss)")
    final = evals[-1]  # train_gpt also logs training lines; the last eval is the final one
    finished = os.path.isfile(os.path.join(run_dir, "ckpt_final.pt"))
    cert = None
    cert_path = os.path.join(run_dir, CERT_FILE)
    if os.path.isfile(cert_path):
        cert = _read_json(cert_path)
    elif certify and finished:
        import lipschitz_bound  # needs torch: imported only to certify
        try:
            cert = lipschitz_bound.save_certificate(run_dir)  # what the trainer runs after its final checkpoint
        except (lipschitz_bound.CheckpointError, lipschitz_bound.CertificateError) as e:
            raise ResultsError(f"{run_dir}: cannot certify ({e})") from None
    return {"dir": run_dir, "config": cfg, "final": final, "finished": finished,
            "log10_bound": {m: cert_log10(cert, m) for m in CERT_MODES}}


def group_key(cfg: dict) -> tuple:
    return tuple(sorted((k, json.dumps(v)) for k, v in cfg.items() if k not in RUNTIME_KEYS))


def _mean_std(xs: list[float]) -> tuple[float, float]:
    xs = [x for x in xs if not math.isnan(x)]
    if not xs:
        return math.nan, math.nan
    if any(math.isinf(x) for x in xs):
        return (math.inf if all(x == math.inf for x in xs) else math.nan), math.nan
    m = sum(xs) / len(xs)
    s = math.sqrt(sum((x - m) ** 2 for x in xs) / (len(xs) - 1)) if len(xs) > 1 else math.nan
    return m, s


def group_runs(runs: list[dict]) -> list[dict]:
    """Rows: one per setting, mean and std over its seeds of every reported metric."""
    groups: dict[tuple, list[dict]] = {}
    for r in runs:
        groups.setdefault(group_key(r["config"]), []).append(r)
    rows = []
    for members in groups.values():
        cfg = members[0]["config"]
        row = {"config": cfg, "runs": [m["dir"] for m in members], "seeds": sorted(m["config"].get("seed", 0) for m in members),
               "finished": all(m["finished"] for m in members), "step": min(int(m["final"].get("step", 0)) for m in members)}
        for k in ("val_loss", "val_acc", "max_act_entry", "slice_val_loss"):
            row[k] = _mean_std([_float(m["final"].get(k)) for m in members])
        for mode in CERT_MODES:
            row[f"log10_{mode}"] = _mean_std([m["log10_bound"][mode] for m in members])
        rows.append(row)
    rows.sort(key=lambda r: (r["config"].get("arch") != "baseline", r["config"].get("arch", ""), r["config"].get("d_model", 0),
                             r["config"].get("optimizer", ""), r["config"].get("constraint", ""), r["config"].get("w_max", 0),
                             r["config"].get("num_steps", 0)))
    return rows


def fmt_value(ms: tuple[float, float], digits: int = 4, fmt: str = "f") -> str:
    m, s = ms
    if math.isnan(m):
        return "-"
    text = f"{m:.{digits}{fmt}}" if fmt == "f" else f"{m:.{digits}g}"
    return text + ("" if math.isnan(s) else f" ± {s:.{digits}{fmt}}" if fmt == "f" else f" ± {s:.2g}")


def fmt_bound(ms: tuple[float, float]) -> str:
    m, s = ms
    if math.isnan(m):
        return "-"
    if math.isinf(m):
        return "inf"
    return f"10^{m:.2f}" + ("" if math.isnan(s) else f" ± {s:.2f}")


def fmt_tokens(n: float) -> str:
    return f"{n / 1e9:.2f}B" if n >= 1e8 else f"{n / 1e6:.1f}M" if n >= 1e6 else f"{n / 1e3:.0f}K" if n >= 1e3 else f"{n:.0f}"


def model_name(cfg: dict) -> str:
    return f"{cfg.get('arch', '?')} {cfg.get('n_layer')}x{cfg.get('d_model')}"


HEADER = ["model", "optimizer", "constraint", "sigma_max", "steps / tokens", "seeds", "bound paper", "bound tight",
          "val acc", "val loss", "max act entry"]
SLICE_HEADER = "slice val loss"  # shown when a run scored the reference's validation slice (val_slice_windows)


def recipe(cfg: dict) -> str:
    """'reference' for runs with the reference code's Modula step sizes (lr_alloc=modula), else 'repo'."""
    if cfg.get("lr_alloc", "uniform") != "modula":
        return "repo"
    return f"reference (blocks mass {cfg.get('blocks_mass', math.nan):g})"


def markdown_table(rows: list[dict]) -> str:
    with_slice = any(not math.isnan(r["slice_val_loss"][0]) for r in rows)
    header = ["recipe"] + HEADER + ([SLICE_HEADER] if with_slice else [])
    out = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for r in rows:
        c = r["config"]
        extra = []  # the settings that move a run along the frontier besides sigma_max
        if c.get("arch", "lipschitz") != "baseline":
            extra.append(f"softmax scale {c.get('softmax_scale', math.nan):g}")
        if c.get("final_scale", 1.0) != 1.0:
            extra.append(f"final scale {c['final_scale']:g}")
        if c.get("constraint") in ("weight_decay", "spectral_wd"):
            extra.append(f"wd {c.get('wd', math.nan):g}")
        extra.append(f"lr {c.get('lr_hidden', math.nan):g}")
        constraint = c.get("constraint", "?") + (f" ({', '.join(extra)})" if extra else "")
        steps = f"{r['step']} / {fmt_tokens(r['step'] * c.get('batch_tokens', 0))}" + ("" if r["finished"] else " (unfinished)")
        cells = [model_name(c), c.get("optimizer", "?"), constraint,
                 "-" if c.get("constraint") in ("none", "weight_decay") else f"{c.get('w_max', math.nan):g}", steps,
                 ",".join(str(s) for s in r["seeds"]), fmt_bound(r["log10_paper"]), fmt_bound(r["log10_tight"]),
                 fmt_value(r["val_acc"]), fmt_value(r["val_loss"]), fmt_value(r["max_act_entry"], 4, "g")]
        cells = [recipe(c)] + cells + ([fmt_value(r["slice_val_loss"])] if with_slice else [])
        out.append("| " + " | ".join(cells) + " |")
    return "\n".join(out)


def load_runs(run_dirs: list[str], certify: bool = False, warn=lambda m: print(f"warning: {m}", file=sys.stderr)) -> list[dict]:
    runs = []
    for d in run_dirs:
        try:
            runs.append(load_run(d.rstrip("/"), certify))
        except ResultsError as e:
            warn(f"{e}; skipped")
    if not runs:
        raise ResultsError(f"none of the {len(run_dirs)} directories holds a run with results: pass run directories "
                           "of train_gpt.py (each with config.json and metrics.jsonl)")
    return runs


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("run_dirs", nargs="+", help="run directories of train_gpt.py")
    ap.add_argument("--certify", action="store_true", help="compute and save certificate.json where missing")
    ap.add_argument("--out", default="", help="also write the table to this file")
    args = ap.parse_args(argv)
    try:
        rows = group_runs(load_runs(args.run_dirs, args.certify))
    except ResultsError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    table = markdown_table(rows)
    print(table)
    if args.out:
        with open(args.out, "w") as fh:
            fh.write(table + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())

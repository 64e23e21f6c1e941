"""Plot val loss against the log10 certified Lipschitz bound: one series per optimizer x constraint.

    python scripts/plot_frontier.py logs/sweep_w/*/ --out logs/sweep_w/frontier.png
    python scripts/plot_frontier.py logs/sweep_*/*/ --mode paper --metric val_acc

The paper's figure: each point a trained model (mean over seeds, error bars = std over seeds),
x = log10 of its certificate, y = its validation loss; points of one optimizer x constraint joined
in order of the bound, so the lower-left envelope is the Lipschitz-vs-loss frontier. Runs read as
in results_table.py (certificate.json; --certify computes missing ones). Uncertified runs (the
baseline) are listed in the legend title instead of plotted at x = inf.
"""

from __future__ import annotations

import argparse
import math
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from results_table import ResultsError, group_runs, load_runs, model_name  # noqa: E402

METRICS = {"val_loss": "validation loss", "val_acc": "validation accuracy"}


def series(rows: list[dict], mode: str, metric: str) -> tuple[dict, list[str]]:
    """{(model, optimizer, constraint): [(x, y, yerr, w_max)] sorted by x}, and notes on rows left out."""
    out, skipped = {}, []
    for r in rows:
        c = r["config"]
        x, y, yerr = r[f"log10_{mode}"][0], r[metric][0], r[metric][1]
        label = (model_name(c), c.get("optimizer", "?"), c.get("constraint", "?"))
        if not math.isfinite(x) or math.isnan(y):
            skipped.append(f"{' '.join(label)}: {metric} {y:.3f}, bound {'inf' if x == math.inf else 'unknown'}")
            continue
        out.setdefault(label, []).append((x, y, 0.0 if math.isnan(yerr) else yerr, c.get("w_max")))
    for pts in out.values():
        pts.sort()
    return out, skipped


def plot(rows: list[dict], path: str, mode: str = "tight", metric: str = "val_loss", title: str = "") -> dict:
    try:
        import matplotlib
    except ImportError:
        raise ResultsError("the plot needs matplotlib, a runtime requirement: pip install -r requirements.txt "
                           "(or pip install 'matplotlib>=3.8')") from None
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    data, skipped = series(rows, mode, metric)
    if not data:
        raise ResultsError(f"no run has both a finite {mode} certificate and {metric}: run with --certify, "
                           "or certify the checkpoints with lipschitz_bound.py")
    fig, ax = plt.subplots(figsize=(6.4, 4.4), dpi=150)
    markers = "osD^vP*X"
    for i, (label, pts) in enumerate(sorted(data.items())):
        xs, ys, es, ws = zip(*pts)
        ax.errorbar(xs, ys, yerr=es if any(es) else None, marker=markers[i % len(markers)], capsize=3, lw=1.5,
                    label=" / ".join(label[1:]) + ("" if len({k[0] for k in data}) == 1 else f" ({label[0]})"))
        for x, y, w in zip(xs, ys, ws):
            ax.annotate(f"{w:g}", (x, y), textcoords="offset points", xytext=(4, 4), fontsize=7, color="0.35")
    ax.set_xlabel(f"log10 certified Lipschitz bound ({mode})")
    ax.set_ylabel(METRICS[metric])
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, title="optimizer / constraint (labels: sigma_max)", title_fontsize=8)
    if skipped:
        ax.text(0.01, 0.01, "not plotted: " + "; ".join(skipped), transform=ax.transAxes, fontsize=6, color="0.4", va="bottom")
    ax.set_title(title or f"{METRICS[metric]} vs certified bound", fontsize=10)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return data


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("run_dirs", nargs="+", help="run directories of train_gpt.py")
    ap.add_argument("--out", default="frontier.png", help="PNG to write")
    ap.add_argument("--mode", default="tight", choices=("tight", "paper"), help="which certificate on the x axis")
    ap.add_argument("--metric", default="val_loss", choices=tuple(METRICS), help="y axis")
    ap.add_argument("--certify", action="store_true", help="compute and save certificate.json where missing")
    ap.add_argument("--title", default="")
    args = ap.parse_args(argv)
    try:
        data = plot(group_runs(load_runs(args.run_dirs, args.certify)), args.out, args.mode, args.metric, args.title)
    except ResultsError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"wrote {args.out}: {sum(len(p) for p in data.values())} points in {len(data)} series")
    return 0


if __name__ == "__main__":
    sys.exit(main())

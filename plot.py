"""
Plot training runs from their metrics.jsonl: loss (train and validation), learning rate and tokens/s against steps.

    python plot.py out/metrics.jsonl                          # writes out/metrics.png
    python plot.py out-a/metrics.jsonl out-b --out compare.png  # several runs on one plot (a run's folder works too)

Needs matplotlib (pip install matplotlib), which nothing else in the repo does.
"""

import argparse
import json
import os

# one panel each: its title and the (metrics key, legend label) of each curve
PANELS = [("loss", [("loss", "train"), ("val_loss", "val")]), ("learning rate", [("lr", "")]),
          ("tokens/s", [("tokens_per_sec", "")])]


def read_metrics(path):
    if os.path.isdir(path):
        path = os.path.join(path, "metrics.jsonl")
    try:
        with open(path) as f:
            records = [json.loads(line) for line in f if line.strip()]
    except OSError as e:
        raise SystemExit(f"error: cannot read {path}: {e.strerror}")
    except json.JSONDecodeError as e:
        raise SystemExit(f"error: {path} line {e.lineno} is not JSON: is it a metrics.jsonl?")
    if not records:
        raise SystemExit(f"error: {path} holds no records yet")
    return path, records


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.strip().splitlines()[0])
    p.add_argument("runs", nargs="+", help="metrics.jsonl files or the out_dirs holding them")
    p.add_argument("--out", help="the PNG to write (default: metrics.png beside the first run's metrics)")
    args = p.parse_args(argv)
    runs = [read_metrics(path) for path in args.runs]
    try:
        import matplotlib

        matplotlib.use("Agg")  # files only: no display needed
        import matplotlib.pyplot as plt
    except ImportError:
        raise SystemExit("error: plot.py needs matplotlib: pip install matplotlib")
    fig, axes = plt.subplots(1, len(PANELS), figsize=(6 * len(PANELS), 4.5))
    for ax, (title, series) in zip(axes, PANELS):
        for path, records in runs:
            run = os.path.basename(os.path.dirname(os.path.abspath(path))) if len(runs) > 1 else ""
            for key, label in series:
                points = [(r["step"], r[key]) for r in records if key in r]
                if points:
                    ax.plot(*zip(*points), marker="o" if key.startswith("val") else None, markersize=3,
                            label=" ".join(filter(None, [run, label])) or None)
        ax.set_title(title)
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
        if ax.get_legend_handles_labels()[0]:
            ax.legend()
    out = args.out or os.path.join(os.path.dirname(os.path.abspath(runs[0][0])), "metrics.png")
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    print(f"wrote {out}")


if __name__ == "__main__":
    main()

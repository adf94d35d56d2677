"""
Plot training runs from their metrics.jsonl: loss (train and validation), learning rate and tokens/s against steps.

    python plot.py out/metrics.jsonl                          # writes out/metrics.png
    python plot.py out-a/metrics.jsonl out-b --out compare.png  # several runs on one plot (a run's folder works too)

Needs matplotlib (pip install matplotlib), which nothing else in the repo does.
"""

import json
import os
import sys

from cli import OneLineParser  # (no torch: plot.py runs without it)

# one panel each: its title and the (metrics key, legend label) of each curve
PANELS = [("loss", [("loss", "train"), ("val_loss", "val")]), ("learning rate", [("lr", "")]),
          ("tokens/s", [("tokens_per_sec", "")])]


def fail(message):
    """A one-line error, and exit 2 (as every script of the repo exits on bad input)."""
    print(f"error: {message}", file=sys.stderr)
    sys.exit(2)


def read_metrics(path):
    """A run's records. A last line that is not a record was cut short by a kill (or is being written now): it is
    skipped with a note. A bad line before it is damage, or another kind of file: refused, naming that line."""
    if os.path.isdir(path):
        path = os.path.join(path, "metrics.jsonl")
    try:
        with open(path, "rb") as f:  # binary: only b"\n" ends a line (text mode also splits at "\r")
            lines = [(lineno, line) for lineno, line in enumerate(f, 1) if line.strip()]
    except OSError as e:
        fail(f"cannot read {path}: {e.strerror}")
    records = []
    for lineno, line in lines:
        try:
            record = json.loads(line)
        except (ValueError, RecursionError):  # a JSONDecodeError, a UnicodeDecodeError, or nested too deeply
            record = None
        if not isinstance(record, dict) or not isinstance(record.get("step"), (int, float)):
            if lineno == lines[-1][0]:
                print(f"note: {path}: skipped its last line, cut short (the run was interrupted while writing it)",
                      file=sys.stderr)
                break
            fail(f"{path} line {lineno} is not a metrics record (JSON with a step): is it a metrics.jsonl? Fix or "
                 f"remove that line")
        records.append(record)
    if not records:
        fail(f"{path} holds no records yet")
    return path, records


def main(argv=None):
    p = OneLineParser(description=__doc__.strip().splitlines()[0])
    p.add_argument("runs", nargs="+", help="metrics.jsonl files or the out_dirs holding them")
    p.add_argument("--out", help="the PNG to write (default: metrics.png beside the first run's metrics)")
    args = p.parse_args(argv)
    runs = [read_metrics(path) for path in args.runs]
    try:
        import matplotlib

        matplotlib.use("Agg")  # files only: no display needed
        import matplotlib.pyplot as plt
    except ImportError:
        fail("plot.py needs matplotlib: pip install matplotlib")
    fig, axes = plt.subplots(1, len(PANELS), figsize=(6 * len(PANELS), 4.5))
    for ax, (title, series) in zip(axes, PANELS):
        for k, (path, records) in enumerate(runs):
            run = os.path.basename(os.path.dirname(os.path.abspath(path))) if len(runs) > 1 else ""
            for key, label in series:
                points = [(r["step"], r[key]) for r in records if key in r]
                if points:  # a run's colour in every panel; its validation curve dashed, with markers
                    val = key.startswith("val")
                    ax.plot(*zip(*points), color=f"C{k}", linestyle="--" if val else "-", marker="o" if val else None,
                            markersize=3, label=" ".join(filter(None, [run, label])) or None)
        ax.set_title(title)
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
        if ax.get_legend_handles_labels()[0]:
            ax.legend()
    out = args.out or os.path.join(os.path.dirname(os.path.abspath(runs[0][0])), "metrics.png")
    fig.tight_layout()
    try:
        fig.savefig(out, dpi=110)
    except OSError as e:
        fail(f"cannot write {out}: {e.strerror or e}")
    except ValueError as e:  # an --out suffix matplotlib cannot write: its message lists those it can
        fail(f"cannot write {out}: {e}")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()

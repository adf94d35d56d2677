"""
Where a run's records go: metrics.jsonl always (checkpoint.MetricsLog), and, when asked, the trackers people already
watch runs in: TensorBoard (--tensorboard: event files under out_dir/tensorboard) and Weights & Biases (--wandb
PROJECT). One writer fans each record out to all of them, under the same names and step, from rank 0 only.

    with Tracking(MetricsLog(path), trackers(args, resume_step)) as log:
        log.write({"step": 10, "loss": 3.2, "lr": 4e-3, ...})

A tracker is optional twice over: its package is imported only when asked for (check_trackers says what to pip
install, before anything is written), and a tracker that fails while the run goes on (no network, no login, its own
disk full) is dropped with one warning: the training and metrics.jsonl go on as if it had never been asked for.
"""

import importlib.util
import json
import os
import sys
import tempfile

from cli import UserError, first_line
from files import write_atomically

WANDB_RUN_ID = "wandb_run_id"  # in out_dir: the W&B run that --resume continues


def check_trackers(args):
    """The trackers' packages, before the run starts: one line naming what to install."""
    for asked, package, flag in ((args.tensorboard, "tensorboard", "--tensorboard"), (args.wandb, "wandb", "--wandb")):
        if asked and importlib.util.find_spec(package) is None:
            raise UserError(f"{flag} needs the {package} package: pip install {package} (or drop {flag})")


def trackers(args, resume_step):
    """The trackers args asks for, started (rank 0 calls this). One that cannot start is left out with a warning."""
    config = {k: v for k, v in vars(args).items() if isinstance(v, (str, int, float, bool, type(None)))}
    started = []
    for asked, tracker in ((args.tensorboard, TensorBoard), (args.wandb, WandB)):
        if asked:
            try:
                started.append(tracker(args, config, resume_step))
            except Exception as e:  # whatever the tracker raises: it must not stop the run
                warn(tracker.__name__, "could not start", e)
    return started


def warn(name, what, error):
    print(f"warning: {name} {what} ({first_line(error)}); training goes on without it (metrics.jsonl has every record)",
          file=sys.stderr)


class TensorBoard:
    """Scalars under their metrics.jsonl names, at their step. On --resume the events that the interrupted run
    logged after its checkpoint are purged (SummaryWriter's purge_step), so the curves read as one run; a new run
    (--overwrite, or an out_dir whose run saved nothing) purges all of an earlier run's, as metrics.jsonl starts
    anew."""

    def __init__(self, args, config, resume_step):
        from torch.utils.tensorboard import SummaryWriter

        log_dir = os.path.join(args.out_dir, "tensorboard")
        # writable, or an OSError here (a warning): past this point a failure to write would be raised in the
        # writer's own thread, as a traceback, after the warning
        os.makedirs(log_dir, exist_ok=True)
        with tempfile.TemporaryFile(dir=log_dir):
            pass
        self.writer = SummaryWriter(log_dir,
                                    purge_step=0 if resume_step is None else resume_step + 1)
        self.writer.add_text("config", "    " + json.dumps(config, indent=1).replace("\n", "\n    "),
                             global_step=resume_step or 0)  # (indented: TensorBoard shows markdown)

    def log(self, record):
        for name, value in record.items():
            if name != "step" and isinstance(value, (int, float)):
                self.writer.add_scalar(name, value, record["step"])
        self.writer.flush()

    def close(self):
        self.writer.close()


class WandB:
    """A W&B run in --wandb's project, named --wandb_run_name (default: the out_dir's name), with every flag as its
    config. Its id is kept in out_dir, so that --resume continues the same run. Offline (WANDB_MODE=offline) it
    writes its files under out_dir/wandb, to `wandb sync` later."""

    def __init__(self, args, config, resume_step):
        import wandb

        id_path = os.path.join(args.out_dir, WANDB_RUN_ID)
        run_id = None
        if resume_step is not None and os.path.exists(id_path):
            with open(id_path) as f:
                run_id = f.read().strip() or None
        name = args.wandb_run_name or os.path.basename(os.path.abspath(args.out_dir))
        self.run = wandb.init(project=args.wandb, name=name, id=run_id, resume="allow" if run_id else None,
                              config=config, dir=args.out_dir, allow_val_change=True)
        if run_id is None:
            write_atomically(id_path, lambda f: f.write(self.run.id), mode="w")

    def log(self, record):
        self.run.log({name: value for name, value in record.items() if name != "step"}, step=record["step"])

    def close(self):
        self.run.finish()


class Tracking:
    """metrics.jsonl (a MetricsLog) and the started trackers, written together; a context manager that closes all.
    A tracker that raises is dropped after one warning; metrics.jsonl's own failures (a full disk) stop the run, as
    they always have: it is what --resume and plot.py read."""

    def __init__(self, metrics, started=()):
        self.metrics, self.trackers = metrics, list(started)

    def write(self, record):
        self.metrics.write(record)
        for tracker in list(self.trackers):
            try:
                tracker.log(record)
            except Exception as e:
                warn(type(tracker).__name__, "failed", e)
                self.trackers.remove(tracker)

    def close(self):
        self.metrics.close()
        for tracker in self.trackers:
            try:
                tracker.close()
            except Exception as e:
                warn(type(tracker).__name__, "failed to close", e)
        self.trackers = []

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

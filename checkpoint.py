"""
What a run leaves in its --out_dir, and the one way back to a model:

    ckpt.pt         save_checkpoint / load_checkpoint: the model, the optimizer, the GradScaler, the step, the configs
    metrics.jsonl   MetricsLog: one JSON object per log line
    load_model(X)   a GPT from a checkpoint, an out_dir, a Hugging Face directory or a hub name

Batches and dropout masks are functions of (seed, step) (data.py, train.train_step), so the step is all the
position a checkpoint needs to resume exactly.
"""

import dataclasses
import json
import os

import torch

import hf
from model import GPT, GPTConfig
from runtime import UserError, training_state

CHECKPOINT = "ckpt.pt"
METRICS = "metrics.jsonl"


def save_checkpoint(path, model, optimizer, scaler, step, args, write=True):
    """Everything resuming needs: the model's state dict (never a compiled or DDP-wrapped module's), the optimizer's
    and the GradScaler's, the step, the model's config and the run's (args). A sharded (FSDP) model's states are
    gathered first, in full: one format, whatever the run. Every rank calls this (gathering is a collective); the
    one with write=True writes. Written to a temporary file and renamed, so a crash never leaves half a checkpoint."""
    model_state, optimizer_state = training_state(model, optimizer)
    if not write:
        return
    state = {
        "model": model_state,
        "model_config": dataclasses.asdict(model.config),
        "optimizer": optimizer_state,
        "scaler": scaler.state_dict(),
        "step": step,
        "config": vars(args),
    }
    tmp_path = path + ".tmp"
    torch.save(state, tmp_path)
    os.replace(tmp_path, path)


def load_checkpoint(path, mmap=False):
    """A checkpoint's dict, from its path or its out_dir. Tensors only: a checkpoint cannot run code when loaded.
    mmap: map the file instead of reading it, so that only what is used is read (a look at the config is cheap
    however big the model), and the processes of a node share one copy in the page cache."""
    if os.path.isdir(path):
        path = os.path.join(path, CHECKPOINT)
    if not os.path.exists(path):
        raise UserError(f"no checkpoint at {path}: train one first, or check --out_dir")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True, mmap=mmap)
        if not isinstance(ckpt, dict) or not {"model", "model_config", "step", "config"} <= set(ckpt):
            raise ValueError("keys missing")
        return ckpt
    except Exception as e:
        raise UserError(f"cannot read checkpoint {path} ({type(e).__name__}): it is damaged or not a checkpoint")


def is_checkpoint(source):
    """Whether source names a checkpoint (a ckpt.pt, or an out_dir holding one) rather than Hugging Face weights."""
    return os.path.isfile(source) or os.path.isfile(os.path.join(source, CHECKPOINT))


def load_model(source, dropout=0.0):
    """The one way to get a trained model, for --init_from and the scripts: from a checkpoint (a ckpt.pt, or the
    out_dir holding one), a Hugging Face GPT-2 directory (config.json + model.safetensors), or a hub name (gpt2,
    gpt2-medium, gpt2-large, gpt2-xl). Returns the GPT in float32 on the CPU."""
    if is_checkpoint(source):
        ckpt = load_checkpoint(source, mmap=True)  # the weights are copied into the model; the rest is never read
        model = GPT(GPTConfig(**{**ckpt["model_config"], "dropout": dropout}))
        model.load_state_dict(ckpt["model"])
        return model
    if os.path.isdir(source) and not os.path.isfile(os.path.join(source, "config.json")):
        raise UserError(f"{source} holds neither a {CHECKPOINT} nor a Hugging Face config.json: pass a checkpoint, "
                        f"an out_dir, a Hugging Face GPT-2 directory or a hub name ({', '.join(hf.HUB_NAMES)})")
    try:
        return hf.from_pretrained(source, dropout=dropout)
    except ValueError as e:
        raise UserError(str(e))


class MetricsLog:
    """metrics.jsonl: one JSON object per log line, flushed as it is written. On resume, records past the
    checkpoint's step (logged by the interrupted run after its last save) are dropped, so the file reads as one run.
    A context manager: the file is closed on leaving it. path None writes nothing (the ranks other than 0)."""

    def __init__(self, path, resume_step=None):
        self.file = None
        if path is None:
            return
        records = []
        if resume_step is not None and os.path.exists(path):
            with open(path) as f:
                for line in f:
                    try:
                        if json.loads(line)["step"] <= resume_step:
                            records.append(line)
                    except (ValueError, KeyError, TypeError):
                        pass  # a line cut short by the crash that interrupted the run
        with open(path + ".tmp", "w") as f:
            f.writelines(records)
        os.replace(path + ".tmp", path)
        self.file = open(path, "a")

    def write(self, record):
        if self.file is not None:
            self.file.write(json.dumps(record) + "\n")
            self.file.flush()

    def close(self):
        if self.file is not None:
            self.file.close()
            self.file = None

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

"""
Train a GPT-2 on a text file.

    python train.py                                   # a laptop CPU: Tiny Shakespeare (input.txt), a few minutes
    python train.py --model gpt2 --device cuda        # GPT-2 124M on one GPU
    torchrun --standalone --nproc_per_node=8 train.py --model gpt2 --total_batch_size 524288

Everything a run makes goes to --out_dir: ckpt.pt (to --resume from) and metrics.jsonl (one JSON line per log line).
The training step is train()'s loop: batches, forward/backward over micro-steps, clip, step, log, eval, save.
"""

import argparse
import contextlib
import ctypes
import dataclasses
import json
import math
import os
import signal
import sys
import time

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch.nn.parallel import DistributedDataParallel as DDP

from data import (EOT_TOKEN, AlpacaLoader, DataError, ShardLoader, TextLoader, get_tokenizer, load_hellaswag,
                  token_byte_lengths)
from model import GPT, HUB_NAMES, PRESETS, GPTConfig

DEFAULT_MODEL = "gpt2-micro"
CHECKPOINT = "ckpt.pt"
METRICS = "metrics.jsonl"
MODEL_SHAPE = ("n_layer", "n_head", "n_embd", "block_size", "vocab_size")


class TrainError(Exception):
    """A problem the user can fix (options, a checkpoint, a diverging run): reported as one line, no traceback."""


class OneLineParser(argparse.ArgumentParser):
    def error(self, message):  # argparse's default prints the whole usage first; one line says it better
        self.exit(2, f"{self.prog}: error: {message} (see --help)\n")


def build_parser():
    p = OneLineParser(description="Train GPT-2 on a text file.", formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    a = p.add_argument
    a("--dataset_type", default="text", choices=["text", "alpaca", "shards"], help="text: a UTF-8 text file, the "
      "last 10%% held out; alpaca: instruction records in a JSON list or JSONL file, trained on the responses, 5%% "
      "held out; shards: a folder of token shards written by prepare.py")
    a("--dataset_path", default="input.txt", help="the dataset file (a folder for shards)")
    a("--model", default=DEFAULT_MODEL, help=f"preset: {', '.join(PRESETS)}")
    a("--init_from", help="start from these weights instead of random ones, taking the model's shape from them: "
      "a checkpoint (out/ckpt.pt or its directory), a Hugging Face GPT-2 directory, or gpt2, gpt2-medium, ... "
      "(downloaded when online)")
    a("--n_layer", type=int, help="override the preset's number of layers")
    a("--n_head", type=int, help="override the preset's number of attention heads")
    a("--n_embd", type=int, help="override the preset's width")
    a("--dropout", type=float, default=0.0, help="dropout probability")
    a("--batch_size", type=int, default=4, help="sequences per micro-batch, per process")
    a("--seq_len", type=int, help="tokens per sequence (default: the model's context)")
    a("--total_batch_size", type=int, help="tokens per optimizer step, all processes and micro-steps together "
      "(default: batch_size * seq_len * processes, no gradient accumulation)")
    a("--max_steps", type=int, default=320, help="optimizer steps to train for")
    a("--warmup_steps", type=int, default=20, help="steps of linear warmup from 0 to max_lr")
    a("--max_lr", type=float, default=2e-3, help="peak learning rate")
    a("--min_lr", type=float, help="learning rate at max_steps, after cosine decay (default: max_lr / 10)")
    a("--weight_decay", type=float, default=0.1, help="AdamW weight decay, on matrices and embeddings only")
    a("--beta1", type=float, default=0.9, help="AdamW beta1")
    a("--beta2", type=float, default=0.95, help="AdamW beta2")
    a("--grad_clip", type=float, default=1.0, help="clip the gradient norm to this (0: no clipping)")
    a("--dtype", default="auto", choices=["auto", "float32", "bfloat16", "float16"],
      help="autocast dtype; auto: bfloat16 where the device runs it faster than float32, float16 on older GPUs")
    a("--device", default="auto", choices=["auto", "cpu", "cuda", "mps"], help="auto: cuda, then mps, then cpu")
    a("--compile", action="store_true", help="torch.compile the model (pays off on long GPU runs)")
    a("--seed", type=int, default=1337, help="seeds the initialisation, the batches and dropout")
    a("--out_dir", default="out", help="where ckpt.pt and metrics.jsonl go")
    a("--log_interval", type=int, default=10, help="log every this many steps")
    a("--eval_interval", type=int, default=50, help="validation loss every this many steps, and at the end")
    a("--eval_steps", type=int, default=10, help="global batches of validation data per evaluation")
    a("--save_interval", type=int, default=200, help="checkpoint every this many steps, and at the end")
    a("--hellaswag_path", help="HellaSwag's hellaswag_val.jsonl, or 'download' (online): its accuracy is logged "
      "every --hellaswag_interval steps and at the end")
    a("--hellaswag_interval", type=int, default=1000, help="steps between HellaSwag evaluations")
    a("--sample_tokens", type=int, default=200, help="length of the sample printed at the end (0: none)")
    a("--resume", action="store_true", help="continue the run in --out_dir from its ckpt.pt, with its saved config")
    a("--overwrite", action="store_true", help="start afresh even if --out_dir holds a checkpoint, replacing it")
    return p


# ----------------------------------------------------------------------------------------------------------------
# Device, dtype and processes: the one place that decides where and how the math runs.


@dataclasses.dataclass
class Runtime:
    device: str  # "cpu", "cuda:3", "mps"
    device_type: str  # "cpu", "cuda", "mps": what autocast and the optimizer ask about
    dtype: torch.dtype  # the autocast dtype; float32 means no autocast
    rank: int = 0
    local_rank: int = 0
    world_size: int = 1
    host_group: object = None  # a gloo process group for small host-side values (see train's stop flag)

    @property
    def ddp(self):
        return self.world_size > 1

    @property
    def master(self):  # only rank 0 prints and writes files
        return self.rank == 0

    def autocast(self):
        if self.dtype == torch.float32:
            return contextlib.nullcontext()
        return torch.autocast(self.device_type, dtype=self.dtype)

    def to_device(self, batch):
        """A loader's (x, y) on the device. To a GPU from pinned memory, without waiting: the copy overlaps the
        previous kernels instead of stalling the host."""
        if self.device_type == "cuda":
            return tuple(t.pin_memory().to(self.device, non_blocking=True) for t in batch)
        return tuple(t.to(self.device) for t in batch)


def cpu_bf16_is_faster():
    """Whether this CPU multiplies bf16 matrices clearly faster than fp32. CPUs with bf16 units (AMX, AVX512-BF16,
    Arm's BF16) run it several times faster; without them PyTorch emulates it, up to 100x slower. Flags don't tell
    reliably across operating systems and architectures, so time it: a few milliseconds, once per run."""
    a = torch.randn(256, 256)

    def seconds(x, budget):
        x @ x  # warm-up
        best = float("inf")
        for _ in range(3):
            t0 = time.perf_counter()
            x @ x
            best = min(best, time.perf_counter() - t0)
            if best > budget:  # already clearly slower: stop early, emulated bf16 is slow
                break
        return best

    fp32 = seconds(a, float("inf"))
    return seconds(a.bfloat16(), fp32) * 1.5 < fp32


def keep_freed_memory():
    """glibc hands each freed block of more than 32 MB back to the operating system, so a training step's large
    tensors (the (rows, vocab) logits and softmax: 200 MB each at 4 x 256 tokens) come back as fresh pages that the
    kernel must fault in and zero, every step: a third of a small model's step on a CPU. Raising malloc's mmap and
    trim thresholds keeps that memory in the process for reuse. Not glibc (macOS, musl): nothing to do."""
    try:
        libc = ctypes.CDLL("libc.so.6")
        M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3
        libc.mallopt(M_MMAP_THRESHOLD, 1 << 30)
        libc.mallopt(M_TRIM_THRESHOLD, (1 << 31) - 1)
    except (OSError, AttributeError):
        pass


def setup_runtime(device="auto", dtype="auto"):
    """Pick the device and autocast dtype, and join the process group when launched by torchrun (RANK is set)."""
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "mps" if torch.backends.mps.is_available() else "cpu"
    if device == "cuda" and not torch.cuda.is_available():
        raise TrainError("--device cuda: no CUDA GPU is visible to PyTorch; use --device cpu")
    if device == "mps" and not torch.backends.mps.is_available():
        raise TrainError("--device mps: MPS is not available on this machine; use --device cpu")
    rt = Runtime(device=device, device_type=device, dtype=torch.float32)
    if device == "cpu":
        keep_freed_memory()
    if "RANK" in os.environ:  # launched by torchrun
        rt.rank, rt.local_rank, rt.world_size = (int(os.environ[k]) for k in ("RANK", "LOCAL_RANK", "WORLD_SIZE"))
        if device == "cuda":
            rt.device = f"cuda:{rt.local_rank}"
            torch.cuda.set_device(rt.device)
        # NCCL moves gradients GPU to GPU; gloo is the backend that works for CPU tensors
        dist.init_process_group(backend="nccl" if device == "cuda" else "gloo")
        rt.host_group = dist.new_group(backend="gloo") if device == "cuda" else dist.group.WORLD
    if device == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True  # fp32 matmuls (outside autocast) on tensor cores
        torch.backends.cudnn.allow_tf32 = True
    if dtype == "auto":
        if device == "cuda":
            dtype = "bfloat16" if torch.cuda.is_bf16_supported() else "float16"
        elif device == "cpu":
            dtype = "bfloat16" if cpu_bf16_is_faster() else "float32"
            if rt.ddp:  # ranks timed separately: agree on bf16 only if all of them found it faster
                vote = torch.tensor([dtype == "bfloat16"], dtype=torch.int32)
                dist.all_reduce(vote, op=dist.ReduceOp.MIN)
                dtype = "bfloat16" if vote.item() else "float32"
        else:
            dtype = "float32"
    rt.dtype = getattr(torch, dtype)
    return rt


# Dense bf16/fp16 tensor-core peaks in FLOP/s, from the vendors' data sheets, matched against the name CUDA reports
# (in this order: "H100 PCIe" before "H100"). MFU is measured against these; other devices and dtypes get a peak
# measured on the spot.
GPU_PEAK_FLOPS = [("H100 PCIe", 756e12), ("H100 NVL", 835e12), ("H100", 989e12), ("H200", 989e12),
                  ("A100", 312e12), ("L40S", 362e12), ("L4", 121e12), ("RTX 4090", 165e12), ("RTX 3090", 71e12),
                  ("V100", 125e12), ("T4", 65e12)]


def peak_flops(rt):
    """The device's peak FLOP/s in the run's dtype: MFU's denominator."""
    if rt.device_type == "cuda" and rt.dtype != torch.float32:
        name = torch.cuda.get_device_name(rt.device)
        for key, flops in GPU_PEAK_FLOPS:
            if key in name:
                return flops
    return measured_matmul_flops(rt)


def measured_matmul_flops(rt):
    """FLOP/s of the largest square matmul that takes ~50 ms (up to 2048 on a CPU, 8192 on a GPU), in the run's
    dtype: what the device really sustains, e.g. a CPU with bf16 units against one that emulates bf16."""
    def sync():
        if rt.device_type == "cuda":
            torch.cuda.synchronize(rt.device)

    n, largest = 256, 2048 if rt.device_type == "cpu" else 8192
    while True:
        a = torch.randn(n, n, device=rt.device).to(rt.dtype)
        out = torch.mm(a, a)  # warm-up; then into the same output, so no allocation is timed
        best = float("inf")
        for _ in range(5):  # the best of five: the peak is what the device can do, not what it did once
            sync()
            t0 = time.perf_counter()
            torch.mm(a, a, out=out)
            sync()
            best = min(best, time.perf_counter() - t0)
        if best > 0.05 or n >= largest:
            return 2 * n**3 / best
        n *= 2


# ----------------------------------------------------------------------------------------------------------------
# Configuration: from flags to a checked model config and batch arithmetic.


def model_config(args):
    if args.model not in PRESETS:
        raise TrainError(f"unknown --model {args.model!r}: choose one of {', '.join(PRESETS)}")
    shape = dict(PRESETS[args.model])
    for name in ("n_layer", "n_head", "n_embd"):
        if getattr(args, name) is not None:
            shape[name] = getattr(args, name)
    try:
        return GPTConfig(**shape, dropout=args.dropout)
    except ValueError as e:
        raise TrainError(f"model shape: {e}")


def check_args(args):
    """Reject options that cannot work, before anything is loaded or written."""
    for name in ("batch_size", "max_steps", "log_interval", "eval_interval", "eval_steps", "save_interval",
                 "hellaswag_interval"):
        if getattr(args, name) <= 0:
            raise TrainError(f"--{name} must be positive, got {getattr(args, name)}")
    for name in ("n_layer", "n_head", "n_embd", "seq_len", "total_batch_size"):
        if getattr(args, name) is not None and getattr(args, name) <= 0:
            raise TrainError(f"--{name} must be positive, got {getattr(args, name)}")
    for name in ("warmup_steps", "sample_tokens"):
        if getattr(args, name) < 0:
            raise TrainError(f"--{name} must not be negative, got {getattr(args, name)}")
    if args.max_lr <= 0 or args.weight_decay < 0 or args.grad_clip < 0:
        raise TrainError("--max_lr must be positive, --weight_decay and --grad_clip not negative")


def batch_geometry(args, cfg, world_size):
    """Fill in seq_len, min_lr and total_batch_size's defaults; return the number of micro-steps per step."""
    if cfg.vocab_size < EOT_TOKEN + 1:
        raise TrainError(f"the model's vocabulary ({cfg.vocab_size} tokens) is smaller than GPT-2's tokenizer's "
                         f"({EOT_TOKEN + 1}): it cannot train on GPT-2 tokens")
    if args.seq_len is None:
        args.seq_len = cfg.block_size
    if args.seq_len > cfg.block_size:
        raise TrainError(f"--seq_len {args.seq_len} is longer than the model's context ({cfg.block_size})")
    if args.min_lr is None:
        args.min_lr = args.max_lr / 10
    tokens_per_micro_step = args.batch_size * args.seq_len * world_size
    if args.total_batch_size is None:
        args.total_batch_size = tokens_per_micro_step
    if args.total_batch_size % tokens_per_micro_step != 0:
        raise TrainError(
            f"--total_batch_size {args.total_batch_size} is not a multiple of batch_size * seq_len * processes = "
            f"{args.batch_size} * {args.seq_len} * {world_size} = {tokens_per_micro_step}"
        )
    return args.total_batch_size // tokens_per_micro_step


def make_loader(args, accum_steps, rt):
    """The loader of --dataset_type. Every loader has get_batch(split, step, micro_step) -> (x, y), y being -100
    where there is nothing to learn, and targets_in_step(split, step): the number of labels in the global batch."""
    loader_class = {"text": TextLoader, "alpaca": AlpacaLoader, "shards": ShardLoader}[args.dataset_type]
    loader = loader_class(args.dataset_path, args.seq_len, args.batch_size, accum_steps,
                          rank=rt.rank, world_size=rt.world_size, seed=args.seed)
    if args.dataset_type == "alpaca" and rt.master:
        print(f"{args.dataset_path}: {loader.n_records} records -> {len(loader.splits['train'])} train, "
              f"{len(loader.splits['val'])} val examples; {loader.n_truncated} responses cut to --seq_len "
              f"{args.seq_len}, {loader.n_dropped} dropped (prompt longer than --seq_len)")
    return loader


def get_lr(step, args):
    """Learning rate for update number `step` (1 to max_steps): linear warmup from 0 at step 0 to max_lr at
    warmup_steps, then cosine decay to min_lr at max_steps."""
    if step < args.warmup_steps:
        return args.max_lr * step / args.warmup_steps
    if step >= args.max_steps:
        return args.min_lr
    progress = (step - args.warmup_steps) / (args.max_steps - args.warmup_steps)
    return args.min_lr + 0.5 * (1.0 + math.cos(math.pi * progress)) * (args.max_lr - args.min_lr)


def configure_optimizer(model, args, device_type):
    # Weight decay pulls weights toward 0: right for matrices and embeddings, which it keeps from growing; wrong for
    # biases and LayerNorm gains, whose scale is meaningful. Those are exactly the 1-D parameters.
    params = [p for p in model.parameters() if p.requires_grad]
    groups = [
        {"params": [p for p in params if p.dim() >= 2], "weight_decay": args.weight_decay},
        {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0},
    ]
    # the fused kernel updates all parameters in a few launches instead of several per tensor
    fused = device_type in ("cuda", "cpu")
    return torch.optim.AdamW(groups, lr=args.max_lr, betas=(args.beta1, args.beta2), fused=fused)


# ----------------------------------------------------------------------------------------------------------------
# Checkpoints and metrics: one save, one load, and one writer.


def save_checkpoint(path, model, optimizer, scaler, step, args):
    """Everything resuming needs. Batches and dropout are functions of (seed, step), so the step is the data
    position and the RNG state. Written to a temporary file and renamed, so a crash never leaves half a checkpoint."""
    state = {
        "model": model.state_dict(),
        "model_config": dataclasses.asdict(model.config),
        "optimizer": optimizer.state_dict(),
        "scaler": scaler.state_dict(),
        "step": step,
        "config": vars(args),
    }
    tmp_path = path + ".tmp"
    torch.save(state, tmp_path)
    os.replace(tmp_path, path)


def load_checkpoint(path, mmap=False):
    """A checkpoint's dict. mmap: map the file instead of reading it, for a look at its config (cheap however big)."""
    if os.path.isdir(path):
        path = os.path.join(path, CHECKPOINT)
    if not os.path.exists(path):
        raise TrainError(f"no checkpoint at {path}: train one first, or check --out_dir")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True, mmap=mmap)
        if not isinstance(ckpt, dict) or not {"model", "model_config", "step", "config"} <= set(ckpt):
            raise ValueError("keys missing")
        return ckpt
    except Exception as e:
        raise TrainError(f"cannot read checkpoint {path} ({type(e).__name__}): it is damaged or not a checkpoint")


def load_model(source, dropout=0.0):
    """The one way to get a trained model, for --init_from and the scripts: from a checkpoint (a ckpt.pt, or the
    out_dir holding one), a Hugging Face GPT-2 directory (config.json + model.safetensors), or a hub name (gpt2,
    gpt2-medium, gpt2-large, gpt2-xl). Returns the GPT in float32 on the CPU."""
    if os.path.isfile(source) or os.path.isfile(os.path.join(source, CHECKPOINT)):
        ckpt = load_checkpoint(source)
        model = GPT(GPTConfig(**{**ckpt["model_config"], "dropout": dropout}))
        model.load_state_dict(ckpt["model"])
        return model
    if os.path.isdir(source) and not os.path.isfile(os.path.join(source, "config.json")):
        raise TrainError(f"{source} holds neither a {CHECKPOINT} nor a Hugging Face config.json: pass a checkpoint, "
                         f"an out_dir, a Hugging Face GPT-2 directory or a hub name ({', '.join(HUB_NAMES)})")
    try:
        return GPT.from_pretrained(source, dropout=dropout)
    except ValueError as e:
        raise TrainError(str(e))


class MetricsLog:
    """metrics.jsonl: one JSON object per log line. On resume, records past the checkpoint's step (logged by the
    interrupted run after its last save) are dropped, so the file reads as one run."""

    def __init__(self, path, resume_step=None):
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
        self.file.write(json.dumps(record) + "\n")
        self.file.flush()


# ----------------------------------------------------------------------------------------------------------------
# The run.


def explicit_flags(parser, argv):
    """The options the user typed, as opposed to defaults: resuming keeps the saved config except where asked."""
    shadow = argparse.ArgumentParser(add_help=False)
    for action in parser._actions:
        if action.option_strings and action.dest != "help":
            shadow.add_argument(*action.option_strings, dest=action.dest, default=argparse.SUPPRESS,
                                **({"action": "store_true"} if action.nargs == 0 else {}))
    return set(vars(shadow.parse_known_args(argv)[0]))


# Options that may change when resuming: they decide how long and how the run goes on, not what it computes.
RESUMABLE_OVERRIDES = {"max_steps", "device", "compile", "log_interval", "eval_interval", "eval_steps",
                       "save_interval", "sample_tokens", "out_dir", "resume", "overwrite", "hellaswag_path",
                       "hellaswag_interval"}


def prepare_resume(args, given):
    ckpt = load_checkpoint(os.path.join(args.out_dir, CHECKPOINT))
    # options added since the checkpoint was written take their defaults
    saved = argparse.Namespace(**{**vars(build_parser().parse_args([])), **ckpt["config"]})
    saved_shape = {k: ckpt["model_config"][k] for k in MODEL_SHAPE}
    if given & {"model", "n_layer", "n_head", "n_embd"}:
        args.seq_len = args.seq_len or saved.seq_len
        asked = dataclasses.asdict(model_config(args))
        asked_shape = {k: asked[k] for k in MODEL_SHAPE}
        if asked_shape != saved_shape:
            raise TrainError(
                f"--resume: the checkpoint in {args.out_dir} is a model of shape {saved_shape}, not the {asked_shape} "
                f"asked for; drop the shape flags to resume it, or use another --out_dir"
            )
    ignored = sorted(given - RESUMABLE_OVERRIDES - {"model", "n_layer", "n_head", "n_embd"})
    if ignored:
        print(f"--resume: keeping the checkpoint's {', '.join(ignored)}", file=sys.stderr)
    for name in given & RESUMABLE_OVERRIDES:
        setattr(saved, name, getattr(args, name))
    saved.out_dir, saved.resume = args.out_dir, True
    if saved.max_steps < ckpt["step"]:
        raise TrainError(f"--max_steps {saved.max_steps} is before the checkpoint's step {ckpt['step']}")
    return saved, ckpt


def main(argv=None):
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        train(args, explicit_flags(parser, sys.argv[1:] if argv is None else argv))
    except (TrainError, DataError) as e:
        if os.environ.get("RANK", "0") == "0":  # under torchrun every rank fails alike: one message is enough
            print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


def train(args, given):
    ckpt = None
    if args.resume:
        args, ckpt = prepare_resume(args, given)
    elif os.path.exists(os.path.join(args.out_dir, CHECKPOINT)) and not args.overwrite:
        raise TrainError(
            f"{args.out_dir} already holds a checkpoint: continue it with --resume, choose another --out_dir, "
            f"or pass --overwrite to replace it"
        )
    world_size = int(os.environ.get("WORLD_SIZE", 1))
    check_args(args)
    init_model = None
    if ckpt is not None:
        cfg = GPTConfig(**ckpt["model_config"])
    elif args.init_from:
        if given & {"model", "n_layer", "n_head", "n_embd"}:
            raise TrainError(f"--init_from takes the model's shape from {args.init_from}: drop --model, --n_layer, "
                             f"--n_head and --n_embd")
        init_model = load_model(args.init_from, dropout=args.dropout)
        cfg = init_model.config
    else:
        cfg = model_config(args)
    accum_steps = batch_geometry(args, cfg, world_size)
    rt = setup_runtime(args.device, args.dtype)
    loader = make_loader(args, accum_steps, rt)
    hellaswag_items = load_hellaswag(args.hellaswag_path) if args.hellaswag_path else None

    torch.manual_seed(args.seed)  # the same initial weights on every rank
    model = (init_model or GPT(cfg)).to(rt.device)
    del init_model
    optimizer = configure_optimizer(model, args, rt.device_type)
    # fp16 has a narrow range: scale the loss up so small gradients don't underflow, and unscale before the step
    scaler = torch.amp.GradScaler(rt.device_type, enabled=rt.dtype == torch.float16)
    start_step = 0
    if ckpt is not None:
        model.load_state_dict(ckpt["model"])
        optimizer.load_state_dict(ckpt["optimizer"])
        scaler.load_state_dict(ckpt["scaler"])
        start_step = ckpt["step"]
        del ckpt
    raw_model = model  # what is saved: never the compiled or DDP-wrapped module
    flops_per_token, device_peak = raw_model.flops_per_token(args.seq_len), None  # for MFU
    if args.compile:
        model = torch.compile(model)
    if rt.ddp:
        # gradients live in DDP's communication buckets: no copy between the two, less memory
        model = DDP(model, device_ids=[rt.local_rank] if rt.device_type == "cuda" else None,
                    gradient_as_bucket_view=True)

    ckpt_path = os.path.join(args.out_dir, CHECKPOINT)
    metrics = None
    if rt.master:
        try:
            os.makedirs(args.out_dir, exist_ok=True)
        except OSError as e:
            raise TrainError(f"cannot create --out_dir {args.out_dir}: {e.strerror}")
        metrics = MetricsLog(os.path.join(args.out_dir, METRICS), start_step if args.resume else None)
        name = f"from {args.init_from}" if args.init_from else args.model
        print(f"model {name}: {raw_model.num_params() / 1e6:.2f}M parameters, {cfg.n_layer} layers, "
              f"{cfg.n_head} heads, {cfg.n_embd} wide | {rt.device} {str(rt.dtype).removeprefix('torch.')} | "
              f"{rt.world_size} process(es) x {accum_steps} micro-step(s) x {args.batch_size} x {args.seq_len} = "
              f"{args.total_batch_size} tokens/step | steps {start_step} -> {args.max_steps}")

    # SIGINT (Ctrl-C) and SIGTERM (a scheduler's notice) finish the current step, save, and exit; a second one
    # gets the default behaviour back, for when the step is too long to wait for.
    stop_signal = []

    def on_signal(signum, frame):
        stop_signal.append(signum)
        signal.signal(signum, previous_handlers[signum])
        if rt.master:
            name = signal.Signals(signum).name
            print(f"\n{name}: saving after this step (send {name} again to quit at once)", flush=True)

    previous_handlers = {s: signal.signal(s, on_signal) for s in (signal.SIGINT, signal.SIGTERM)}

    def all_ranks_mean(t):  # gloo has no AVG: sum, then divide
        return all_ranks_sum(t) / rt.world_size

    def all_ranks_sum(t):
        if rt.ddp:
            dist.all_reduce(t, op=dist.ReduceOp.SUM)
        return t

    def save(step):
        if rt.master:
            save_checkpoint(ckpt_path, raw_model, optimizer, scaler, step, args)

    try:
        last_log_time, last_log_step, tokens_since_log = time.perf_counter(), start_step, 0
        for step in range(start_step + 1, args.max_steps + 1):  # step: the number of this update, 1-based
            lr, loss_sum, grad_norm, tokens = train_step(model, optimizer, scaler, loader, step, accum_steps, rt, args)
            tokens_since_log += tokens

            # Reading the loss back waits for the device; do it only on steps that log, evaluate or save.
            if rt.ddp:  # a signal may reach the ranks at different steps: stop together
                # a CPU tensor over gloo: a GPU tensor would make the host wait for the step's kernels
                flag = torch.tensor([len(stop_signal)], dtype=torch.int32)
                dist.all_reduce(flag, op=dist.ReduceOp.MAX, group=rt.host_group)
                stop_now = bool(flag.item())
            else:
                stop_now = bool(stop_signal)
            last = step == args.max_steps
            do_eval = step % args.eval_interval == 0 or last
            do_save = step % args.save_interval == 0 or last or stop_now
            do_hellaswag = hellaswag_items and (step % args.hellaswag_interval == 0 or last)
            if not (step % args.log_interval == 0 or do_eval or do_save or do_hellaswag):
                continue
            loss_value = all_ranks_mean(loss_sum).item()
            if not math.isfinite(loss_value):
                kept = f"{ckpt_path} still holds the last good checkpoint" if os.path.exists(ckpt_path) else \
                    "no checkpoint was written"
                raise TrainError(f"the training loss became {loss_value} at step {step}; stopped, {kept}. "
                                 f"Try a lower --max_lr, a lower --grad_clip, or --dtype float32")
            now = time.perf_counter()
            seconds_per_step = (now - last_log_time) / (step - last_log_step)
            tokens_per_sec = tokens_since_log / (now - last_log_time)
            if device_peak is None:  # measured once the device is warm, as bench.py does
                device_peak = peak_flops(rt)
                now = time.perf_counter()
            last_log_time, last_log_step, tokens_since_log = now, step, 0
            record = {"step": step, "loss": round(loss_value, 6), "lr": lr, "grad_norm": round(grad_norm.item(), 6),
                      "tokens_per_sec": round(tokens_per_sec, 1),
                      "mfu": round(flops_per_token * tokens_per_sec / (device_peak * rt.world_size), 4)}
            if do_eval:
                val = evaluate(model, loader, rt, args, accum_steps, all_ranks_sum)
                record.update({f"val_{name}": round(value, 6) for name, value in val.items()})
            if do_hellaswag:
                scores = hellaswag_accuracy(raw_model, hellaswag_items, rt, all_ranks_sum)
                record.update({f"hellaswag_{name}": round(value, 6) for name, value in scores.items()})
            if do_eval or "hellaswag_acc" in record:
                last_log_time = time.perf_counter()  # evaluation time is not training speed
            if rt.master:
                metrics.write(record)
                minutes, seconds = divmod(round(seconds_per_step * (args.max_steps - step)), 60)
                val = f" | val {record['val_loss']:.4f} ({record['val_bpb']:.3f} bpb)" if do_eval else ""
                if "hellaswag_acc_norm" in record:
                    val += f" | hellaswag {record['hellaswag_acc_norm']:.4f}"
                print(f"step {step}/{args.max_steps} | loss {loss_value:.4f}{val} | lr {lr:.2e} | "
                      f"norm {record['grad_norm']:.3f} | {tokens_per_sec:,.0f} tok/s | MFU {record['mfu']:.1%} | "
                      f"{seconds_per_step * 1000:.0f} ms/step | {minutes}m{seconds:02d}s left", flush=True)
            if do_save:
                save(step)
            if stop_now and not last:
                if rt.master:
                    print(f"stopped by signal at step {step}; checkpoint saved: continue with --resume", flush=True)
                sys.exit(128 + stop_signal[0] if stop_signal else 1)
    finally:
        for s, handler in previous_handlers.items():
            signal.signal(s, handler)
        if metrics is not None:
            metrics.file.close()

    if rt.master:
        print(f"done: {ckpt_path}")
        if args.sample_tokens > 0:
            print_sample(raw_model, rt, args, loader)


def train_step(model, optimizer, scaler, loader, step, accum_steps, rt, args):
    """One optimizer update, number `step` (1-based): the forward and backward passes of its micro-steps, then
    clipping and the AdamW step. Returns the learning rate, the loss (a device tensor: reading it waits for the
    device), the gradient norm, and the tokens fed (all ranks; padding included). bench.py times exactly this."""
    lr = get_lr(step, args)
    for group in optimizer.param_groups:
        group["lr"] = lr
    # Dropout draws from the global RNG: seeding it from (seed, step, rank) makes it a function of the step too,
    # so a resumed run draws the same masks as an uninterrupted one, and each rank its own.
    torch.manual_seed(int(np.random.SeedSequence([args.seed, step, rt.rank]).generate_state(1)[0]))
    model.train()
    loss_sum = torch.zeros((), device=rt.device)
    # The loss is the mean over every label of the global batch (all micro-steps, all ranks): each micro-batch's
    # mean is weighted by its share of the labels, so padding and prompt lengths don't change an example's weight.
    # DDP averages gradients over ranks, hence the factor world_size.
    labels_in_step = loader.targets_in_step("train", step - 1)
    tokens = 0
    for micro_step in range(accum_steps):
        x, y = rt.to_device(loader.get_batch("train", step - 1, micro_step))
        if rt.ddp:
            # DDP all-reduces gradients during backward; between micro-steps that is wasted traffic, so sync
            # only on the last one. DDP reads the flag in forward, hence set before it.
            model.require_backward_grad_sync = micro_step == accum_steps - 1
        with rt.autocast():
            _, loss = model(x, y)
        loss = loss * ((y != -100).sum() * rt.world_size / labels_in_step)
        loss_sum += loss.detach()
        scaler.scale(loss).backward()
        tokens += x.numel() * rt.world_size
    scaler.unscale_(optimizer)
    # clip_grad_norm_ returns the norm before clipping; with clipping off, an infinite cap only measures it
    grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), args.grad_clip or float("inf"))
    scaler.step(optimizer)
    scaler.update()
    optimizer.zero_grad(set_to_none=True)
    return lr, loss_sum, grad_norm, tokens


def label_losses(model, x, y, rt, byte_lengths):
    """Sums over one batch's labelled tokens: (nats, labels, nats of text tokens, bytes of text tokens). Bits per
    byte leaves out <|endoftext|>, which stands for no text (nanochat's convention): its few positions' losses are
    taken back out of the model's mean loss."""
    with rt.autocast():
        logits, loss = model(x, y)
    y = y.flatten()
    labelled = y != -100
    nats = loss.double() * labelled.sum()
    token_bytes = byte_lengths[y.clamp(min=0)] * labelled
    no_text = labelled & (token_bytes == 0)
    no_text_nats = -F.log_softmax(logits.flatten(0, 1)[no_text].float(), dim=-1).gather(1, y[no_text, None]).sum()
    return torch.stack([nats, labelled.sum(), nats - no_text_nats, token_bytes.sum()])


def loss_metrics(sums):
    """loss (nats per label), perplexity and bits per byte from label_losses' sums, added up."""
    nats, labels, text_nats, text_bytes = sums.tolist()
    loss = nats / labels
    return {"loss": loss, "ppl": math.exp(min(loss, 700)), "bpb": text_nats / math.log(2) / max(text_bytes, 1)}


@torch.no_grad()
def evaluate(model, loader, rt, args, accum_steps, all_ranks_sum):
    """Validation loss per label, perplexity and bits per byte over eval_steps global batches of the validation
    split: the same batches at every evaluation, split like training batches, so the figures do not depend on the
    number of processes or micro-steps. (eval.py covers a whole split.)"""
    model.eval()
    byte_lengths = torch.from_numpy(token_byte_lengths()).to(rt.device)
    sums = torch.zeros(4, device=rt.device, dtype=torch.float64)
    for step in range(args.eval_steps):
        for micro_step in range(accum_steps):
            x, y = rt.to_device(loader.get_batch("val", step, micro_step))
            sums += label_losses(model, x, y, rt, byte_lengths)
    model.train()
    return loss_metrics(all_ranks_sum(sums))


@torch.no_grad()
def hellaswag_accuracy(model, items, rt, all_ranks_sum):
    """HellaSwag as GPT-2 reproductions score it: each ending's tokens are scored by their loss after the context;
    acc picks the ending with the lowest total loss, acc_norm the lowest loss per token (so long endings are not
    penalised for their length). Each rank scores its share of the items."""
    model.eval()
    counts = torch.zeros(3, device=rt.device, dtype=torch.float64)  # items, right by acc, right by acc_norm
    context_size = model.config.block_size + 1  # x and y of the longest row the model takes
    for context, endings, label in items[rt.rank :: rt.world_size]:
        rows = [(context + ending)[-context_size:] for ending in endings]  # too long: drop the context's start
        x = torch.full((len(rows), max(map(len, rows)) - 1), EOT_TOKEN, dtype=torch.long)
        y = torch.full_like(x, -100)
        for i, (row, ending) in enumerate(zip(rows, endings)):
            x[i, : len(row) - 1] = torch.tensor(row[:-1])
            y[i, len(row) - 1 - len(ending) : len(row) - 1] = torch.tensor(ending)
        x, y = rt.to_device((x, y))
        with rt.autocast():
            logits, _ = model(x, y)
        nats = F.cross_entropy(logits.float().transpose(1, 2), y, ignore_index=-100, reduction="none").sum(1)
        lengths = torch.tensor([len(ending) for ending in endings], device=rt.device)
        counts += torch.tensor([1, nats.argmin().item() == label, (nats / lengths).argmin().item() == label],
                               device=rt.device, dtype=torch.float64)
    model.train()
    n, right, right_norm = all_ranks_sum(counts).tolist()
    return {"acc": right / n, "acc_norm": right_norm / n}


def print_sample(model, rt, args, loader):
    """A sample from the trained model: a continuation of "\n", or for Alpaca data the response to the first
    validation example's instruction (greedy, as the answer to a question is judged)."""
    tokenizer = get_tokenizer()
    if args.dataset_type == "alpaca":
        example = loader.examples[loader.splits["val"][0]]
        prompt = example[: loader.n_prompt[loader.splits["val"][0]]].tolist()
        temperature, shown = 0.0, tokenizer.decode(prompt)
    else:
        prompt, temperature, shown = tokenizer.encode_ordinary("\n"), 0.8, ""
    generator = torch.Generator(device=rt.device).manual_seed(args.seed)
    model.eval()
    with rt.autocast():
        out = model.generate(torch.tensor([prompt], device=rt.device), args.sample_tokens, temperature=temperature,
                             top_k=200, generator=generator, stop_token=EOT_TOKEN)
    new_tokens = [t for t in out[0, len(prompt):].tolist() if t != EOT_TOKEN]
    print("-" * 80 + "\n" + (shown + tokenizer.decode(new_tokens)).strip() + "\n" + "-" * 80)


if __name__ == "__main__":
    main()

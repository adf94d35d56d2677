"""
Train a GPT-2 on a text file, Alpaca instruction records or token shards.

    python train.py                                   # a laptop CPU: Tiny Shakespeare (input.txt), a few minutes
    python train.py --model gpt2 --device cuda        # GPT-2 124M on one GPU
    torchrun --standalone --nproc_per_node=8 train.py --model gpt2 --total_batch_size 524288

Everything a run makes goes to --out_dir: ckpt.pt (to --resume from) and metrics.jsonl (one JSON line per log line).
Read it downward: main() -> setup() (options, runtime, data, model) -> train() (the loop) -> train_step() (one
optimizer update). The shared pieces live in their own files: runtime.py (device, dtype, processes), parallel.py
(DDP, FSDP), optim.py (the optimizers), data.py, model.py, checkpoint.py, evaluation.py.
"""

import argparse
import contextlib
import dataclasses
import math
import os
import signal
import sys

import numpy as np
import torch

from checkpoint import (CHECKPOINT, METRICS, MetricsLog, claim_out_dir, load_checkpoint, load_model, save_checkpoint,
                        trained_with)
from cli import (OneLineParser, UserError, add_device_flags, first_line, fraction, non_negative_float, non_negative_int,
                 positive_float, positive_int, print_error)
from data import (EOT_TOKEN, IGNORE_INDEX, LOADERS, DataError, ExampleLoader, Loader, accumulation_steps,
                  get_tokenizer)
from evaluation import evaluate, hellaswag_accuracy, load_hellaswag
from measure import Throughput, device_memory_bytes, memory_estimate
from model import GPT, PRESETS, GPTConfig, preset_config
from optim import MUON_LR_SCALE, local_tensor, optimizer_step
from parallel import build_training, require_grad_sync
from runtime import Runtime, agrees_with_rank0, join_job, setup_runtime, shutdown, signal_on_parent_death
from tracking import Tracking, check_trackers, trackers

DEFAULT_MODEL = "gpt2-micro"
# --max_lr's and --beta2's defaults, by --optimizer: tuned on the default run (README.md, the optimizer). Under Muon
# they are the embeddings' and gains' (AdamW's), which learn best faster, and with a longer memory of their gradients'
# scale, than AdamW alone can take for the whole model.
OPTIMIZER_DEFAULTS = {"adamw": {"max_lr": 2e-3, "beta2": 0.95}, "muon": {"max_lr": 4e-3, "beta2": 0.99}}
# With --init_from the weights are already trained, and the defaults above (a from-scratch schedule) would undo much
# of it in a few steps: fine-tuning's defaults instead, a small constant learning rate as in the classic recipes
# (nanoGPT's finetune config), with the optimizer the weights were trained with (AdamW for OpenAI's). Chosen by
# measurement (README.md, fine-tuning); flags given explicitly win.
FINE_TUNING_DEFAULTS = {"max_lr": 3e-5, "warmup_steps": 0}  # and --min_lr = --max_lr, --optimizer: see above
MODEL_SHAPE = ("n_layer", "n_head", "n_embd", "block_size", "vocab_size")
SHAPE_FLAGS = {"model", "n_layer", "n_head", "n_embd"}
MAX_SKIPPED_STEPS = 5  # updates skipped in a row (their gradient not finite) before the run stops


def build_parser():
    p = OneLineParser(description="Train GPT-2 on a text file.", formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    a = p.add_argument
    a("--dataset_type", default="text", choices=list(LOADERS), help="text: a UTF-8 text file, the "
      "last 10%% held out; alpaca: instruction records in a JSON list or JSONL file, trained on the responses, 5%% "
      "held out; chat: conversations (OpenAI's messages or ShareGPT's conversations) in a JSON list or JSONL file, "
      "trained on the assistant's replies, 5%% held out; shards: a folder of token shards written by prepare.py")
    a("--dataset_path", default="input.txt", help="the dataset file (a folder for shards)")
    a("--model", default=DEFAULT_MODEL, help=f"preset: {', '.join(PRESETS)}")
    a("--init_from", help="start from these weights instead of random ones, taking the model's shape from them: "
      "a checkpoint (out/ckpt.pt or its directory), a Hugging Face GPT-2 directory, or gpt2, gpt2-medium, ... "
      "(downloaded when online). The defaults then become a fine-tuning recipe that keeps what the weights know: "
      "--optimizer as the weights were trained (a checkpoint's; adamw for GPT-2's), "
      + " ".join(f"--{k} {v:g}" for k, v in FINE_TUNING_DEFAULTS.items()) + ", --min_lr = --max_lr (the flags you "
      "give win)")
    a("--n_layer", type=positive_int, help="override the preset's number of layers")
    a("--n_head", type=positive_int, help="override the preset's number of attention heads")
    a("--n_embd", type=positive_int, help="override the preset's width")
    a("--dropout", type=fraction, default=0.0, help="dropout probability")
    a("--batch_size", type=positive_int, default=4, help="sequences (examples, for alpaca and chat) per micro-batch, "
      "per process")
    a("--packing", action=argparse.BooleanOptionalAction, default=True, help="alpaca and chat: put a micro-batch's "
      "examples back to back in rows of --seq_len tokens, each computed as if alone, instead of one padded row each: "
      "the same losses, less padding to compute")
    a("--seq_len", type=positive_int, help="tokens per sequence (default: the model's context); from scratch, a "
      "longer one extends the preset's context to it")
    a("--total_batch_size", type=positive_int, help="tokens per optimizer step, all processes and micro-steps together "
      "(default: batch_size * seq_len * processes, no gradient accumulation)")
    a("--max_steps", type=positive_int, default=320, help="optimizer steps to train for")
    a("--warmup_steps", type=non_negative_int, default=20, help="steps of linear warmup from 0 to max_lr")
    a("--max_lr", type=positive_float, help="peak learning rate (of AdamW's parameters; default: "
      + ", ".join(f"{d['max_lr']:g} with {name}" for name, d in OPTIMIZER_DEFAULTS.items()) + ")")
    a("--min_lr", type=non_negative_float, help="learning rate at max_steps, after cosine decay (default: max_lr / 10; "
      "with --init_from, max_lr: a constant rate)")
    a("--optimizer", default="muon", choices=["adamw", "muon"], help="muon: Muon on the blocks' weight matrices, "
      "AdamW (at --max_lr) on the embeddings, biases and gains; adamw: AdamW on all")
    a("--muon_lr", type=positive_float, help=f"--optimizer muon: the peak learning rate of the Muon group (default: "
      f"{MUON_LR_SCALE:g} x --max_lr); the schedule scales it with --max_lr's")
    a("--muon_momentum", type=fraction, default=0.9, help="--optimizer muon: Muon's momentum")
    a("--weight_decay", type=non_negative_float, default=0.1, help="weight decay, on matrices and embeddings only")
    a("--beta1", type=fraction, default=0.9, help="AdamW beta1")
    a("--beta2", type=fraction, help="AdamW beta2 (default: "
      + ", ".join(f"{d['beta2']:g} with {name}" for name, d in OPTIMIZER_DEFAULTS.items()) + ")")
    a("--grad_clip", type=non_negative_float, default=1.0, help="clip the gradient norm to this (0: no clipping)")
    add_device_flags(p)
    a("--compile", action="store_true", help="torch.compile the model (pays off on long GPU runs)")
    a("--reduce_dtype", default="float32", choices=["float32", "bfloat16"], help="under torchrun, the dtype in which "
      "gradients are all-reduced between processes: bfloat16 halves the traffic (for jobs whose network is the "
      "bottleneck), at some precision")
    a("--fsdp", action=argparse.BooleanOptionalAction, default=False, help="under torchrun, shard the weights, "
      "gradients and optimizer state over the processes (FSDP2) instead of a full copy in each (DDP): for models too "
      "big for one GPU's memory")
    a("--activation_checkpointing", action=argparse.BooleanOptionalAction, default=False, help="recompute each "
      "block's activations in backward instead of keeping them: less memory (a larger --batch_size fits) for about "
      "a third more compute")
    a("--seed", type=int, default=1337, help="seeds the initialisation, the batches and dropout")
    a("--out_dir", default="out", help="where ckpt.pt and metrics.jsonl go")
    a("--log_interval", type=positive_int, default=10, help="log every this many steps")
    a("--eval_interval", type=positive_int, default=50, help="validation loss every this many steps, and at the end")
    a("--eval_steps", type=positive_int, default=10, help="global batches of validation data per evaluation")
    a("--save_interval", type=positive_int, default=200, help="checkpoint every this many steps, and at the end")
    a("--hellaswag_path", help="HellaSwag's hellaswag_val.jsonl, or 'download' (online): its accuracy is logged "
      "every --hellaswag_interval steps and at the end")
    a("--hellaswag_interval", type=positive_int, default=1000, help="steps between HellaSwag evaluations")
    a("--tensorboard", action="store_true", help="also log every record to TensorBoard, under out_dir/tensorboard "
      "(needs the tensorboard package)")
    a("--wandb", metavar="PROJECT", help="also log every record, and the run's flags, to this Weights & Biases "
      "project (needs the wandb package; WANDB_MODE=offline works without a network); --resume continues the run")
    a("--wandb_run_name", help="the W&B run's name (default: the out_dir's name)")
    a("--sample_tokens", type=non_negative_int, default=200, help="length of the sample printed at the end (0: none)")
    a("--resume", action="store_true", help="continue the run in --out_dir from its ckpt.pt, with its saved config")
    a("--overwrite", action="store_true", help="start afresh even if --out_dir holds a checkpoint, replacing it")
    return p


# ----------------------------------------------------------------------------------------------------------------
# Options: checked before anything is loaded or written.


def check_args(args):
    """What the flags' types cannot check alone (each number is checked as the command line is read)."""
    check_trackers(args)
    if args.fsdp and "WORLD_SIZE" not in os.environ:
        raise UserError("--fsdp shards the model over the processes of a torchrun job: launch it with torchrun "
                        "--nproc_per_node=N train.py ... (one process keeps the whole model anyway: drop --fsdp)")


def model_config(args):
    """The preset's shape, with --n_layer, --n_head and --n_embd where given, and a context of at least --seq_len."""
    if args.model not in PRESETS:
        raise UserError(f"unknown --model {args.model!r}: choose one of {', '.join(PRESETS)}")
    try:
        return preset_config(args.model, args.dropout, args.seq_len, n_layer=args.n_layer, n_head=args.n_head,
                             n_embd=args.n_embd)
    except ValueError as e:
        raise UserError(f"model shape: {e}")


def batch_geometry(args, cfg, world_size):
    """Fill in the defaults that depend on other options (seq_len, the optimizer's max_lr and beta2, min_lr,
    total_batch_size); return the number of micro-steps per step."""
    if cfg.vocab_size < EOT_TOKEN + 1:
        raise UserError(f"the model's vocabulary ({cfg.vocab_size} tokens) is smaller than GPT-2's tokenizer's "
                        f"({EOT_TOKEN + 1}): it cannot train on GPT-2 tokens")
    if args.seq_len is None:
        args.seq_len = cfg.block_size
    if args.seq_len > cfg.block_size:
        raise UserError(f"--seq_len {args.seq_len} is longer than the model's context ({cfg.block_size})")
    for name, value in OPTIMIZER_DEFAULTS[args.optimizer].items():
        if getattr(args, name) is None:
            setattr(args, name, value)
    if args.min_lr is None:  # fine-tuning: a constant rate
        args.min_lr = args.max_lr if args.init_from else args.max_lr / 10
    if args.total_batch_size is None:  # no accumulation
        args.total_batch_size = args.batch_size * args.seq_len * world_size
    return accumulation_steps(args.total_batch_size, args.batch_size, args.seq_len, world_size)


def explicit_flags(parser, argv):
    """The options the user typed, as opposed to defaults: resuming keeps the saved config except where asked."""
    shadow = argparse.ArgumentParser(add_help=False)
    for action in parser._actions:
        if action.option_strings and action.dest != "help":
            shadow.add_argument(*action.option_strings, dest=action.dest, default=argparse.SUPPRESS,
                                **({"action": "store_true"} if action.nargs == 0 else {}))
    return set(vars(shadow.parse_known_args(argv)[0]))


# Options that may change when resuming: they decide how long and how the run goes on, not what it computes.
# The device, the dtype and the gradient traffic are the machine's: a run may move to another.
# --batch_size too: a run may resume on another number of processes, the global batch (--total_batch_size) kept.
# --packing changes the speed only.
RESUMABLE_OVERRIDES = {"max_steps", "batch_size", "device", "dtype", "compile", "reduce_dtype", "fsdp",
                       "activation_checkpointing", "packing", "log_interval", "eval_interval", "eval_steps",
                       "save_interval", "sample_tokens", "out_dir", "resume", "overwrite", "hellaswag_path",
                       "hellaswag_interval", "tensorboard", "wandb", "wandb_run_name"}


def prepare_resume(args, given, notes):
    """The checkpoint in --out_dir and the run's saved config, with the options of RESUMABLE_OVERRIDES given now.
    What the user should know is added to notes, printed once every check has passed."""
    path = os.path.join(args.out_dir, CHECKPOINT)
    # Only rank 0 writes the checkpoint, and every rank reads it: on several nodes, --out_dir must be a directory
    # they share (or hold the same copy). Checked by size and modification time, before anyone reads it.
    stat = os.stat(path) if os.path.isfile(path) else None
    if not agrees_with_rank0([stat.st_size, stat.st_mtime_ns] if stat else [-1, -1]):
        raise UserError(f"--resume: {path} is not the same file on every node as on rank 0's (missing, or another "
                        f"copy): put --out_dir on a filesystem all the nodes share, or copy it to every node at the "
                        f"same path keeping its time (cp -p, rsync -t)")
    # memory-mapped: the ranks of a node share one copy of the file in the page cache instead of a copy each
    ckpt = load_checkpoint(path, mmap=True)
    # options added since the checkpoint was written take their defaults
    saved = argparse.Namespace(**{**vars(build_parser().parse_args([])), **ckpt["config"]})
    saved.optimizer = ckpt["config"].get("optimizer", "adamw")  # (checkpoints from before Muon: AdamW's)
    saved_shape = {k: ckpt["model_config"][k] for k in MODEL_SHAPE}
    if given & SHAPE_FLAGS:
        args.seq_len = args.seq_len or saved.seq_len
        asked = dataclasses.asdict(model_config(args))
        asked_shape = {k: asked[k] for k in MODEL_SHAPE}
        if asked_shape != saved_shape:
            raise UserError(
                f"--resume: the checkpoint in {args.out_dir} is a model of shape {saved_shape}, not the {asked_shape} "
                f"asked for; drop the shape flags to resume it, or use another --out_dir"
            )
    if "optimizer" in given and args.optimizer != saved.optimizer:
        raise UserError(f"--resume: the checkpoint in {args.out_dir} was trained with --optimizer {saved.optimizer}, "
                        f"whose state cannot go on as {args.optimizer}'s: drop --optimizer, or start a new run from "
                        f"its weights with --init_from {args.out_dir}")
    ignored = sorted(given - RESUMABLE_OVERRIDES - SHAPE_FLAGS)
    if ignored:
        notes.append(f"--resume: keeping the checkpoint's {', '.join(ignored)}")
    for name in given & RESUMABLE_OVERRIDES:
        setattr(saved, name, getattr(args, name))
    saved.out_dir, saved.resume = args.out_dir, True
    if saved.fsdp and "WORLD_SIZE" not in os.environ and "fsdp" not in given:
        notes.append("--resume: the run was sharded (--fsdp); this one process goes on with the whole model")
        saved.fsdp = False
    step = ckpt["step"]
    if saved.max_steps <= step:
        raise UserError(f"--max_steps {saved.max_steps} is not beyond the checkpoint's step {step}: nothing to "
                        f"train; give a larger --max_steps to go on")
    if saved.max_steps != ckpt["config"]["max_steps"]:  # the cosine decay stretches or shrinks from here on
        before = argparse.Namespace(**{**vars(saved), "max_steps": ckpt["config"]["max_steps"]})
        notes.append(f"--resume: the learning rate now decays to {saved.min_lr:.2e} at step {saved.max_steps} instead "
                     f"of {before.max_steps}: {get_lr(step, before):.2e} at step {step}, {get_lr(step + 1, saved):.2e} "
                     f"at step {step + 1}")
    check_batch_split(saved, int(os.environ.get("WORLD_SIZE", 1)), given)
    return saved, ckpt


def check_batch_split(saved, world_size, given):
    """A run resumes on any number of processes: its global batch (the checkpoint's --total_batch_size, and so the
    data and the losses) stays, and only its split into processes x micro-steps x --batch_size changes. When the
    checkpoint's --batch_size does not split it over world_size processes, say which --batch_size does."""
    rows = saved.total_batch_size // saved.seq_len  # sequences in a global batch
    if rows % (saved.batch_size * world_size) == 0 or "batch_size" in given:
        return  # (a --batch_size given now is checked with the rest of the batch arithmetic)
    fits = [b for b in range(saved.batch_size, 0, -1) if rows % (b * world_size) == 0]
    split = f"the checkpoint's global batch of {rows} sequences of {saved.seq_len} tokens does not split into " \
            f"{world_size} processes x --batch_size {saved.batch_size}"
    if not fits:
        raise UserError(f"--resume on {world_size} processes: {split} at all: resume on a number of processes that "
                        f"divides {rows}")
    raise UserError(f"--resume on {world_size} processes: {split}: pass --batch_size {fits[0]} (the global batch, "
                    f"and so the data and the losses, stay the checkpoint's)")


MEMORY_ADVICE = "lower --batch_size (--total_batch_size keeps the global batch, in more micro-steps), or add " \
                "--activation_checkpointing, or shard the model with --fsdp under torchrun"


def check_memory(cfg, args, rt, accum_steps):
    """Refuse, before anything is allocated, a run whose step clearly cannot fit the device: bench.py's estimate
    (measure.memory_estimate, an upper bound: its parts never all peak at once) over 1.5x the device's memory. A
    CPU would otherwise swap, then be killed without a word; a GPU would fail in its first step."""
    shards = rt.world_size if args.fsdp else 1
    parts = memory_estimate(cfg, args.batch_size * args.seq_len, shards, args.activation_checkpointing,
                            accum_steps > 1, low_precision=rt.dtype != torch.float32)
    need, have = sum(parts.values()), device_memory_bytes(rt)
    if have and need > 1.5 * have:
        largest = max(parts, key=parts.get)
        where = "GPU" if rt.device_type == "cuda" else "process's share of this machine's memory"
        raise UserError(f"a step of --batch_size {args.batch_size} x --seq_len {args.seq_len} needs about "
                        f"{need / 1e9:,.1f} GB ({largest} {parts[largest] / 1e9:,.1f} GB), and the {where} has "
                        f"{have / 1e9:,.1f} GB: {MEMORY_ADVICE}")


# ----------------------------------------------------------------------------------------------------------------
# The run: main -> setup -> train (the loop) -> train_step.


class StopRequested(Exception):
    """Raised by the loop after the checkpoint of a signalled step is saved; main turns it into the exit code."""

    def __init__(self, signum):
        super().__init__(signum)
        self.signum = signum  # None on a rank that was not signalled itself but stops with the others


def main(argv=None):
    parser = build_parser()
    args = parser.parse_args(argv)
    exit_code = 0
    try:
        run_and_sample(args, explicit_flags(parser, sys.argv[1:] if argv is None else argv))
    except (UserError, DataError) as e:
        print_error(e)
        exit_code = 2
    except StopRequested as stop:
        exit_code = 128 + stop.signum if stop.signum else 1
    except torch.OutOfMemoryError as e:  # a GPU's: a CPU's is the kernel's kill, which no process sees
        print_error(f"out of GPU memory ({first_line(e, 120)}): {MEMORY_ADVICE}")
        exit_code = 2
    finally:
        shutdown()  # here, where the run's model and optimizer are gone
    if exit_code:
        sys.exit(exit_code)


def run_and_sample(args, given):
    run = setup(args, given)
    train(run)
    if run.rt.master:
        print(f"done: {run.ckpt_path}")
    if run.args.sample_tokens > 0 and (run.rt.master or run.args.fsdp):  # a sharded model runs on every rank
        print_sample(run)


@dataclasses.dataclass
class Run:
    """What setup makes and the loop uses."""
    args: argparse.Namespace
    rt: Runtime
    loader: Loader
    accum_steps: int  # micro-steps per optimizer step
    model: torch.nn.Module  # what the step calls: compiled and DDP-wrapped when asked
    raw_model: GPT  # what is saved, evaluated on HellaSwag and sampled: the model itself
    optimizer: torch.optim.Optimizer
    scaler: torch.amp.GradScaler
    start_step: int  # the step of the checkpoint resumed, else 0
    hellaswag_items: list  # None: no HellaSwag
    ckpt_path: str
    metrics: Tracking  # metrics.jsonl, and the trackers asked for
    out_dir_lock: object  # rank 0: the open lock file of --out_dir (closing it releases the out_dir); else None


def setup(args, given):
    """Options, then the runtime, the data, the model and its optimizer (restored on --resume), then the out_dir.
    Every check that can fail comes before anything is written."""
    join_job()  # under torchrun, first: a rank that fails must not leave the others waiting for it
    ckpt, notes = None, []  # notes: printed once everything is checked (a refusal is the only line then), by rank 0
    if args.resume:
        args, ckpt = prepare_resume(args, given, notes)
    elif os.path.exists(os.path.join(args.out_dir, CHECKPOINT)) and not args.overwrite:
        raise UserError(f"{args.out_dir} already holds a checkpoint: continue it with --resume, choose another "
                        f"--out_dir, or pass --overwrite to replace it")
    check_args(args)
    init_model = None
    if ckpt is not None:
        cfg = GPTConfig(**ckpt["model_config"])
    elif args.init_from:
        if given & SHAPE_FLAGS:
            raise UserError(f"--init_from takes the model's shape from {args.init_from}: drop --model, --n_layer, "
                            f"--n_head and --n_embd")
        recipe = {"optimizer": trained_with(args.init_from), **FINE_TUNING_DEFAULTS}
        fine_tuning = {name: value for name, value in recipe.items() if name not in given}
        vars(args).update(fine_tuning)
        if fine_tuning:
            notes.append("--init_from: fine-tuning defaults " + " ".join(f"--{name} {value}" for name, value in
                                                                      fine_tuning.items()))
        init_model = load_model(args.init_from, dropout=args.dropout)
        cfg = init_model.config
    else:
        cfg = model_config(args)
    accum_steps = batch_geometry(args, cfg, int(os.environ.get("WORLD_SIZE", 1)))
    rt = setup_runtime(args.device, args.dtype)
    check_memory(cfg, args, rt, accum_steps)
    loader = LOADERS[args.dataset_type](args.dataset_path, args.seq_len, args.batch_size, accum_steps,
                                        rank=rt.rank, world_size=rt.world_size, seed=args.seed, packing=args.packing)
    if isinstance(loader, ExampleLoader) and rt.master:
        print(loader.summary())
    hellaswag_items = load_hellaswag(args.hellaswag_path, rt) if args.hellaswag_path else None

    torch.manual_seed(args.seed)  # the same initial weights on every rank
    raw_model = init_model or GPT(cfg)
    model, optimizer, scaler = build_training(raw_model, rt, weight_decay=args.weight_decay, lr=args.max_lr,
                                              betas=(args.beta1, args.beta2), optimizer=args.optimizer,
                                              muon_lr=args.muon_lr, muon_momentum=args.muon_momentum,
                                              compile=args.compile, state=ckpt,
                                              reduce_dtype=args.reduce_dtype, fsdp=args.fsdp,
                                              activation_checkpointing=args.activation_checkpointing)
    start_step = ckpt["step"] if ckpt is not None else 0
    del ckpt, init_model  # the loaded tensors are in the model and optimizer now

    # the out_dir, for this run alone (rank 0 writes; every rank stops if it cannot)
    lock, metrics, error = None, MetricsLog(None), None
    if rt.master:
        try:
            lock = claim_out_dir(args.out_dir)
            metrics = MetricsLog(os.path.join(args.out_dir, METRICS), start_step if args.resume else None)
        except UserError as e:
            error = e
            if lock is not None:
                lock.close()
    if rt.any_rank(error is not None):
        raise error or UserError(f"rank 0 cannot use --out_dir {args.out_dir} (its message says why)")
    if rt.master:
        for note in notes:
            print(note, file=sys.stderr)
        metrics = Tracking(metrics, trackers(args, start_step if args.resume else None))  # TensorBoard, W&B
        name = f"from {args.init_from}" if args.init_from else args.model
        print(f"model {name}: {raw_model.num_params() / 1e6:.2f}M parameters, {cfg.n_layer} layers, "
              f"{cfg.n_head} heads, {cfg.n_embd} wide | {rt.device} {str(rt.dtype).removeprefix('torch.')} | "
              f"{rt.world_size} process(es) x {accum_steps} micro-step(s) x {args.batch_size} x {args.seq_len} = "
              f"{args.total_batch_size} tokens/step | steps {start_step} -> {args.max_steps}")
    return Run(args, rt, loader, accum_steps, model, raw_model, optimizer, scaler, start_step, hellaswag_items,
               os.path.join(args.out_dir, CHECKPOINT), metrics, lock)


def train(run):
    """The loop: a step, then what the step is due for: stopping on a signal, logging, evaluation, a checkpoint."""
    args, rt = run.args, run.rt
    speed = Throughput(run.raw_model.flops_per_token(args.seq_len), rt, run.start_step)
    # updates skipped (their gradient not finite) in a row, and since the last log: on the device, read when logging
    in_a_row = since_log = torch.zeros((), device=rt.device)
    saved_step = run.start_step if args.resume else None  # the step ckpt.pt holds
    with run.out_dir_lock or contextlib.nullcontext(), run.metrics, StopSignal(rt, run.ckpt_path) as stop_signal:
        for step in range(run.start_step + 1, args.max_steps + 1):  # step: the number of this update, 1-based
            # ---- the step
            lr, loss_sum, grad_norm, tokens, skipped = train_step(run.model, run.optimizer, run.scaler, run.loader,
                                                                  step, run.accum_steps, rt, args)
            speed.count(tokens)
            in_a_row, since_log = (in_a_row + skipped) * skipped, since_log + skipped

            # ---- what this step is due for; a signal may reach the ranks at different steps: they stop together.
            # After a signal only the checkpoint: under torchrun the processes are killed a set time after the
            # signal (README.md, stopping), and a long evaluation would leave too little of it for the save.
            stop = stop_signal.requested()
            last = step == args.max_steps
            do_eval = (step % args.eval_interval == 0 or last) and not stop
            do_save = step % args.save_interval == 0 or last or stop
            do_hellaswag = run.hellaswag_items and (step % args.hellaswag_interval == 0 or last) and not stop
            if not (step % args.log_interval == 0 or do_eval or do_save or do_hellaswag):
                continue  # reading the loss back waits for the device: only on steps that log, evaluate or save

            # ---- logging (a step whose loss, gradient or weights are not finite stops the run: see kept_checkpoint)
            kept = kept_checkpoint(run.ckpt_path, saved_step)
            report_skipped_updates(int(since_log.item()), int(in_a_row.item()), step, kept, rt)
            since_log = torch.zeros_like(since_log)
            loss = rt.all_reduce_mean(loss_sum).item()
            if not math.isfinite(loss):
                raise UserError(f"the training loss became {loss} at step {step}; stopped, {kept}. Try a lower "
                                f"--max_lr, a lower --grad_clip, or --dtype float32")
            record = {"step": step, "loss": round(loss, 6), "lr": lr, "grad_norm": round(grad_norm.item(), 6),
                      **speed.read(step)}

            # ---- evaluation
            if do_eval:
                val = evaluate(run.model, validation_batches(run.loader, args.eval_steps, run.accum_steps), rt)
                record.update({f"val_{name}": round(val[name], 6) for name in ("loss", "ppl", "bpb")})
            if do_hellaswag:
                scores = hellaswag_accuracy(run.raw_model, run.hellaswag_items, rt)
                record.update({f"hellaswag_{name}": round(value, 6) for name, value in scores.items()})
            if do_eval or do_hellaswag:
                speed.restart(step)  # evaluation time is not training speed
            run.metrics.write(record)
            if rt.master:
                print(log_line(record, args.max_steps, speed.seconds_per_step), flush=True)

            # ---- checkpoint (every rank: a sharded model is gathered first; rank 0 writes). Never one of weights
            # that are not finite: ckpt.pt keeps the last good one
            if do_save:
                if not weights_are_finite(run.raw_model, rt):
                    raise UserError(f"the weights are not finite at step {step}; not saved, stopped, {kept}. Try a "
                                    f"lower --max_lr or --dtype float32")
                save_checkpoint(run.ckpt_path, run.raw_model, run.optimizer, run.scaler, step, args, write=rt.master)
                saved_step = step
            if stop:
                if rt.master:
                    print(f"stopped by signal at step {step}; checkpoint saved: continue with --resume", flush=True)
                raise StopRequested(stop_signal.signum)


def train_step(model, optimizer, scaler, loader, step, accum_steps, rt, args):
    """One optimizer update, number `step` (1-based): the forward and backward passes of its micro-steps, then
    clipping and the optimizer's step. Returns the learning rate, the loss (a device tensor: reading it waits for the
    device), the gradient norm, the tokens fed (this rank's times the ranks: packed rows differ a little from rank
    to rank; padding included), and `skipped`: 1.0 if the update was not applied, its gradient not finite (a device
    tensor too)."""
    lr = get_lr(step, args)
    for group in optimizer.param_groups:
        # Muon's group runs at its own multiple of --max_lr (checkpoints from before --optimizer have no lr_scale)
        group["lr"] = lr * group.get("lr_scale", 1.0)
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
        # (batch_size, seq_len) each; positions None, or where the examples of a packed batch start (data.py)
        x, y, positions = rt.to_device(loader.get_batch("train", step - 1, micro_step))
        require_grad_sync(model, micro_step == accum_steps - 1)  # DDP: all-reduce on the last micro-step only
        with rt.autocast():
            loss = model(x, y, positions=positions)[1]  # the logits are not kept: they would outlive the step
        loss = loss * ((y != IGNORE_INDEX).sum() * rt.world_size / labels_in_step)
        loss_sum += loss.detach()
        scaler.scale(loss).backward()
        tokens += x.numel() * rt.world_size
    grad_norm, skipped = optimizer_step(model, optimizer, scaler, args.grad_clip)
    return lr, loss_sum, grad_norm, tokens, skipped


def get_lr(step, args):
    """Learning rate for update number `step` (1 to max_steps): linear warmup from 0 at step 0 to max_lr at
    warmup_steps, then cosine decay to min_lr at max_steps."""
    if step < args.warmup_steps:
        return args.max_lr * step / args.warmup_steps
    if step >= args.max_steps:
        return args.min_lr
    progress = (step - args.warmup_steps) / (args.max_steps - args.warmup_steps)
    return args.min_lr + 0.5 * (1.0 + math.cos(math.pi * progress)) * (args.max_lr - args.min_lr)


# ----------------------------------------------------------------------------------------------------------------
# The loop's helpers.


def validation_batches(loader, eval_steps, accum_steps):
    """The first eval_steps global batches of the validation split, split like training batches: the same batches
    at every evaluation, and figures that do not depend on the number of processes or micro-steps."""
    for step in range(eval_steps):
        for micro_step in range(accum_steps):
            yield loader.get_batch("val", step, micro_step)


class StopSignal:
    """SIGINT (Ctrl-C) and SIGTERM (a scheduler's notice) ask the run to finish the current step, save, and stop. A
    second one, for when that is too long to wait for, ends the process at once (exit 128 + the signal's number)
    without saving: ckpt.pt keeps the last checkpoint saved, since a save it interrupts is a temporary file that never
    became ckpt.pt. Under torchrun the launcher's death counts as a SIGTERM: a worker whose launcher was killed (kill
    -9, a closed terminal) saves and stops, instead of training on as an orphan that holds the out_dir. The handlers
    are installed for the `with` block only."""

    def __init__(self, rt, ckpt_path):
        self.rt, self.ckpt_path, self.signum = rt, ckpt_path, None
        self.launcher = os.getppid() if "TORCHELASTIC_RUN_ID" in os.environ else None  # (set by torchrun)

    def __enter__(self):
        self.previous = {s: signal.signal(s, self.on_signal) for s in (signal.SIGINT, signal.SIGTERM)}
        if self.launcher is not None:
            # a signal of its own: the kernel may deliver it more than once, and it must never count as a second
            self.previous[signal.SIGUSR1] = signal.signal(signal.SIGUSR1, self.on_launcher_death)
            signal_on_parent_death(signal.SIGUSR1)
        return self

    def __exit__(self, *exc):
        if self.launcher is not None:
            signal_on_parent_death(0)  # (0: none) past the loop, the launcher's death no longer asks for a save
        for s, handler in self.previous.items():
            signal.signal(s, handler)

    def on_signal(self, signum, frame):
        name = signal.Signals(signum).name
        if self.signum is not None:
            if self.rt.master:
                kept = f"{self.ckpt_path} holds the last checkpoint saved" if os.path.exists(self.ckpt_path) \
                    else "no checkpoint was saved"
                print(f"\nerror: {name} again: stopped at once, without saving; {kept}", file=sys.stderr)
            sys.stdout.flush()
            sys.stderr.flush()
            os._exit(128 + signum)  # no cleanup that could block: the OS releases the out_dir's lock
        self.signum = signum
        if self.rt.master:
            print(f"\n{name}: saving after this step (send {name} again to quit at once)", flush=True)

    def on_launcher_death(self, signum, frame):
        self.signum = self.signum or signal.SIGTERM  # as if the launcher had passed on a SIGTERM

    def requested(self):
        """Whether any rank has been signalled: under torchrun the ranks agree, so they all stop after this step."""
        if self.signum is None and self.launcher is not None and os.getppid() != self.launcher:
            self.signum = signal.SIGTERM  # the launcher is gone (where no parent-death signal came)
        return self.rt.any_rank(self.signum is not None)


def report_skipped_updates(since_log, in_a_row, step, kept, rt):
    """A note for the updates skipped since the last log (their gradient not finite: optim.optimizer_step), and the
    run's stop when MAX_SKIPPED_STEPS were skipped in a row. fp16's loss scaling skips a few while it finds its
    level: those are not noted."""
    if since_log and rt.master and rt.dtype != torch.float16:
        print(f"step {step}: {since_log} update(s) skipped since the last log, their gradient not finite",
              file=sys.stderr)
    if in_a_row >= MAX_SKIPPED_STEPS:
        raise UserError(f"the gradient was not finite for {in_a_row} steps in a row (to step {step}), their updates "
                        f"skipped; stopped, {kept}. Try a lower --max_lr, a lower --grad_clip, or --dtype float32")


def kept_checkpoint(path, step):
    """What is left when a run stops on a non-finite loss, gradient or weights: its last checkpoint, of `step` (None:
    none yet), which is good (none with non-finite weights is ever written)."""
    if step is not None:
        return f"{path} still holds the last good checkpoint, of step {step}"
    if os.path.exists(path):  # (--overwrite: the previous run's)
        return f"{path} still holds the last good checkpoint, the one it held before this run"
    return "no checkpoint was written"


def weights_are_finite(model, rt):
    """Whether every weight is finite, on every rank (each checks its own shards under FSDP): one pass over the
    weights, before each save."""
    finite = torch.stack([torch.isfinite(local_tensor(p)).all() for p in model.parameters()]).all()
    return not rt.any_rank(not finite.item())


def log_line(record, max_steps, seconds_per_step):
    minutes, seconds = divmod(round(seconds_per_step * (max_steps - record["step"])), 60)
    val = f" | val {record['val_loss']:.4f} ({record['val_bpb']:.3f} bpb)" if "val_loss" in record else ""
    if "hellaswag_acc_norm" in record:
        val += f" | hellaswag {record['hellaswag_acc_norm']:.4f}"
    return (f"step {record['step']}/{max_steps} | loss {record['loss']:.4f}{val} | lr {record['lr']:.2e} | "
            f"norm {record['grad_norm']:.3f} | {record['tokens_per_sec']:,.0f} tok/s | MFU {record['mfu']:.1%} | "
            f"{seconds_per_step * 1000:.0f} ms/step | {minutes}m{seconds:02d}s left")


def print_sample(run):
    """A sample from the trained model: a continuation of "\n", or for Alpaca and chat data the reply to the first
    validation example's prompt (greedy, as the answer to a question is judged)."""
    model, rt, args, loader = run.raw_model, run.rt, run.args, run.loader
    tokenizer = get_tokenizer()
    if isinstance(loader, ExampleLoader):
        prompt = loader.prompt(loader.splits["val"][0])
        temperature, shown = 0.0, tokenizer.decode([t for t in prompt if t != EOT_TOKEN])
    else:
        prompt, temperature, shown = tokenizer.encode_ordinary("\n"), 0.8, ""
    generator = torch.Generator(device=rt.device).manual_seed(args.seed)
    model.eval()
    with rt.autocast():
        out = model.generate(torch.tensor([prompt], device=rt.device), args.sample_tokens, temperature=temperature,
                             top_k=200, generator=generator, stop_token=EOT_TOKEN)
    new_tokens = [t for t in out[0, len(prompt):].tolist() if t != EOT_TOKEN]
    if rt.master:
        print("-" * 80 + "\n" + (shown + tokenizer.decode(new_tokens)).strip() + "\n" + "-" * 80)


if __name__ == "__main__":
    main()

"""
train.py's options: its flags, in groups that bench.py and eval.py share (one definition, so each --help describes a
flag alike), and resolve(), from a command line to the run's options with every default filled in and every check
that needs no device passed, before anything is built: milliseconds, no training, so that tests call it directly.

    opts = resolve(argv, world_size)            # world_size: the processes of a torchrun job (None: no torchrun)
    opts.args, opts.cfg, opts.accum_steps       # the options, the model's shape, micro-steps per optimizer step
    opts.ckpt, opts.init_model, opts.notes      # --resume's checkpoint, --init_from's model, notes to print
    loader = make_loader(opts.args, opts.accum_steps, rank, world_size)

A default can come from the flag given, a checkpoint resumed, fine-tuning, the optimizer or argparse: DEFAULTS shows
them side by side, with the rule of precedence.
"""

import argparse
import dataclasses
import os

import lora
from checkpoint import CHECKPOINT, load_base, load_checkpoint, load_model, trained_with
from cli import (HelpFormatter, OneLineParser, UserError, add_device_flags, fraction, non_negative_float,
                 non_negative_int, positive_float, positive_int, seed)
from data import LOADERS, accumulation_steps
from tokenizer import EOT_TOKEN
from model import GPT, PRESETS, GPTConfig, preset_config
from optim import MUON_LR_SCALE
from runtime import agrees_with_rank0
from step import get_lr
from tracking import check_trackers

# ----------------------------------------------------------------------------------------------------------------
# Where a default comes from. The rule of precedence, the first source that sets an option deciding it:
#
#     the flags given  >  --resume: the checkpoint's config  >  --lora_rank: LoRA's  >  --init_from: fine-tuning's
#     >  the optimizer's  >  argparse's
#
# --resume takes every option from the checkpoint (as resolved when its run began), except those of RESUMABLE given
# now. The other sources, for the options they set (every other option has argparse's default alone, at its flag):
TRAINED_WITH = "the weights' optimizer"  # checkpoint.trained_with: a checkpoint's --optimizer; adamw for GPT-2's
SAME_AS_MAX_LR = "--max_lr"  # a constant learning rate
DEFAULTS = {
    # option         argparse's           --optimizer adamw, muon        --init_from: fine-tuning's  --lora_rank: LoRA's
    "optimizer":    {"argparse": "muon",                                 "fine-tuning": TRAINED_WITH, "lora": "adamw"},
    "max_lr":       {"argparse": None,    "adamw": 2e-3, "muon": 4e-3,   "fine-tuning": 3e-5,         "lora": 3e-3},
    "beta2":        {"argparse": None,    "adamw": 0.95, "muon": 0.99},
    "warmup_steps": {"argparse": 20,                                     "fine-tuning": 0},
    "min_lr":       {"argparse": None,                                   "fine-tuning": SAME_AS_MAX_LR},
    "weight_decay": {"argparse": 0.1,                                                                 "lora": 0.0},
}
# The optimizer's: tuned on the default run (README.md, the optimizer). Under Muon they are the embeddings' and
# gains' (AdamW's), which learn best faster, and with a longer memory of their gradients' scale, than AdamW alone can
# take for the whole model.
# Fine-tuning's: with --init_from the weights are already trained, and a from-scratch schedule would undo much of it
# in a few steps: a small constant learning rate as in the classic recipes (nanoGPT's finetune config), with the
# optimizer the weights were trained with. Chosen by measurement (README.md, fine-tuning).
# LoRA's (--lora_rank, over fine-tuning's where both set one): AdamW, since Muon would orthogonalise the updates of
# lora_A and lora_B, matrices of rank --lora_rank whose low rank is the point; no weight decay on the adapters (PEFT's
# and the LoRA paper's: decay would pull B @ A back to 0, the base); a learning rate 100x fine-tuning's, since only
# the small adapters move and B starts at 0: the best of 1e-4, 3e-4, 1e-3, 3e-3 and 1e-2 (README.md, LoRA).
# What is still None after every source is derived from the other options: --min_lr = --max_lr / 10
# (derive_defaults); --seq_len = the model's context, --total_batch_size = batch_size * seq_len * processes, no
# accumulation (batch_geometry); --muon_lr = MUON_LR_SCALE x --max_lr (optim.build_optimizer).

DEFAULT_MODEL = "gpt2-micro"
MODEL_SHAPE = ("n_layer", "n_head", "n_embd", "block_size", "vocab_size")
SHAPE_FLAGS = {"model", "n_layer", "n_head", "n_embd"}

# Options that may change when resuming: they decide how long and how the run goes on, not what it computes.
# The device, the dtype and the gradient traffic are the machine's: a run may move to another.
# --batch_size too: a run may resume on another number of processes, the global batch (--total_batch_size) kept.
# --packing changes the speed only.
RESUMABLE = {"max_steps", "batch_size", "device", "dtype", "compile", "reduce_dtype", "fsdp",
             "activation_checkpointing", "packing", "log_interval", "eval_interval", "eval_steps", "save_interval",
             "sample_tokens", "out_dir", "resume", "overwrite", "hellaswag_path", "hellaswag_interval", "tensorboard",
             "wandb", "wandb_run_name"}


LORA_FLAGS = ("lora_rank", "lora_alpha", "lora_dropout", "lora_targets")  # what the adapters compute: fixed on resume


def by_optimizer(name):
    return ", ".join(f"{DEFAULTS[name][optimizer]:g} with {optimizer}" for optimizer in ("adamw", "muon"))


# ----------------------------------------------------------------------------------------------------------------
# The flags, in groups: train.py takes them all, bench.py the model, data, batch and step groups, eval.py the data.


def add_model_flags(p):
    g = p.add_argument_group("model")
    g.add_argument("--model", default=DEFAULT_MODEL, help=f"preset: {', '.join(PRESETS)}")
    g.add_argument("--n_layer", type=positive_int, help="override the preset's number of layers")
    g.add_argument("--n_head", type=positive_int, help="override the preset's number of attention heads")
    g.add_argument("--n_embd", type=positive_int, help="override the preset's width")
    g.add_argument("--dropout", type=fraction, default=0.0, help="dropout probability")
    return g


def add_data_flags(p):
    g = p.add_argument_group("data")
    g.add_argument("--dataset_type", default="text", choices=list(LOADERS), help="text: a UTF-8 text file, the last "
                   "10%% held out; alpaca: instruction records in a JSON list or JSONL file, trained on the responses, "
                   "5%% held out; chat: conversations (OpenAI's messages or ShareGPT's conversations) in a JSON list "
                   "or JSONL file, trained on the assistant's replies, 5%% held out; shards: a folder of token shards "
                   "written by prepare.py")
    g.add_argument("--dataset_path", default="input.txt", help="the dataset file (a folder for shards)")
    g.add_argument("--packing", action=argparse.BooleanOptionalAction, default=True, help="alpaca and chat: put a "
                   "micro-batch's examples back to back in rows of --seq_len tokens, each computed as if alone, "
                   "instead of one padded row each: the same losses, less padding to compute")
    return g


def add_lora_flags(p):
    """LoRA (lora.py): train.py's and bench.py's."""
    g = p.add_argument_group("LoRA: fine-tuning low-rank adapters instead of the weights")
    g.add_argument("--lora_rank", type=non_negative_int, default=0, help="train a LoRA adapter of this rank on each "
                   "projection of --lora_targets, the model's own weights frozen (kept in the run's dtype: bf16 halves "
                   "them); 0: off. Then --optimizer adamw --max_lr "
                   f"{DEFAULTS['max_lr']['lora']:g} --weight_decay 0 unless given (LoRA's recipe); checkpoints hold "
                   "the adapters, with what identifies the base weights (--init_from's) they go on")
    g.add_argument("--lora_alpha", type=positive_float, help="the adapters' output is scaled by alpha / rank "
                   "(default: 2 x --lora_rank, a scale of 2)")
    g.add_argument("--lora_dropout", type=fraction, default=0.0, help="dropout on the adapters' input")
    g.add_argument("--lora_targets", default="all", help="the projections adapted, comma-separated: all, attn, mlp, "
                   "attn.c_attn, attn.c_proj, mlp.c_fc, mlp.c_proj (or c_attn, c_fc, c_proj, as PEFT names them)")
    return g


def add_batch_flags(p):
    g = p.add_argument_group("batch")
    g.add_argument("--batch_size", type=positive_int, default=4, help="sequences (examples, for alpaca and chat) per "
                   "micro-batch, per process")
    g.add_argument("--seq_len", type=positive_int, help="tokens per sequence (default: the model's context); from "
                   "scratch, a longer one extends the preset's context to it")
    g.add_argument("--total_batch_size", type=positive_int, help="tokens per optimizer step, all processes and "
                   "micro-steps together (default: batch_size * seq_len * processes, no gradient accumulation)")
    return g


def add_step_flags(p):
    """How a training step runs: the optimizer, and how the model is compiled, spread over processes and seeded."""
    g = p.add_argument_group("step")
    g.add_argument("--optimizer", default=DEFAULTS["optimizer"]["argparse"], choices=["adamw", "muon"],
                   help="muon: Muon on the blocks' weight matrices, AdamW (at --max_lr) on the embeddings, biases and "
                   "gains; adamw: AdamW on all")
    g.add_argument("--compile", action="store_true", help="torch.compile the model (pays off on long GPU runs)")
    g.add_argument("--reduce_dtype", default="float32", choices=["float32", "bfloat16"], help="under torchrun, the "
                   "dtype in which gradients are all-reduced between processes: bfloat16 halves the traffic (for jobs "
                   "whose network is the bottleneck), at some precision")
    g.add_argument("--fsdp", action=argparse.BooleanOptionalAction, default=False, help="under torchrun, shard the "
                   "weights, gradients and optimizer state over the processes (FSDP2) instead of a full copy in each "
                   "(DDP): for models too big for one GPU's memory")
    g.add_argument("--activation_checkpointing", action=argparse.BooleanOptionalAction, default=False,
                   help="recompute each block's activations in backward instead of keeping them: less memory (a "
                   "larger --batch_size fits) for about a third more compute")
    g.add_argument("--seed", type=seed, default=1337, help="seeds the initialisation, the batches and dropout")
    return g


def add_schedule_flags(p):
    """The schedule and the optimizer's settings: train.py's alone (they do not change what a step costs)."""
    g = p.add_argument_group("schedule and optimizer")
    a = g.add_argument
    a("--max_steps", type=positive_int, default=320, help="optimizer steps to train for")
    a("--warmup_steps", type=non_negative_int, default=DEFAULTS["warmup_steps"]["argparse"],
      help="steps of linear warmup from 0 to max_lr")
    a("--max_lr", type=positive_float, default=DEFAULTS["max_lr"]["argparse"], help="peak learning rate (of AdamW's "
      f"parameters; default: {by_optimizer('max_lr')})")
    a("--min_lr", type=non_negative_float, default=DEFAULTS["min_lr"]["argparse"], help="learning rate at max_steps, "
      "after cosine decay (default: max_lr / 10; with --init_from, max_lr: a constant rate)")
    a("--muon_lr", type=positive_float, help=f"--optimizer muon: the peak learning rate of the Muon group (default: "
      f"{MUON_LR_SCALE:g} x --max_lr); the schedule scales it with --max_lr's")
    a("--muon_momentum", type=fraction, default=0.9, help="--optimizer muon: Muon's momentum")
    a("--weight_decay", type=non_negative_float, default=DEFAULTS["weight_decay"]["argparse"], help="weight decay, on "
      "matrices and embeddings only (with --lora_rank, 0 unless given)")
    a("--beta1", type=fraction, default=0.9, help="AdamW beta1")
    a("--beta2", type=fraction, default=DEFAULTS["beta2"]["argparse"],
      help=f"AdamW beta2 (default: {by_optimizer('beta2')})")
    a("--grad_clip", type=non_negative_float, default=1.0, help="clip the gradient norm to this (0: no clipping)")
    return g


def build_parser():
    p = OneLineParser(description="Train GPT-2 on a text file, Alpaca instruction records, chat conversations or "
                      "token shards (prepare.py's), from scratch or from trained weights (--init_from).",
                      formatter_class=HelpFormatter)
    add_data_flags(p)
    model = add_model_flags(p)
    fine_tuning = " ".join(f"--{name} {row['fine-tuning']:g}" for name, row in DEFAULTS.items()
                           if isinstance(row.get("fine-tuning"), (int, float)))
    model.add_argument("--init_from", help="start from these weights instead of random ones, taking the model's shape "
                       "from them: a checkpoint (out/ckpt.pt or its directory), a Hugging Face GPT-2 directory, or "
                       "gpt2, gpt2-medium, ... (downloaded when online). The defaults then become a fine-tuning recipe "
                       "that keeps what the weights know: --optimizer as the weights were trained (a checkpoint's; "
                       f"adamw for GPT-2's), {fine_tuning}, --min_lr = --max_lr (the flags you give win)")
    add_lora_flags(p)
    add_batch_flags(p)
    add_step_flags(p)
    add_schedule_flags(p)
    add_device_flags(p.add_argument_group("device"))
    a = p.add_argument_group("the run: output, evaluation, tracking").add_argument
    a("--out_dir", default="out", help="where ckpt.pt and metrics.jsonl go")
    a("--log_interval", type=positive_int, default=10, help="log every this many steps")
    a("--eval_interval", type=positive_int, default=50, help="validation loss every this many steps, and at the end")
    a("--eval_steps", type=positive_int, default=10, help="global batches of validation data per evaluation")
    a("--save_interval", type=positive_int, default=200, help="checkpoint every this many steps, and at the end")
    a("--hellaswag_path", help="HellaSwag's hellaswag_val.jsonl, or 'download' (online): its accuracy is logged "
      "every --hellaswag_interval steps and at the end")
    a("--hellaswag_interval", type=positive_int, default=1000, help="steps between HellaSwag evaluations")
    a("--tensorboard", action=argparse.BooleanOptionalAction, default=False, help="also log every record to "
      "TensorBoard, under out_dir/tensorboard (needs the tensorboard package); --no-tensorboard stops it on --resume")
    a("--wandb", metavar="PROJECT", help="also log every record, and the run's flags, to this Weights & Biases "
      "project (needs the wandb package; WANDB_MODE=offline works without a network); --resume continues the run")
    a("--wandb_run_name", help="the W&B run's name (default: the out_dir's name)")
    a("--sample_tokens", type=non_negative_int, default=200, help="length of the sample printed at the end (0: none)")
    a("--resume", action="store_true", help="continue the run in --out_dir from its ckpt.pt, with its saved config")
    a("--overwrite", action="store_true", help="start afresh even if --out_dir holds a checkpoint, replacing it")
    return p


def given_flags(parser, argv):
    """The options given in argv, as opposed to left at their defaults: argv parsed again, into a namespace that
    holds a marker for every option. argparse fills in a default only where the namespace has no value, so only the
    flags given (a value, store_true's, --x or --no-x) replace their marker."""
    unset = object()
    namespace = argparse.Namespace(**dict.fromkeys(vars(parser.parse_args([])), unset))
    return {name for name, value in vars(parser.parse_args(argv, namespace)).items() if value is not unset}


# ----------------------------------------------------------------------------------------------------------------
# resolve: the command line to the run's options. Checked before anything is loaded or written.


@dataclasses.dataclass
class Resolved:
    """A command line, resolved."""
    args: argparse.Namespace  # every option, its default filled in
    given: set  # the names of the options given on the command line
    cfg: GPTConfig  # the model's shape
    accum_steps: int  # micro-steps per optimizer step
    notes: list  # what the user should know: train.py prints them once the run is set up (a refusal is one line)
    ckpt: dict = None  # --resume: the checkpoint (memory-mapped), whose model and optimizer the run restores
    init_model: GPT = None  # --init_from: the model, its weights loaded; --resume of a LoRA run: its base, checked


def resolve(argv, world_size=None, load_weights=load_model):
    """The run's options from its command line (argv, the program's name left out): the flags parsed, then every
    default filled in by the rule of precedence (DEFAULTS), and every check that needs no device passed; else a
    UserError or data.DataError of one line (a bad flag: argparse's one line and exit 2). world_size: the
    processes of the torchrun job (None: not launched by torchrun, one process). --resume reads the checkpoint in
    --out_dir. --init_from: load_weights(source, dropout=...) loads the weights, whose config gives the shape (tests
    pass a stand-in: the defaults are resolved before it is called)."""
    parser = build_parser()
    args = parser.parse_args(argv)
    given = given_flags(parser, argv)
    notes, ckpt, init_model = [], None, None
    if args.resume:
        args, ckpt = resumed(parser, args, given, notes, world_size)
    elif os.path.exists(os.path.join(args.out_dir, CHECKPOINT)) and not args.overwrite:
        raise UserError(f"{args.out_dir} already holds a checkpoint: continue it with --resume (and a larger "
                        f"--max_steps, if its run finished), choose another --out_dir, or pass --overwrite to "
                        f"replace it")
    check_args(args, given, world_size)
    if ckpt is not None:
        cfg = GPTConfig(**ckpt["model_config"])
        if "lora" in ckpt:
            init_model = load_base(ckpt["lora"], ckpt["model_config"], os.path.join(args.out_dir, CHECKPOINT),
                                   args.dropout)
    elif args.init_from:
        if given & SHAPE_FLAGS:
            raise UserError(f"--init_from takes the model's shape from {args.init_from}: drop --model, --n_layer, "
                            f"--n_head and --n_embd")
        source_defaults(args, given, notes)
        init_model = load_weights(args.init_from, dropout=args.dropout)
        cfg = init_model.config
    else:
        source_defaults(args, given, notes)
        cfg = model_config(args)
    check_lora(args, given, cfg)
    derive_defaults(args)
    check_schedule(args, given)
    accum_steps = batch_geometry(args, cfg, world_size or 1)
    return Resolved(args, given, cfg, accum_steps, notes, ckpt, init_model)


def check_args(args, given, world_size):
    """What the flags' types cannot check alone (each number is checked as the command line is read)."""
    check_trackers(args)
    check_lora(args, given)
    if args.fsdp and world_size is None:
        raise UserError("--fsdp shards the model over the processes of a torchrun job: launch it with torchrun "
                        "--nproc_per_node=N train.py ... (one process keeps the whole model anyway: drop --fsdp)")


def check_lora(args, given, cfg=None):
    """--lora_rank's flags that cannot go together (train.py's and bench.py's); with the model's cfg, the rank too."""
    if not args.lora_rank:
        return
    try:
        lora.parse_targets(args.lora_targets)
    except ValueError as e:
        raise UserError(f"--lora_targets: {e}")
    if args.fsdp:
        raise UserError("--fsdp with --lora_rank: the adapters are megabytes and the frozen base needs no gradients or "
                        "optimizer state, so drop --fsdp and let DDP keep a copy in each process")
    if args.optimizer == "muon" and "optimizer" in given:  # (LoRA's default is adamw)
        raise UserError("--optimizer muon with --lora_rank: Muon would orthogonalise the low-rank adapters' updates; "
                        "drop --optimizer (LoRA's default is adamw)")
    if cfg is not None and args.lora_rank > cfg.n_embd:  # (every projection's smaller side is the model's width)
        raise UserError(f"--lora_rank {args.lora_rank} is larger than the model's width ({cfg.n_embd}), the smaller "
                        f"side of every projection it adapts: choose a rank from 1 to {cfg.n_embd} (8 to 64 is usual)")


def check_schedule(args, given):
    """A schedule given that cannot be what was meant: a warmup that never ends, or a decay that rises. (The default
    warmup is left alone in a short run: `--max_steps 10` is a quick try, not a mistake.)"""
    if "warmup_steps" in given and args.warmup_steps > args.max_steps:
        raise UserError(f"--warmup_steps {args.warmup_steps} is beyond --max_steps {args.max_steps}: the learning rate "
                        f"would never reach --max_lr; lower --warmup_steps or raise --max_steps")
    if args.min_lr > args.max_lr:
        raise UserError(f"--min_lr {args.min_lr:g} is above --max_lr {args.max_lr:g}: the schedule would rise as it "
                        f"decays; lower --min_lr or raise --max_lr")


def source_defaults(args, given, notes):
    """DEFAULTS' LoRA column (--lora_rank), then its fine-tuning column (--init_from), for the options not given: the
    first of the two that sets an option decides it (in the table's order: --min_lr after --max_lr, which it
    follows)."""
    columns = [column for column, on in (("lora", args.lora_rank), ("fine-tuning", args.init_from)) if on]
    chosen = {}
    for name, row in DEFAULTS.items():
        column = next((column for column in columns if column in row), None)
        if column and name not in given:
            value = row[column]
            value = trained_with(args.init_from) if value == TRAINED_WITH else args.max_lr if value == SAME_AS_MAX_LR \
                else value
            setattr(args, name, value)
            chosen[name] = value
    if chosen:
        recipes = " and ".join(f"{flag}: {recipe}" for flag, recipe, on in (
            ("--lora_rank", "LoRA", args.lora_rank), ("--init_from", "fine-tuning", args.init_from)) if on)
        notes.append(f"{recipes} defaults " + " ".join(f"--{name} {value}" for name, value in chosen.items()))


def derive_defaults(args):
    """The optimizer's defaults (DEFAULTS) for the options still None, then --min_lr's from --max_lr."""
    for name, row in DEFAULTS.items():
        if getattr(args, name) is None and args.optimizer in row:
            setattr(args, name, row[args.optimizer])
    if args.min_lr is None:
        args.min_lr = args.max_lr / 10
    if args.lora_rank and args.lora_alpha is None:
        args.lora_alpha = 2.0 * args.lora_rank


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
    """--seq_len's and --total_batch_size's defaults, checked against the model and each other; returns the number
    of micro-steps per step. train.py's and bench.py's."""
    if cfg.vocab_size < EOT_TOKEN + 1:
        raise UserError(f"the model's vocabulary ({cfg.vocab_size} tokens) is smaller than GPT-2's tokenizer's "
                        f"({EOT_TOKEN + 1}): it cannot train on GPT-2 tokens")
    if args.seq_len is None:
        args.seq_len = cfg.block_size
    if args.seq_len > cfg.block_size:
        raise UserError(f"--seq_len {args.seq_len} is longer than the model's context ({cfg.block_size})")
    if args.total_batch_size is None:  # no accumulation
        args.total_batch_size = args.batch_size * args.seq_len * world_size
    return accumulation_steps(args.total_batch_size, args.batch_size, args.seq_len, world_size)


def resumed(parser, args, given, notes, world_size):
    """--resume: the run's saved config, with the options of RESUMABLE given now, and the checkpoint in --out_dir.
    What the user should know is added to notes."""
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
    saved = argparse.Namespace(**{**vars(parser.parse_args([])), **ckpt["config"]})
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
    check_lora_resume(args, saved, given)
    ignored = sorted(given - RESUMABLE - SHAPE_FLAGS)
    if ignored:
        notes.append(f"--resume: keeping the checkpoint's {', '.join(ignored)}")
    for name in given & RESUMABLE:
        setattr(saved, name, getattr(args, name))
    saved.out_dir, saved.resume = args.out_dir, True
    if saved.fsdp and world_size is None and "fsdp" not in given:
        notes.append("--resume: the run was sharded (--fsdp); this one process goes on with the whole model")
        saved.fsdp = False
    step = ckpt["step"]
    if saved.max_steps <= step:
        raise UserError(f"the checkpoint in {args.out_dir} is at step {step}, and --max_steps {saved.max_steps} is not "
                        f"beyond it: nothing to train; to go on, give a larger one, e.g. --resume --max_steps "
                        f"{2 * step}")
    if saved.max_steps != ckpt["config"]["max_steps"]:  # the cosine decay stretches or shrinks from here on
        before = argparse.Namespace(**{**vars(saved), "max_steps": ckpt["config"]["max_steps"]})
        notes.append(f"--resume: the learning rate now decays to {saved.min_lr:.2e} at step {saved.max_steps} instead "
                     f"of {before.max_steps}: {get_lr(step, before):.2e} at step {step}, {get_lr(step + 1, saved):.2e} "
                     f"at step {step + 1}")
    check_batch_split(saved, world_size or 1, given)
    return saved, ckpt


def check_lora_resume(args, saved, given):
    """--resume goes on with the checkpoint's LoRA settings (or none): a LoRA flag given now that says otherwise is
    refused, since the checkpoint's weights and optimizer state are of its own adapters (or of the whole model)."""
    if "lora_rank" in given and args.lora_rank != saved.lora_rank:
        if not saved.lora_rank:
            raise UserError(f"--resume: the run in {args.out_dir} trained all the weights, not LoRA adapters: drop "
                            f"--lora_rank to resume it, or train adapters on its weights with --init_from "
                            f"{args.out_dir} --lora_rank {args.lora_rank} --out_dir NEW")
        raise UserError(f"--resume: the run in {args.out_dir} trains LoRA adapters of rank {saved.lora_rank}, whose "
                        f"state cannot go on at rank {args.lora_rank}: drop --lora_rank to resume it, or start anew")
    for name in LORA_FLAGS[1:]:
        if name in given and saved.lora_rank:
            now, then = getattr(args, name), getattr(saved, name)
            if name == "lora_targets":
                try:
                    now, then = lora.parse_targets(now), lora.parse_targets(then)
                except ValueError as e:
                    raise UserError(f"--lora_targets: {e}")
            if now != then:
                raise UserError(f"--resume: the run in {args.out_dir} trains LoRA adapters with --{name} "
                                f"{getattr(saved, name)}: drop --{name} to resume it, or start anew")
        elif name in given:
            raise UserError(f"--resume: the run in {args.out_dir} trained all the weights, not LoRA adapters: drop "
                            f"--{name} to resume it")


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


def make_loader(args, accum_steps, rank=0, world_size=1):
    """The loader the options ask for: --dataset_type's, over --dataset_path, in micro-batches of --batch_size x
    --seq_len, accum_steps of them a step on each of world_size ranks, its order drawn from --seed, packed with
    --packing. train.py's, bench.py's and eval.py's."""
    return LOADERS[args.dataset_type](args.dataset_path, args.seq_len, args.batch_size, accum_steps, rank=rank,
                                      world_size=world_size, seed=args.seed, packing=args.packing)

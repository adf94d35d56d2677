"""
Train a GPT-2 on a text file, Alpaca instruction records, chat conversations or token shards.

    python train.py                                   # a laptop CPU: Tiny Shakespeare (input.txt), a few minutes
    python train.py --model gpt2 --device cuda        # GPT-2 124M on one GPU
    torchrun --standalone --nproc_per_node=8 train.py --model gpt2 --total_batch_size 524288

Everything a run makes goes to --out_dir: ckpt.pt (to --resume from) and metrics.jsonl (one JSON line per log line).
Read it downward: main() -> setup() (options, runtime, data, model) -> train() (the loop), whose step is
step.train_step (one optimizer update, which bench.py times too). The shared pieces live in their own files:
options.py (the flags, their defaults and checks, resume's saved config), step.py (the step, the schedule),
runtime.py (device, dtype, processes), parallel.py (DDP, FSDP), optim.py (the optimizers), data.py, model.py,
checkpoint.py, evaluation.py.
"""

import argparse
import contextlib
import dataclasses
import math
import os
import signal
import sys
import time

import torch

import lora
from checkpoint import CHECKPOINT, METRICS, MetricsLog, base_identity, claim_out_dir, save_checkpoint
from cli import UserError, first_line, print_error
from data import Loader
from files import DataError
from tokenizer import EOT_TOKEN, get_tokenizer
from evaluation import evaluate, hellaswag_accuracy, load_hellaswag
from measure import Throughput, device_memory_bytes, memory_estimate, step_flops, token_flops
from model import GPT
from optim import local_tensor
from options import make_loader, resolve
from parallel import build_training
from runtime import Runtime, join_job, setup_runtime, shutdown, signal_on_parent_death
from step import get_lr, train_step
from tracking import Tracking, trackers

MAX_SKIPPED_STEPS = 5  # updates skipped in a row (their gradient not finite) before the run stops
MEMORY_ADVICE = "lower --batch_size (--total_batch_size keeps the global batch, in more micro-steps), or add " \
                "--activation_checkpointing, or shard the model with --fsdp under torchrun, or train LoRA adapters " \
                "instead of the weights (--lora_rank 16)"
# What a CPU process holds besides the run's tensors: the Python runtime and PyTorch's libraries (0.3 GB resident
# after train.py's imports, measured), the data and the allocator's slack: 0.5 GB, a floor
RUNTIME_BYTES = 0.5e9


# ----------------------------------------------------------------------------------------------------------------
# The run: main -> setup -> train (the loop) -> step.train_step.


class StopRequested(Exception):
    """Raised by the loop after the checkpoint of a signalled step is saved; main turns it into the exit code."""

    def __init__(self, signum):
        super().__init__(signum)
        self.signum = signum  # None on a rank that was not signalled itself but stops with the others


def main(argv=None):
    exit_code = 0
    try:
        run_and_sample(sys.argv[1:] if argv is None else argv)
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


def run_and_sample(argv):
    started = time.time()
    run = setup(argv)
    last = train(run)
    if run.rt.master:
        print(done_lines(run.args, last, time.time() - started))
    if run.args.sample_tokens > 0 and (run.rt.master or run.args.fsdp):  # a sharded model runs on every rank
        print_sample(run)


def done_lines(args, last, seconds):
    """What a finished run made, and what to run next."""
    minutes, seconds = divmod(round(seconds), 60)
    val = f", val loss {last['val_loss']:.4f} ({last['val_bpb']:.3f} bits per byte)" if "val_loss" in last else ""
    out, template = args.out_dir, {"alpaca": ' --instruction "..."', "chat": " --chat"}.get(args.dataset_type, "")
    return (f"done in {minutes}m{seconds:02d}s: {os.path.join(out, CHECKPOINT)} at step {last['step']}{val}, every "
            f"record in {os.path.join(out, METRICS)}\nnext: python sample.py --init_from {out}{template} | python "
            f"eval.py --init_from {out} | python export.py --init_from {out} --out_dir {os.path.join(out, 'hf')} | "
            f"python plot.py {out} | more steps: python train.py --resume --out_dir {out} --max_steps "
            f"{2 * last['step']}")


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
    lora_base: dict  # --lora_rank: what identifies the base the adapters go on (checkpoint.base_identity); else None
    ckpt_path: str
    metrics: Tracking  # metrics.jsonl, and the trackers asked for
    out_dir_lock: object  # rank 0: the open lock file of --out_dir (closing it releases the out_dir); else None


def setup(argv):
    """The options (options.resolve), then the runtime, the data, the model and its optimizer (restored on --resume),
    then the out_dir. Every check that can fail comes before anything is written."""
    join_job()  # under torchrun, first: a rank that fails must not leave the others waiting for it
    opts = resolve(argv, world_size=int(os.environ["WORLD_SIZE"]) if "WORLD_SIZE" in os.environ else None)
    args, cfg, accum_steps, ckpt = opts.args, opts.cfg, opts.accum_steps, opts.ckpt
    rt = setup_runtime(args.device, args.dtype)
    check_memory(cfg, args, rt, accum_steps)
    loader = make_loader(args, accum_steps, rt.rank, rt.world_size)
    summary = loader.summary()  # (the examples kept, for fine-tuning data)
    if summary and rt.master:
        print(summary)
    hellaswag_items = load_hellaswag(args.hellaswag_path, rt) if args.hellaswag_path else None

    torch.manual_seed(args.seed)  # the same initial weights on every rank
    raw_model = opts.init_model or GPT(cfg)
    lora_base = None
    if args.lora_rank:  # the base frozen, adapters on it (their initialisation seeded above, like the weights')
        lora_base = {k: ckpt["lora"][k] for k in ("base", "base_seed", "base_checksum")} if ckpt is not None else \
            base_identity(args.init_from, raw_model, args.seed)  # (a resumed base was checked as it loaded)
        lora.add_adapters(raw_model, args.lora_rank, args.lora_alpha, args.lora_dropout, args.lora_targets)
        if rt.dtype != torch.float32:  # the frozen matrices in the compute dtype: half their memory, no casts
            lora.cast_base(raw_model, rt.dtype)
    model, optimizer, scaler = build_training(raw_model, rt, weight_decay=args.weight_decay, lr=args.max_lr,
                                              betas=(args.beta1, args.beta2), optimizer=args.optimizer,
                                              muon_lr=args.muon_lr, muon_momentum=args.muon_momentum,
                                              compile=args.compile, state=ckpt,
                                              reduce_dtype=args.reduce_dtype, fsdp=args.fsdp,
                                              activation_checkpointing=args.activation_checkpointing)
    start_step, notes = ckpt["step"] if ckpt is not None else 0, opts.notes
    del opts, ckpt  # the loaded tensors are in the model and optimizer now

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
        for note in notes:  # once everything is checked: a refusal is the only line then
            print(note, file=sys.stderr)
        metrics = Tracking(metrics, trackers(args, start_step if args.resume else None))  # TensorBoard, W&B
        name = f"from {args.init_from}" if args.init_from else args.model
        if args.lora_rank:
            trained = sum(p.numel() for p in raw_model.parameters() if p.requires_grad)
            name += f" + LoRA rank {args.lora_rank} on {args.lora_targets} ({trained / 1e6:.2f}M trained)"
        print(f"model {name}: {raw_model.num_params() / 1e6:.2f}M parameters, {cfg.n_layer} layers, "
              f"{cfg.n_head} heads, {cfg.n_embd} wide | {rt.device} {str(rt.dtype).removeprefix('torch.')} | "
              f"{rt.world_size} process(es) x {accum_steps} micro-step(s) x {args.batch_size} x {args.seq_len} = "
              f"{args.total_batch_size} tokens/step | steps {start_step} -> {args.max_steps}")
    return Run(args, rt, loader, accum_steps, model, raw_model, optimizer, scaler, start_step, hellaswag_items,
               lora_base, os.path.join(args.out_dir, CHECKPOINT), metrics, lock)


def check_memory(cfg, args, rt, accum_steps):
    """Refuse, before anything is allocated, a run whose step clearly cannot fit the device: bench.py's estimate
    (measure.memory_estimate, an upper bound: its parts never all peak at once) over 1.5x the device's memory. A
    CPU would otherwise swap, then be killed without a word; a GPU would fail in its first step."""
    shards = rt.world_size if args.fsdp else 1
    adapters = lora.adapter_count(cfg, args.lora_rank, args.lora_targets) if args.lora_rank else None
    parts = memory_estimate(cfg, args.batch_size * args.seq_len, shards, args.activation_checkpointing,
                            accum_steps > 1, low_precision=rt.dtype != torch.float32, adapters=adapters)
    need, have = sum(parts.values()), device_memory_bytes(rt)
    # and the parts that all live at once, at the optimizer's step: not an estimate but a floor
    floor = parts["weights"] + parts["gradients"] + parts["optimizer"] + (RUNTIME_BYTES if rt.device_type == "cpu"
                                                                          else 0)
    if have and (need > 1.5 * have or floor > have):
        largest = max(parts, key=parts.get)
        where = "GPU" if rt.device_type == "cuda" else "process's share of this machine's memory"
        raise UserError(f"a step of --batch_size {args.batch_size} x --seq_len {args.seq_len} needs about "
                        f"{need / 1e9:,.1f} GB ({largest} {parts[largest] / 1e9:,.1f} GB), and the {where} has "
                        f"{have / 1e9:,.1f} GB: {MEMORY_ADVICE}")


def train(run):
    """The loop: a step, then what the step is due for: stopping on a signal, logging, evaluation, a checkpoint."""
    args, rt = run.args, run.rt
    speed, per_token = Throughput(rt, run.start_step), token_flops(run.raw_model, args.seq_len)
    # updates skipped (their gradient not finite) in a row, and since the last log: on the device, read when logging
    in_a_row = since_log = torch.zeros((), device=rt.device)
    saved_step = run.start_step if args.resume else None  # the step ckpt.pt holds
    with run.out_dir_lock or contextlib.nullcontext(), run.metrics, StopSignal(rt, run.ckpt_path) as stop_signal:
        for step in range(run.start_step + 1, args.max_steps + 1):  # step: the number of this update, 1-based
            # ---- the step
            lr = get_lr(step, args)
            loss_sum, grad_norm, tokens, skipped = train_step(run.model, run.optimizer, run.scaler, run.loader, step,
                                                              run.accum_steps, rt, lr=lr, seed=args.seed,
                                                              grad_clip=args.grad_clip)
            speed.count(tokens, step_flops(per_token, run.loader, step - 1))
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

            # ---- evaluation: a signal during it drops it (None) and the run saves at once
            if do_eval:
                val = evaluate(run.model, validation_batches(run.loader, args.eval_steps, run.accum_steps), rt,
                               stop=stop_signal.requested)
                if val is None:
                    stop = do_save = True
                else:
                    record.update({f"val_{name}": round(val[name], 6) for name in ("loss", "ppl", "bpb")})
            if do_hellaswag and not stop:
                scores = hellaswag_accuracy(run.raw_model, run.hellaswag_items, rt, stop=stop_signal.requested)
                if scores is None:
                    stop = do_save = True
                else:
                    record.update({f"hellaswag_{name}": round(value, 6) for name, value in scores.items()})
            run.metrics.write(record)
            if rt.master:
                print(log_line(record, args.max_steps, speed), flush=True)
            last_record = record

            # ---- checkpoint (every rank: a sharded model is gathered first; rank 0 writes). Never one of weights
            # that are not finite: ckpt.pt keeps the last good one
            if do_save:
                if not weights_are_finite(run.raw_model, rt):
                    raise UserError(f"the weights are not finite at step {step}; not saved, stopped, {kept}. Try a "
                                    f"lower --max_lr or --dtype float32")
                save_checkpoint(run.ckpt_path, run.raw_model, run.optimizer, run.scaler, step, args, write=rt.master,
                                lora_base=run.lora_base)
                saved_step = step
            if stop:
                if rt.master:
                    print(f"stopped by signal at step {step}; checkpoint saved: continue with --resume", flush=True)
                raise StopRequested(stop_signal.signum)
            speed.restart(step)  # the time of evaluations and checkpoints is not training speed
    return last_record


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


def log_line(record, max_steps, speed):
    """The log's line for a record: the step's figures, and the time left at the run's mean speed so far."""
    seconds_per_step = speed.seconds_per_step
    minutes, seconds = divmod(round(speed.mean_seconds_per_step * (max_steps - record["step"])), 60)
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
    prompt, greedy = loader.sample_prompt()
    temperature, shown = (0.0, tokenizer.decode([t for t in prompt if t != EOT_TOKEN])) if greedy else (0.8, "")
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

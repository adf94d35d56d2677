"""
Benchmarks: training steps, decoding, and checkpoints.

    python bench.py                                         # training steps of the default run
    python bench.py --model gpt2 --seq_len 256 --batch_size 4
    python bench.py --model gpt2 --device cuda --seq_len 1024 --batch_size 16 --compile
    torchrun --standalone --nproc_per_node=2 bench.py --device cpu --model gpt2-mini   # DDP: figures for the job
    torchrun --standalone --nproc_per_node=2 bench.py --device cpu --model gpt2-mini --fsdp   # FSDP, to compare
    python bench.py --model gpt2-xl --lora_rank 16 --batch_size 1 --seq_len 512 --steps 2 --warmup 1   # a LoRA step
    python bench.py --memory_table 8 --batch_size 8         # the memory estimate for each GPT-2 size, nothing runs
    python bench.py --sample --model gpt2                   # decoding: KV cache, no cache, transformers' generate
    python bench.py --checkpoint --model gpt2               # saving and loading ckpt.pt, with and without its checksum
    python bench.py --chat --model gpt2                     # sample.py --chat's turns, with and without its kept cache
    python bench.py --attention --batch_size 16 --seq_len 240   # attention's kernels in the run's dtype and in fp32
    python bench.py --model gpt2 --profile 20               # training steps, and the 20 operators that take longest

Training: the model, optimizer, GradScaler and wrappers (compile, DDP) come from parallel.build_training and the
loader from options.make_loader, as in train.py. After --warmup steps, times --steps of train.py's own step
(step.train_step): each micro-step's forward and backward (gradients synced on the last), then clipping and the
optimizer's step. Reports tokens/s, ms/step (and its two parts: forward+backward, and the optimizer), MFU and peak
memory. MFU is measure.step_flops (the work the examples need: padding none) against measure.peak_flops: the data
sheet's bf16/fp16 peak for known GPUs, otherwise a large matmul timed on the spot in the run's dtype. Peak memory
is the most the tensors held during one more step (measure.peak_memory_bytes: CUDA's allocator on a GPU, the
profiler on a CPU), model and optimizer included, per process under torchrun, with the weights, gradients and
optimizer state alone, and measure.memory_estimate's figure.
Decoding: greedy tokens/s of a batch of one from random weights of the model's shape (or --init_from), with and
without the KV cache, and of transformers' generate on the same weights when transformers is installed; then
whether the three decode the same tokens, in full fp32 (where a tie between two logits cannot flip).
Chat: --turns turns of sample.py --chat (sample.Chat), the same message each, greedy replies of --reply_tokens at
most, from random weights of the model's shape (or --init_from): the KV cache kept from turn to turn (each turn
prefills only its own new tokens), then the whole conversation prefilled again each turn. Per turn: the tokens
prefilled, the ms to the reply's first token (the prefill) and to its end; then whether the two give the same replies
(in full fp32, as for decoding). Past the model's context the oldest exchanges are dropped, as in sample.py: a kept
cache is then filled again (--seq_len gives a random model a longer context).
Checkpoints: the model with its --optimizer's state after one step, saved (checksum and fsync included) into a
temporary directory, loaded back in full (no mmap) with and without verifying its checksum, and the checksum alone;
each the faster of two runs, the loads from the page cache the save filled.
Attention: causal SDPA's forward and backward on random (batch_size, n_head, seq_len, head_size) q, k, v of the
run's dtype, its kernel in that dtype against the float32 one on the same inputs (cast there and back), alternated,
each at its best of --steps (model.attention's choice on a CPU under bf16: see its rule).
All print a table, then one JSON line with every figure. The options are train.py's that decide what a step
computes (shape, batch, dtype, device, compile, data), defined once in options.py; the schedule and the optimizer's
settings don't change its speed and are fixed here.
"""

import argparse
import contextlib
import dataclasses
import json
import os
import sys
import tempfile
import time

import torch
import torch.nn.functional as F

import hf
from checkpoint import CHECKPOINT, checksum, load_checkpoint, load_model, save_checkpoint
from files import DataError
from model import GPT, preset_config
from cli import HelpFormatter, OneLineParser, UserError, add_device_flags, non_negative_int, positive_int, print_error
from optim import local_tensor, optimizer_step
import lora
from options import add_batch_flags, add_data_flags, add_lora_flags, add_model_flags, add_step_flags, \
    batch_geometry, check_lora, given_flags, make_loader, model_config
from parallel import build_training
from measure import memory_estimate, peak_flops, peak_memory_bytes, step_flops, token_flops
from runtime import setup_runtime, shutdown
from sample import Chat
from step import train_step


def build_parser():
    p = OneLineParser(description="Benchmark training steps (default), decoding (--sample), chat turns (--chat), "
                      "checkpoints (--checkpoint) or attention's kernels (--attention).", formatter_class=HelpFormatter)
    # train.py's flags that decide what a step computes, defined once in options.py
    add_model_flags(p)
    add_lora_flags(p)
    add_data_flags(p)
    add_batch_flags(p)
    step = add_step_flags(p)
    step.add_argument("--spread_muon", action=argparse.BooleanOptionalAction, default=True, help="under torchrun "
                      "with DDP, Muon orthogonalises each matrix on one process and shares the result; "
                      "--no-spread_muon does every matrix on every process, as torch.optim.Muon would: to see what "
                      "spreading saves")
    add_device_flags(p.add_argument_group("device"))
    a = p.add_argument_group("benchmark").add_argument
    a("--steps", type=positive_int, default=10, help="timed steps")
    a("--warmup", type=non_negative_int, default=3, help="untimed steps first (allocations, compilation, caches)")
    a("--sample", action="store_true", help="benchmark decoding instead of training")
    a("--checkpoint", action="store_true", help="benchmark saving and loading a checkpoint, and its checksum, "
      "instead of training")
    a("--memory_table", type=positive_int, metavar="GPUS", help="print the estimated memory a GPU needs to train "
      "each GPT-2 size on this many GPUs, at --batch_size x --seq_len (default 1024) tokens a micro-step, in bf16 "
      "(nothing runs)")
    a("--init_from", help="--sample and --chat: these weights (as train.py's --init_from) instead of random ones")
    a("--prompt_tokens", type=positive_int, default=32, help="--sample: prompt length")
    a("--new_tokens", type=positive_int, default=128, help="--sample: tokens generated per run")
    a("--attention", action="store_true", help="benchmark attention's forward and backward at the model's shape, "
      "in the run's dtype and in fp32 (what model.attention chooses between), instead of training")
    a("--profile", type=positive_int, metavar="N", help="training: also print where the timed steps' time goes, the "
      "N operators with the most self time in torch.profiler (which slows the steps a little)")
    a("--chat", action="store_true", help="benchmark sample.py --chat's turns, with its KV cache kept from turn to "
      "turn and with the whole conversation prefilled each turn, instead of training")
    a("--turns", type=positive_int, default=10, help="--chat: turns of the conversation")
    a("--reply_tokens", type=positive_int, default=32, help="--chat: tokens a reply gets at most")
    return p


# The schedule and the optimizer's settings don't change what a step costs: fixed here
LR, GRAD_CLIP = 1e-4, 1.0


def bench_training(args, rt, cfg, accum_steps):
    world_size = rt.world_size
    # the peak is read (or measured) before the steps and measured again after them, the higher kept: a peak cached
    # in a moment of another job's load would otherwise flatter the MFU of every run on the machine
    peak_before = peak_flops(rt)
    loader = make_loader(args, accum_steps, rt.rank, world_size)
    torch.manual_seed(args.seed)
    raw_model = GPT(cfg)
    adapters = None
    if args.lora_rank:  # as train.py sets it up: adapters on a frozen base kept in the compute dtype
        lora.add_adapters(raw_model, args.lora_rank, args.lora_alpha or 2.0 * args.lora_rank, args.lora_dropout,
                          args.lora_targets)
        if rt.dtype != torch.float32:
            lora.cast_base(raw_model, rt.dtype)
        adapters = lora.adapter_count(cfg, args.lora_rank, args.lora_targets)
    model, optimizer, scaler = build_training(raw_model, rt, weight_decay=0.1, lr=LR, betas=(0.9, 0.95),
                                              optimizer=args.optimizer, compile=args.compile,
                                              reduce_dtype=args.reduce_dtype, fsdp=args.fsdp,
                                              activation_checkpointing=args.activation_checkpointing)
    if args.optimizer == "muon":
        optimizer.optimizers["muon"].spread = args.spread_muon

    seconds_in = {"forward_backward": 0.0, "optimizer": 0.0}  # where a step's time goes
    backward_done = []

    def before_update():
        rt.synchronize()  # (on a GPU: one wait more a step, to see where the time goes)
        backward_done.append(time.perf_counter())

    def step(number):  # train.py's step itself, number 1, 2, ...
        t0 = time.perf_counter()
        loss, _, tokens, _ = train_step(model, optimizer, scaler, loader, number, accum_steps, rt, lr=LR,
                                        seed=args.seed, grad_clip=GRAD_CLIP, before_update=before_update)
        rt.synchronize()
        seconds_in["forward_backward"] += backward_done[-1] - t0
        seconds_in["optimizer"] += time.perf_counter() - backward_done[-1]
        return loss, tokens  # tokens: this rank's x the ranks, padding included, as train.py counts

    for number in range(1, args.warmup + 1):
        step(number)
    rt.synchronize()
    seconds_in.update(forward_backward=0.0, optimizer=0.0)
    timed = range(args.warmup + 1, args.warmup + args.steps + 1)
    profiler = torch.profiler.profile() if args.profile else contextlib.nullcontext()
    with profiler:
        t0, tokens = time.perf_counter(), 0
        for number in timed:
            loss, step_tokens = step(number)
            tokens += step_tokens
        loss.item()  # waits for the last step
        seconds = time.perf_counter() - t0
    if args.profile and rt.master:
        sort_by = "self_device_time_total" if rt.device_type == "cuda" else "self_cpu_time_total"
        print(profiler.key_averages().table(sort_by=sort_by, row_limit=args.profile, max_name_column_width=60))
    # padding: what no example fills (Alpaca and chat batches: see data.ExampleLoader.collate and .pack), all ranks'
    fed = sum(rt.gather(tokens // world_size))  # (packed rows differ a little from rank to rank)
    padding = fed - sum(loader.tokens_in_step("train", number - 1) for number in timed)
    step_parts = {name: max(rt.gather(part)) / args.steps * 1000 for name, part in seconds_in.items()}  # ms a step
    # what lives from step to step: weights, optimizer state, and under DDP the gradients (in its buckets); this
    # rank's shards of them under FSDP
    params = list(raw_model.parameters())
    optimizer_state = [t for state in optimizer.state.values() for t in state.values()]
    resident = [local_tensor(t) for t in [*params, *(p.grad for p in params if p.grad is not None), *optimizer_state]]
    gradient_bytes = []  # the gradients as the optimizer gets them
    optimizer.register_step_pre_hook(lambda *_: gradient_bytes.append(
        sum(local_bytes(p.grad) for p in params if p.grad is not None)))
    peak_memory = peak_memory_bytes(lambda: step(timed[-1] + 1), rt, resident)  # one more step, untimed
    state_memory = sum(map(local_bytes, params)) + gradient_bytes[-1] + sum(map(local_bytes, optimizer_state))
    seconds_per_step, tokens_per_sec = seconds / args.steps, fed / seconds
    peak = max(peak_before, peak_flops(rt, measure_again=True))
    per_token = token_flops(raw_model, args.seq_len)
    flops = sum(step_flops(per_token, loader, number - 1) for number in timed)  # all ranks'
    mfu = flops / seconds / (peak * world_size)
    return {"params": raw_model.num_params(), "trained_params": sum(p.numel() for p in params if p.requires_grad),
            "batch_size": args.batch_size, "seq_len": args.seq_len,
            "accum_steps": accum_steps, "processes": world_size, "tokens_per_step": args.total_batch_size,
            "ms_per_step": seconds_per_step * 1000,
            # the slowest rank's parts (under Muon each rank orthogonalises its own share of the matrices)
            "forward_backward_ms": step_parts["forward_backward"], "optimizer_ms": step_parts["optimizer"],
            "tokens_per_sec": tokens_per_sec, "mfu": mfu, "padding_share": padding / fed,
            "peak_tflops": peak / 1e12,
            # per process: the worst moment of a step, and the weights + gradients + optimizer state within it
            "peak_memory_gb": max(rt.gather(peak_memory)) / 1e9,
            "peak_memory_gb_per_rank": [round(b / 1e9, 4) for b in rt.gather(peak_memory)],
            "state_memory_gb_per_rank": [round(b / 1e9, 4) for b in rt.gather(state_memory)],
            # memory_estimate's sum of the parts, which never all peak at once: what to size a GPU by
            "estimated_memory_gb": sum(memory_estimate(
                cfg, args.batch_size * args.seq_len, world_size if args.fsdp else 1, args.activation_checkpointing,
                accum_steps > 1, low_precision=rt.dtype != torch.float32, adapters=adapters).values()) / 1e9}


def local_bytes(t):
    return local_tensor(t).numel() * t.element_size()


LORA_TABLE_RANK = 16  # --memory_table's LoRA column: rank 16 on every projection, one copy a GPU (DDP)


def print_memory_table(gpus, tokens):
    print(f"GB per GPU to train, {gpus} GPUs, {tokens} tokens a micro-step with gradient accumulation, bf16 autocast, "
          f"AdamW: weights + gradients + optimizer state | weight copies | activations | loss = total")
    print(f"| model | DDP | FSDP | FSDP + activation checkpointing | LoRA rank {LORA_TABLE_RANK} (DDP) |\n"
          f"| --- | --- | --- | --- | --- |")
    for name in ("gpt2", "gpt2-medium", "gpt2-large", "gpt2-xl"):
        cells = []
        cfg = preset_config(name)
        for shards, checkpointing, adapters in [(1, False, None), (gpus, False, None), (gpus, True, None),
                                                (1, False, lora.adapter_count(cfg, LORA_TABLE_RANK))]:
            parts = memory_estimate(cfg, tokens, shards, checkpointing, accumulating=True, adapters=adapters)
            state = parts["weights"] + parts["gradients"] + parts["optimizer"]
            cells.append(f"{state / 1e9:.1f} + {parts['weight copies'] / 1e9:.1f} + {parts['activations'] / 1e9:.1f} "
                         f"+ {parts['loss'] / 1e9:.1f} = **{sum(parts.values()) / 1e9:.1f}**")
        print(f"| {name} | " + " | ".join(cells) + " |")


def bench_decoding(args, rt, cfg):
    torch.manual_seed(args.seed)
    model = (load_model(args.init_from) if args.init_from else GPT(cfg)).to(rt.device).eval()
    prompt = torch.randint(0, model.config.vocab_size, (1, args.prompt_tokens), device=rt.device)
    n = args.new_tokens
    generators = {"kv_cache": ours(model, prompt, n, use_cache=True), "no_cache": ours(model, prompt, n, False)}
    try:
        from transformers import GPT2LMHeadModel
    except ImportError:
        print("transformers is not installed (pip install transformers): its generate is not compared",
              file=sys.stderr)
    else:
        with tempfile.TemporaryDirectory() as directory:
            hf.save_pretrained(model, directory)
            theirs = GPT2LMHeadModel.from_pretrained(directory).to(rt.device).eval()
        generators["transformers"] = transformers_greedy(theirs, prompt, n)
    results = {}
    for name, generate in generators.items():
        results[f"{name}_tokens_per_sec"] = n / timed(rt, lambda count: generate(count, rt))
    # Do the three decode the same tokens? Greedy decoding follows the largest logit, and in bf16 or TF32 two
    # near-equal logits (common with random weights) swap with the order of a sum: compared in full fp32 instead.
    exact_rt = dataclasses.replace(rt, dtype=torch.float32)
    with exact_matmuls():
        tokens = {name: generate(None, exact_rt) for name, generate in generators.items()}
    results["same_tokens_with_and_without_cache"] = torch.equal(tokens["kv_cache"], tokens["no_cache"])
    if "transformers" in tokens:
        results["same_tokens_as_transformers"] = torch.equal(tokens["kv_cache"], tokens["transformers"])
    results["params"] = model.num_params()
    results["prompt_tokens"], results["new_tokens"] = args.prompt_tokens, n
    return results


def bench_attention(args, rt, cfg):
    """Causal attention's forward and backward at the run's shape: SDPA in the run's dtype against SDPA in float32
    on the same inputs, as model.attention computes it for short rows on a CPU."""
    torch.manual_seed(args.seed)
    shape = (args.batch_size, cfg.n_head, args.seq_len, cfg.n_embd // cfg.n_head)
    q, k, v = (torch.randn(shape, device=rt.device, dtype=rt.dtype, requires_grad=True) for _ in range(3))
    grad = torch.randn(shape, device=rt.device, dtype=rt.dtype)

    def run(dtype):
        y = F.scaled_dot_product_attention(*(t.to(dtype) for t in (q, k, v)), is_causal=True).to(rt.dtype)
        y.backward(grad)

    best = {rt.dtype: float("inf"), torch.float32: float("inf")}
    for dtype in [*best] * 2:
        run(dtype)  # warm-up
    for _ in range(args.steps):  # alternated: a slow moment of a shared machine hits both
        for dtype in best:
            rt.synchronize()
            t0 = time.perf_counter()
            run(dtype)
            rt.synchronize()
            best[dtype] = min(best[dtype], time.perf_counter() - t0)
    return {"shape": list(shape), "dtype_ms": best[rt.dtype] * 1000, "float32_ms": best[torch.float32] * 1000}


CHAT_SYSTEM, CHAT_MESSAGE = "You are a helpful assistant.", "Tell me something about the sea."


def bench_chat(args, rt, cfg):
    torch.manual_seed(args.seed)
    model = (load_model(args.init_from) if args.init_from else GPT(cfg)).to(rt.device).eval()
    chat_turns(model, rt, 2, args.reply_tokens)  # warm-up: first calls allocate
    runs = chat_turns(model, rt, args.turns, args.reply_tokens)
    print("| turn | kept cache: tokens prefilled | prefill ms | turn ms | whole conversation prefilled: tokens | "
          "prefill ms | turn ms |\n| --- | --- | --- | --- | --- | --- | --- |")
    for k, (kept, again) in enumerate(zip(runs["kept_cache"], runs["prefill_all"]), 1):
        print(f"| {k} | {kept['fed']} | {kept['prefill_ms']:.1f} | {kept['turn_ms']:.1f} | {again['fed']} | "
              f"{again['prefill_ms']:.1f} | {again['turn_ms']:.1f} |")
    # the same replies? In full fp32, as bench_decoding compares (the timed runs are that already on a CPU in fp32)
    exact_runs = runs
    if rt.device_type != "cpu" or rt.dtype != torch.float32:
        with exact_matmuls():
            exact_runs = chat_turns(model, dataclasses.replace(rt, dtype=torch.float32), args.turns,
                                    args.reply_tokens)
    replies = {name: [turn["reply"] for turn in turns] for name, turns in exact_runs.items()}
    results = {"params": model.num_params(), "context": model.config.block_size, "turns": args.turns,
               "reply_tokens": args.reply_tokens}
    for name, turns in runs.items():
        for key in ("fed", "prefill_ms", "turn_ms"):
            results[f"{name}_{key}"] = [round(turn[key], 2) for turn in turns]
    results["same_replies"] = replies["kept_cache"] == replies["prefill_all"]
    return results


def chat_turns(model, rt, turns, reply_tokens):
    """Two conversations of `turns` turns through sample.Chat, CHAT_MESSAGE each: one keeps its KV cache from turn
    to turn, the other prefills the whole conversation every turn. They take turns, so that both see the machine alike
    (on a shared one, its load changes). Per conversation, per turn: the tokens prefilled, the ms to the reply's first
    token and to its end, and the reply."""
    chats = {"kept_cache": Chat(model, CHAT_SYSTEM), "prefill_all": Chat(model, CHAT_SYSTEM, keep_cache=False)}
    figures = {name: [] for name in chats}
    for _ in range(turns):
        for name, chat in chats.items():
            t0 = time.perf_counter()
            first, reply = None, []
            with rt.autocast():
                for token in chat.reply(CHAT_MESSAGE, reply_tokens, temperature=0):  # (each one read: synchronized)
                    first = first or time.perf_counter()
                    reply.append(token)
            end = time.perf_counter()
            figures[name].append({"fed": chat.fed, "prefill_ms": ((first or end) - t0) * 1000,
                                  "turn_ms": (end - t0) * 1000, "reply": reply})
    return figures


def bench_checkpoint(args, rt, cfg):
    torch.manual_seed(args.seed)
    model = GPT(cfg)
    step_model, optimizer, scaler = build_training(model, rt, weight_decay=0.1, lr=1e-4, betas=(0.9, 0.95),
                                                   optimizer=args.optimizer)
    tokens = torch.randint(0, cfg.vocab_size, (1, 9), device=rt.device)  # one short step: its state is full size
    with rt.autocast():
        loss = step_model(tokens[:, :-1], tokens[:, 1:])[1]
    scaler.scale(loss).backward()
    optimizer_step(step_model, optimizer, scaler, grad_clip=1.0)
    with tempfile.TemporaryDirectory() as directory:
        path = os.path.join(directory, CHECKPOINT)
        results = {"params": model.num_params(),
                   "save_seconds": fastest(lambda: save_checkpoint(path, model, optimizer, scaler, 1, args)),
                   "checkpoint_gb": os.path.getsize(path) / 1e9,
                   "load_seconds": fastest(lambda: load_checkpoint(path, verify=True)),
                   "load_unverified_seconds": fastest(lambda: load_checkpoint(path, verify=False))}
        state = load_checkpoint(path, verify=False)
    results["checksum_seconds"] = fastest(lambda: checksum(state))
    return results


def fastest(work, runs=2):
    """The seconds of work's fastest run: the first may pay for allocations and caches the next reuses."""
    times = []
    for _ in range(runs):
        t0 = time.perf_counter()
        work()
        times.append(time.perf_counter() - t0)
    return min(times)


def timed(rt, generate, rounds=3):
    """Seconds of generate(None) at its best of `rounds`, after a warm-up (the first calls allocate): one slow moment
    of a shared machine showed the KV cache at 3.7 tok/s against 9.1 without it, in a single timing."""
    generate(4)
    best = float("inf")
    for _ in range(rounds):
        rt.synchronize()
        t0 = time.perf_counter()
        generate(None)
        rt.synchronize()
        best = min(best, time.perf_counter() - t0)
    return best


def ours(model, prompt, n, use_cache):
    """generate(count, rt): count (None: n) greedy tokens after prompt, in rt's autocast."""
    def generate(count, rt):
        with rt.autocast():
            return model.generate(prompt, count or n, temperature=0, use_cache=use_cache)[0, prompt.size(1):]
    return generate


def transformers_greedy(theirs, prompt, n):
    def generate(count, rt):
        with torch.no_grad(), rt.autocast():
            out = theirs.generate(prompt, attention_mask=torch.ones_like(prompt), do_sample=False, use_cache=True,
                                  max_new_tokens=count or n, min_new_tokens=count or n, pad_token_id=50256)
        return out[0, prompt.size(1):]
    return generate


@contextlib.contextmanager
def exact_matmuls():
    """fp32 matmuls in full fp32 on GPUs (TF32 off: setup_runtime turns it on), for the time of the block."""
    saved = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved


def main(argv=None):
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        check_lora(args, given_flags(parser, sys.argv[1:] if argv is None else argv))  # train.py's checks
        if args.lora_rank:
            args.optimizer = "adamw"  # LoRA's, as train.py's defaults make it
        if args.fsdp and "WORLD_SIZE" not in os.environ:
            raise UserError("--fsdp shards the model over the processes of a torchrun job: launch bench.py with "
                            "torchrun --nproc_per_node=N")
        if args.memory_table:
            print_memory_table(args.memory_table, args.batch_size * (args.seq_len or 1024))
            return
        # the batch arithmetic is checked before joining the processes of a torchrun job, so all of them stop alike
        cfg = model_config(args)
        check_lora(args, set(), cfg)
        accum_steps = batch_geometry(args, cfg, int(os.environ.get("WORLD_SIZE", 1)))
        modes = [m for m in ("attention", "chat", "sample", "checkpoint") if getattr(args, m)]  # (none: training)
        if len(modes) > 1:
            raise UserError("--sample, --checkpoint, --chat and --attention are four benchmarks: give one")
        if args.profile and modes:
            raise UserError("--profile profiles training steps: leave out --sample, --checkpoint, --chat and "
                            "--attention")
        rt = setup_runtime(args.device, args.dtype)
        if args.attention:
            result = bench_attention(args, rt, cfg)
        elif args.chat:
            result = bench_chat(args, rt, cfg)
        elif args.sample:
            result = bench_decoding(args, rt, cfg)
        elif args.checkpoint:
            result = bench_checkpoint(args, rt, cfg)
        else:
            result = bench_training(args, rt, cfg, accum_steps)
        result = {"mode": modes[0] if modes else "train", "model": args.init_from or args.model,
                  "device": torch.cuda.get_device_name(rt.device) if rt.device_type == "cuda" else rt.device,
                  "dtype": str(rt.dtype).removeprefix("torch."), "compile": args.compile,
                  "reduce_dtype": args.reduce_dtype, "optimizer": args.optimizer, **result}
        if rt.master:
            width = max(len(k) for k in result)
            for key, value in result.items():
                print(f"{key:<{width}}  {value:,.4g}" if isinstance(value, float) else f"{key:<{width}}  {value}")
            print(json.dumps({k: round(v, 4) if isinstance(v, float) else v for k, v in result.items()}))
    except (UserError, DataError) as e:
        print_error(e)
        sys.exit(2)
    finally:
        shutdown()


if __name__ == "__main__":
    main()

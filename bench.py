"""
Benchmarks, with train.py's own code and flags.

    python bench.py                                         # training steps of the default run
    python bench.py --model gpt2 --seq_len 256 --batch_size 4
    python bench.py --model gpt2 --device cuda --seq_len 1024 --batch_size 16 --compile
    python bench.py --sample --model gpt2                   # decoding: KV cache, no cache, transformers' generate

Training: after --warmup steps, times --steps full optimizer steps (train.train_step: loader, forward, backward,
clipping, AdamW) and reports tokens/s, ms/step, MFU and peak memory. MFU is against train.peak_flops: the data sheet's
bf16/fp16 peak for known GPUs, otherwise a large matmul timed on the spot in the run's dtype.
Decoding: greedy tokens/s of a batch of one from random weights of the model's shape (or --init_from), with and
without the KV cache, and of transformers' generate on the same weights when transformers is installed.
Both print a table, then one JSON line with every figure.
"""

import json
import resource
import sys
import tempfile
import time

import torch

import train
from model import GPT


def build_parser():
    p = train.build_parser()
    p.description = "Benchmark training steps (default) or decoding (--sample), with train.py's flags."
    a = p.add_argument
    a("--steps", type=int, default=10, help="timed steps")
    a("--warmup", type=int, default=3, help="untimed steps first (allocations, compilation, caches)")
    a("--sample", action="store_true", help="benchmark decoding instead of training")
    a("--prompt_tokens", type=int, default=32, help="--sample: prompt length")
    a("--new_tokens", type=int, default=128, help="--sample: tokens generated per run")
    return p


def sync(rt):
    if rt.device_type == "cuda":
        torch.cuda.synchronize(rt.device)


def peak_memory_gb(rt):
    if rt.device_type == "cuda":
        return torch.cuda.max_memory_allocated(rt.device) / 1e9
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / 1e9  # the process's peak RSS (Linux: KiB)


def bench_training(args, rt, cfg, accum_steps):
    # the peak is measured before and after the steps, and the higher taken: on a shared machine a moment of
    # contention would otherwise lower the peak and flatter the MFU
    peak_before = train.peak_flops(rt)
    loader = train.make_loader(args, accum_steps, rt)
    torch.manual_seed(args.seed)
    model = raw_model = GPT(cfg).to(rt.device)
    optimizer = train.configure_optimizer(model, args, rt.device_type)
    scaler = torch.amp.GradScaler(rt.device_type, enabled=rt.dtype == torch.float16)
    if args.compile:
        model = torch.compile(model)
    if rt.ddp:
        model = train.DDP(model, device_ids=[rt.local_rank] if rt.device_type == "cuda" else None,
                          gradient_as_bucket_view=True)
    for step in range(1, args.warmup + 1):
        train.train_step(model, optimizer, scaler, loader, step, accum_steps, rt, args)
    sync(rt)
    t0 = time.perf_counter()
    tokens = 0
    for step in range(args.warmup + 1, args.warmup + args.steps + 1):
        _, loss, _, step_tokens = train.train_step(model, optimizer, scaler, loader, step, accum_steps, rt, args)
        tokens += step_tokens
    loss.item()  # waits for the last step
    seconds = time.perf_counter() - t0
    seconds_per_step, tokens_per_sec = seconds / args.steps, tokens / seconds
    peak = max(peak_before, train.peak_flops(rt))
    mfu = raw_model.flops_per_token(args.seq_len) * tokens_per_sec / (peak * rt.world_size)
    return {"params": raw_model.num_params(), "batch_size": args.batch_size, "seq_len": args.seq_len,
            "accum_steps": accum_steps, "processes": rt.world_size, "tokens_per_step": args.total_batch_size,
            "ms_per_step": seconds_per_step * 1000, "tokens_per_sec": tokens_per_sec, "mfu": mfu,
            "peak_tflops": peak / 1e12, "peak_memory_gb": peak_memory_gb(rt)}


def timed(rt, generate):
    generate(4)  # warm-up: first calls allocate
    sync(rt)
    t0 = time.perf_counter()
    tokens = generate(None)
    sync(rt)
    return tokens, time.perf_counter() - t0


def bench_decoding(args, rt, cfg):
    torch.manual_seed(args.seed)
    model = (train.load_model(args.init_from) if args.init_from else GPT(cfg)).to(rt.device).eval()
    prompt = torch.randint(0, model.config.vocab_size, (1, args.prompt_tokens), device=rt.device)
    n = args.new_tokens
    results, outputs = {}, {}

    def ours(use_cache):
        def generate(count):
            with rt.autocast():
                return model.generate(prompt, count or n, temperature=0, use_cache=use_cache)[0, prompt.size(1):]
        return generate

    for name, use_cache in [("kv_cache", True), ("no_cache", False)]:
        outputs[name], seconds = timed(rt, ours(use_cache))
        results[f"{name}_tokens_per_sec"] = n / seconds
    try:
        from transformers import GPT2LMHeadModel
    except ImportError:
        print("transformers is not installed (pip install transformers): its generate is not compared",
              file=sys.stderr)
    else:
        with tempfile.TemporaryDirectory() as directory:
            model.save_pretrained(directory)
            hf = GPT2LMHeadModel.from_pretrained(directory).to(rt.device).eval()

        def generate(count):
            with torch.no_grad(), rt.autocast():
                out = hf.generate(prompt, attention_mask=torch.ones_like(prompt), do_sample=False, use_cache=True,
                                  max_new_tokens=count or n, min_new_tokens=count or n, pad_token_id=50256)
            return out[0, prompt.size(1):]

        outputs["transformers"], seconds = timed(rt, generate)
        results["transformers_tokens_per_sec"] = n / seconds
        results["same_tokens_as_transformers"] = torch.equal(outputs["transformers"], outputs["kv_cache"])
    results["same_tokens_with_and_without_cache"] = torch.equal(outputs["kv_cache"], outputs["no_cache"])
    results["params"] = model.num_params()
    results["prompt_tokens"], results["new_tokens"] = args.prompt_tokens, n
    return results


def main(argv=None):
    args = build_parser().parse_args(argv)
    try:
        if args.steps <= 0 or args.warmup < 0 or args.prompt_tokens <= 0 or args.new_tokens <= 0:
            raise train.TrainError("--steps, --prompt_tokens and --new_tokens must be positive, --warmup not negative")
        train.check_args(args)
        cfg = train.model_config(args)
        world_size = int(train.os.environ.get("WORLD_SIZE", 1))
        accum_steps = train.batch_geometry(args, cfg, world_size)
        rt = train.setup_runtime(args.device, args.dtype)
        if args.sample:
            result = bench_decoding(args, rt, cfg)
        else:
            result = bench_training(args, rt, cfg, accum_steps)
    except (train.TrainError, train.DataError) as e:
        if train.os.environ.get("RANK", "0") == "0":
            print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    result = {"mode": "sample" if args.sample else "train", "model": args.init_from or args.model,
              "device": torch.cuda.get_device_name(rt.device) if rt.device_type == "cuda" else rt.device,
              "dtype": str(rt.dtype).removeprefix("torch."), "compile": args.compile, **result}
    if rt.master:
        width = max(len(k) for k in result)
        for key, value in result.items():
            print(f"{key:<{width}}  {value:,.4g}" if isinstance(value, float) else f"{key:<{width}}  {value}")
        print(json.dumps({k: round(v, 4) if isinstance(v, float) else v for k, v in result.items()}))
    if train.dist.is_initialized():
        train.dist.destroy_process_group()


if __name__ == "__main__":
    main()

"""
What a run measures of its device: the peak FLOP/s that MFU is measured against (a GPU's data sheet, or a matmul
timed on the spot), the memory a step needs (estimated from the model's shape, and measured: the most a step's
tensors hold), the tokens/s and MFU that train.py logs, and whether a text fits text mode's tokenizing in memory.

    speed = Throughput(rt, step)    # each step speed.count(tokens, step_flops(per_token, loader, step)); read to log
    need = sum(memory_estimate(config, tokens, shards, activation_checkpointing).values())   # before a run
    peak = peak_memory_bytes(lambda: step(), rt, resident=weights)   # bench.py, tests
"""

import contextlib
import json
import os
import platform
import sys
import time

import torch

from files import DataError, WriteError, write_atomically


def peak_flops(rt, measure_again=False):
    """The device's peak FLOP/s in the run's dtype: MFU's denominator. A GPU's data sheet where it is known, else a
    matmul's best, measured once per machine and kept in PEAK_FLOPS_CACHE: a figure measured anew in every run moved
    2x from run to run on a shared machine (another job's load in the moment it was taken), and MFU with it.
    measure_again: measure anyway, and keep the higher of the two (a cached peak that a run's own steps exceed was
    taken while the machine was busy)."""
    if rt.device_type == "cuda" and rt.dtype != torch.float32:
        flops = gpu_peak_flops(torch.cuda.get_device_name(rt.device))
        if flops:
            return flops
    key = device_key(rt)
    cache = read_peak_cache()
    if key in cache and not measure_again:
        return cache[key]
    cache[key] = max(cache.get(key, 0.0), measured_matmul_flops(rt))
    try:
        os.makedirs(os.path.dirname(PEAK_FLOPS_CACHE), exist_ok=True)
        write_atomically(PEAK_FLOPS_CACHE, lambda f: f.write(json.dumps(cache, indent=1).encode()))
    except (OSError, WriteError):
        pass  # a read-only home: measured in each run instead
    return cache[key]


# The measured peaks, by device_key: ~/.cache/gpt2-train/peak_flops.json (or under $XDG_CACHE_HOME). Delete it to
# measure again, e.g. after moving a disk to another machine of the same name.
PEAK_FLOPS_CACHE = os.path.join(os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "gpt2-train",
                                "peak_flops.json")


def device_key(rt):
    """What a measured peak belongs to: the processor's name, the threads a process uses, the dtype, PyTorch."""
    if rt.device_type == "cuda":
        name = torch.cuda.get_device_name(rt.device)
    else:
        name = cpu_name()
        if rt.device_type == "cpu":
            name += f", {torch.get_num_threads()} threads"
    return f"{rt.device_type}: {name}, {str(rt.dtype).removeprefix('torch.')}, torch {torch.__version__}"


def cpu_name():
    """The processor's model name (Linux's /proc/cpuinfo), else what the platform module says."""
    try:
        with open("/proc/cpuinfo") as f:
            return next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        return platform.processor() or platform.machine()


def read_peak_cache():
    try:
        with open(PEAK_FLOPS_CACHE) as f:
            cache = json.load(f)
        return {k: v for k, v in cache.items() if isinstance(v, float) and v > 0}
    except (OSError, ValueError, AttributeError, RecursionError):  # none yet, or damaged: measured anew
        return {}


# Dense bf16/fp16 tensor-core peaks in FLOP/s, from the vendors' data sheets, by the words of the model's name as
# CUDA reports it ("NVIDIA A100-SXM4-80GB": NVIDIA, A100, SXM4, 80GB), first match first: whole words, so an L40
# is not taken for an L4. MFU is measured against these; other devices and dtypes get a peak measured on the spot.
GPU_PEAK_FLOPS = {("H100", "PCIe"): 756e12, ("H100", "NVL"): 835e12, ("H100",): 989e12, ("H200",): 989e12,
                  ("A100",): 312e12, ("L40S",): 362e12, ("L40",): 181e12, ("L4",): 121e12, ("RTX", "4090"): 165e12,
                  ("RTX", "3090"): 71e12, ("V100",): 125e12, ("T4",): 65e12}


def gpu_peak_flops(name):
    """The data sheet's peak of the GPU called `name`, or None for a GPU not in GPU_PEAK_FLOPS."""
    words = set(name.replace("-", " ").split())
    return next((flops for model, flops in GPU_PEAK_FLOPS.items() if words.issuperset(model)), None)


def measured_matmul_flops(rt):
    """FLOP/s of the largest square matmul that takes ~50 ms (up to 2048 on a CPU, 8192 on a GPU), in the run's
    dtype: what the device really sustains, e.g. a CPU with bf16 units against one that emulates bf16. The best of
    twenty products in four rounds a few milliseconds apart: the peak is what the device can do, not what it did in
    one moment of a shared machine."""
    n, largest = 256, 2048 if rt.device_type == "cpu" else 8192

    def seconds():
        rt.synchronize()
        t0 = time.perf_counter()
        torch.mm(a, a, out=out)
        rt.synchronize()
        return time.perf_counter() - t0

    # its own generator: the global one draws the run's dropout masks, and whether the peak is measured in a run
    # (the cache is empty, or the run beat it) must not change its losses
    generator = torch.Generator(rt.device).manual_seed(0)
    while True:
        a = torch.randn(n, n, device=rt.device, generator=generator).to(rt.dtype)
        out = torch.mm(a, a)  # warm-up; then into the same output, so no allocation is timed
        best = min(seconds() for _ in range(5))
        if best > 0.05 or n >= largest:
            break
        n *= 2
    for _ in range(3):
        time.sleep(0.01)
        best = min(best, *(seconds() for _ in range(5)))
    return 2 * n**3 / best


def memory_estimate(cfg, tokens, shards, activation_checkpointing, accumulating=False, low_precision=True,
                    adapters=None):
    """Bytes a rank needs for a training step of GPT cfg on `tokens` tokens a micro-step, its weights, gradients
    and AdamW state split `shards` ways (1: DDP or one GPU; the processes for FSDP), by part. fp32 weights and
    optimizer (4 + 4 bytes a parameter, the gradient 4 more; FSDP accumulating over micro-steps without syncing
    keeps the whole gradient unsharded in fp32 until the last one, 4 bytes a parameter more). Activations per token
    and layer, as the autograd graph keeps them under bf16 autocast: the block's input and LayerNorm inputs in fp32
    (4d + 4d), the bf16 inputs of the four matmuls (2d + 2d + 2d + 8d), q, k, v (6d), the MLP's pre-GELU (8d): 38d
    bytes, or in fp32 64d; with activation checkpointing only each block's fp32 input (4d) stays, and one block's
    at a time is rebuilt. The loss holds the logits and their softmax at once: 6 bytes a logit in fp16 (the softmax
    in fp32), counted for bf16 too, where it is 4 (the softmax kept in bf16: model.softmax_float32); 8 in fp32.
    Under autocast each weight also has a bf16 copy for the step (2 bytes a parameter); FSDP instead gathers two
    blocks and the root at a time. The parts never all peak at once: their sum is an upper bound (also under Muon,
    which keeps one moment of the blocks' matrices where AdamW keeps two).
    adapters: LoRA's case, that many adapter parameters (lora.adapter_count) trained on a frozen base, one copy a
    rank (train.py refuses FSDP with LoRA): the blocks' matrices kept in the compute dtype (lora.cast_base), the
    rest of the base in fp32, no gradient or optimizer state but the adapters'; the weight copies are the
    adapters' and the tied head's (a frozen weight's cast is not cached, but the head's is kept for backward). The
    activations are counted as for full training, an upper bound (a frozen matmul keeps no input for a weight
    gradient; the adapters' own, rank numbers a token, are negligible)."""
    d, L, V, P = cfg.n_embd, cfg.n_layer, cfg.vocab_size, param_count(cfg)
    per_layer = 38 * d if low_precision else 64 * d
    gathered_bytes = 2 if low_precision else 4
    if shards > 1:  # FSDP's gathered units: two blocks (one computing, one prefetched) and the root
        block = 12 * d * d + 13 * d
        copies = (2 * block + (V + cfg.block_size) * d) * gathered_bytes
    else:
        copies = 2 * P if low_precision else 0
    activations = tokens * L * per_layer
    if activation_checkpointing:
        activations = tokens * L * 4 * d + tokens * per_layer
    gradients = 4 * P / shards + (4 * P if shards > 1 and accumulating else 0)
    loss = tokens * V * (6 if low_precision else 8)
    if adapters is not None:
        matrices = 12 * d * d * L
        base = matrices * (2 if low_precision else 4) + (P - matrices) * 4
        copies = (V * d + adapters) * 2 if low_precision else 0
        return {"weights": base + 4 * adapters, "gradients": 4 * adapters, "optimizer": 8 * adapters,
                "weight copies": copies, "activations": activations, "loss": loss}
    return {"weights": 4 * P / shards, "gradients": gradients, "optimizer": 8 * P / shards,
            "weight copies": copies, "activations": activations, "loss": loss}


def param_count(cfg):
    """GPT(cfg).num_params(), without building it: embeddings, then per block 12d^2 weights and 13d biases and
    gains, then the final LayerNorm."""
    d = cfg.n_embd
    return (cfg.vocab_size + cfg.block_size) * d + cfg.n_layer * (12 * d * d + 13 * d) + 2 * d


def device_memory_bytes(rt):
    """The memory one process may fill: its GPU's, or on a CPU the machine's shared by the node's processes (None
    where it is not known)."""
    if rt.device_type == "cuda":
        return torch.cuda.get_device_properties(rt.device).total_memory
    total = physical_memory_bytes() if rt.device_type == "cpu" else None
    return None if total is None else total // int(os.environ.get("LOCAL_WORLD_SIZE", 1))


def physical_memory_bytes():
    """This machine's memory, or None where the operating system doesn't say (Windows)."""
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (AttributeError, ValueError, OSError):
        return None


def peak_memory_bytes(fn, rt, resident=()):
    """fn() run once, and the most memory that tensors held at any moment of it: what sizes a batch to a device.
    On a GPU, CUDA's allocator counts every tensor. On a CPU, PyTorch's profiler sees each allocation and free made
    during fn (slow, so for one step), and the tensors that exist before it are the `resident` ones (the weights,
    gradients and optimizer state; each storage counted once). Not the process's resident memory, which also holds
    the Python runtime, the libraries, and freed memory kept for reuse."""
    if rt.device_type == "cuda":
        rt.synchronize()
        torch.cuda.reset_peak_memory_stats(rt.device)
        fn()
        rt.synchronize()
        return torch.cuda.max_memory_allocated(rt.device)
    from torch._C._profiler import _EventType
    from torch.profiler import ProfilerActivity, profile

    before = sum({t.untyped_storage().data_ptr(): t.untyped_storage().nbytes() for t in resident}.values())
    profiler = profile(activities=[ProfilerActivity.CPU], profile_memory=True)
    with native_stderr_silenced():  # some builds print a line as the profiler starts and stops
        profiler.start()
    try:
        fn()
    finally:
        with native_stderr_silenced():
            profiler.stop()
    events, allocations = list(profiler.profiler.kineto_results.experimental_event_tree()), []
    while events:  # the tree of calls, walked for its allocations: bytes allocated since the start, after each one
        event = events.pop()
        events.extend(event.children)
        if event.tag == _EventType.Allocation and event.extra_fields.device.type == "cpu":
            allocations.append((event.start_time_ns, event.extra_fields.total_allocated))
    return before + max([0] + [total for _, total in sorted(allocations)])


@contextlib.contextmanager
def native_stderr_silenced():
    """What C++ code writes to stderr (file descriptor 2) in the block goes nowhere."""
    sys.stderr.flush()
    saved = os.dup(2)
    with open(os.devnull, "w") as devnull:
        os.dup2(devnull.fileno(), 2)
    try:
        yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)


def token_flops(model, seq_len):
    """(a token's training FLOPs through the blocks, a target's through the output layer besides): the per-token
    figures step_flops multiplies, taken from the model's modules once per run, not once per step."""
    blocks = model.flops_per_token(seq_len, output_layer=False)
    return blocks, model.flops_per_token(seq_len) - blocks


def step_flops(per_token, loader, step):
    """The model FLOPs (forward + backward) of training step `step` (0-based) of all ranks: MFU's numerator. Every
    token of data through the blocks, and the output layer only at the targets, the only rows the loss needs (on a
    CPU GPT.forward skips the others). Padding is no model work: an example costs the same packed or padded, so the
    MFU of a faster layout is higher. Text: every token a target; then it is flops_per_token * tokens, as nanoGPT's.
    Attention is counted at seq_len positions for every token (flops_per_token's convention): for examples shorter
    than seq_len, more than they attend to. per_token: token_flops(model, seq_len)."""
    blocks, output_layer = per_token
    return blocks * loader.tokens_in_step("train", step) + output_layer * loader.targets_in_step("train", step)


class Throughput:
    """Tokens/s, time per step and MFU (model FLOPs utilisation: the steps' step_flops a second over the peak of all
    the ranks' devices) over the steps since the last reading, for train.py's log. The peak is measured at the first
    reading, when the device is warm (as bench.py does), or read from the cache (peak_flops), and the time that takes
    is not counted. A peak measured while something else used the machine (a shared CPU) is too low, and the steps
    once it is free would show an MFU over 100%: then it is measured again, once, the higher kept."""

    def __init__(self, rt, step):
        self.rt, self.peak, self.measured_again = rt, None, False
        self.seconds_per_step = 0.0  # over the steps of the last reading
        self.run_seconds, self.run_steps = 0.0, 0  # over every reading: the time left, which must not jump about
        self.restart(step)

    @property
    def mean_seconds_per_step(self):
        return self.run_seconds / max(self.run_steps, 1)

    def restart(self, step):
        self.time, self.step, self.tokens, self.flops = time.perf_counter(), step, 0, 0

    def count(self, tokens, flops):
        """A step's: the tokens fed (padding included) and its step_flops."""
        self.tokens, self.flops = self.tokens + tokens, self.flops + flops

    def read(self, step):
        seconds = time.perf_counter() - self.time
        self.seconds_per_step = seconds / (step - self.step)
        self.run_seconds, self.run_steps = self.run_seconds + seconds, self.run_steps + step - self.step
        tokens_per_sec = self.tokens / seconds
        flops = self.flops / seconds / self.rt.world_size  # one device's a second
        if self.peak is None:
            self.peak = peak_flops(self.rt)
        elif flops > self.peak and not self.measured_again:
            self.measured_again = True  # once: the matmul's peak may be below what a step reaches
            self.peak = max(self.peak, peak_flops(self.rt, measure_again=True))
        self.restart(step)
        mfu = flops / self.peak
        return {"tokens_per_sec": round(tokens_per_sec, 1), "mfu": round(mfu, 4)}


# Tokenizing holds the file's bytes, its text and a Python int per token (about 0.25 a byte, 36 bytes each).
TOKENIZING_BYTES_PER_TEXT_BYTE = 12


def check_text_fits_in_memory(path):
    """Text mode reads and tokenizes the whole file in every process: a file that would fill over half of the
    machine's memory so is refused, with the way that scales (prepare.py's shards), instead of running out of it."""
    memory = physical_memory_bytes()
    if memory is None or not os.path.isfile(path):
        return  # no way to tell here; a missing file is read_text's to report
    processes = int(os.environ.get("LOCAL_WORLD_SIZE", 1))
    size = os.path.getsize(path)
    needed = size * TOKENIZING_BYTES_PER_TEXT_BYTE * processes
    if needed > memory / 2:
        raise DataError(f"{path} is {size / 1e9:.1f} GB: too big for text mode, which tokenizes all of it in each of "
                        f"the {processes} process(es) here ({needed / 1e9:.0f} GB in all, over half of this machine's "
                        f"{memory / 1e9:.0f} GB); write token shards once with `python prepare.py {path} --out_dir "
                        f"DIR` and train with --dataset_type shards --dataset_path DIR")

"""
What a run measures of its device: the peak FLOP/s that MFU is measured against (a GPU's data sheet, or a matmul
timed on the spot), the most memory a step's tensors hold, and the tokens/s and MFU that train.py logs.

    speed = Throughput(model.flops_per_token(seq_len), rt, step)    # then speed.count(tokens), speed.read(step)
    peak = peak_memory_bytes(lambda: step(), rt, resident=weights)   # bench.py, tests
"""

import contextlib
import os
import sys
import time

import torch


def peak_flops(rt):
    """The device's peak FLOP/s in the run's dtype: MFU's denominator."""
    if rt.device_type == "cuda" and rt.dtype != torch.float32:
        flops = gpu_peak_flops(torch.cuda.get_device_name(rt.device))
        if flops:
            return flops
    return measured_matmul_flops(rt)


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
    dtype: what the device really sustains, e.g. a CPU with bf16 units against one that emulates bf16."""
    n, largest = 256, 2048 if rt.device_type == "cpu" else 8192
    while True:
        a = torch.randn(n, n, device=rt.device).to(rt.dtype)
        out = torch.mm(a, a)  # warm-up; then into the same output, so no allocation is timed
        best = float("inf")
        for _ in range(5):  # the best of five: the peak is what the device can do, not what it did once
            rt.synchronize()
            t0 = time.perf_counter()
            torch.mm(a, a, out=out)
            rt.synchronize()
            best = min(best, time.perf_counter() - t0)
        if best > 0.05 or n >= largest:
            return 2 * n**3 / best
        n *= 2


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


class Throughput:
    """Tokens/s, time per step and MFU (model FLOPs utilisation: flops_per_token * tokens/s over the peak of all
    the ranks' devices) over the steps since the last reading, for train.py's log. The peak is measured once, at
    the first reading, when the device is warm (as bench.py does), and the time that takes is not counted."""

    def __init__(self, flops_per_token, rt, step):
        self.flops_per_token, self.rt, self.peak = flops_per_token, rt, None
        self.seconds_per_step = 0.0
        self.restart(step)

    def restart(self, step):
        self.time, self.step, self.tokens = time.perf_counter(), step, 0

    def count(self, tokens):
        self.tokens += tokens

    def read(self, step):
        seconds = time.perf_counter() - self.time
        self.seconds_per_step = seconds / (step - self.step)
        tokens_per_sec = self.tokens / seconds
        if self.peak is None:
            self.peak = peak_flops(self.rt)
        self.restart(step)
        mfu = self.flops_per_token * tokens_per_sec / (self.peak * self.rt.world_size)
        return {"tokens_per_sec": round(tokens_per_sec, 1), "mfu": round(mfu, 4)}

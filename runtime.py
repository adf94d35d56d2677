"""
Where and how the math runs: the device, the autocast dtype, the processes of a torchrun job and what passes between
them. What a run measures of the device (peak FLOP/s, peak memory, throughput) is measure.py's, the model's wrapping
for several processes parallel.py's, the optimizers optim.py's, the command-line conventions cli.py's.

    rt = setup_runtime("auto", "auto")          # the device, the dtype, and the process group under torchrun
    with rt.autocast():
        logits, loss = model(*rt.to_device(batch))
    loss_all_ranks = rt.all_reduce_mean(loss.detach())
"""

import contextlib
import ctypes
import dataclasses
import datetime
import functools
import gc
import os
import time

import torch
import torch.distributed as dist

from cli import UserError, first_line


@dataclasses.dataclass
class Runtime:
    device: str  # "cpu", "cuda:3", "mps"
    device_type: str  # "cpu", "cuda", "mps": what autocast and the optimizer ask about
    dtype: torch.dtype  # the autocast dtype; float32 means no autocast
    rank: int = 0
    local_rank: int = 0
    world_size: int = 1

    @property
    def ddp(self):
        return self.world_size > 1

    @property
    def master(self):  # only rank 0 prints and writes files
        return self.rank == 0

    @functools.cached_property
    def native_bf16(self):
        """Whether the device multiplies bf16 matrices natively, faster than fp32: GPUs since Ampere, CPUs with bf16
        units (AMX, AVX512-BF16, Arm's BF16). Elsewhere bf16 is emulated, many times slower. On a CPU the ranks time
        it separately, and agree on bf16 only if all of them found it faster."""
        if self.device_type == "cuda":
            return torch.cuda.is_bf16_supported(including_emulation=False)
        if self.device_type == "cpu":
            return not self.any_rank(not cpu_bf16_is_faster())
        return False

    def autocast(self):
        if self.dtype == torch.float32:
            return contextlib.nullcontext()
        return torch.autocast(self.device_type, dtype=self.dtype)

    def grad_scaler(self):
        """fp16 has a narrow range: the scaler multiplies the loss so that small gradients don't underflow, and
        divides them back before the optimizer step. Other dtypes need none (a disabled scaler passes through)."""
        return torch.amp.GradScaler(self.device_type, enabled=self.dtype == torch.float16)

    def to_device(self, batch):
        """A loader's batch (x, y, positions) on the device (positions may be None). To a GPU from pinned memory,
        without waiting: the copy overlaps the previous kernels instead of stalling the host."""
        if self.device_type == "cuda":
            return tuple(t if t is None else t.pin_memory().to(self.device, non_blocking=True) for t in batch)
        return tuple(t if t is None else t.to(self.device) for t in batch)

    def all_reduce_sum(self, t):
        """t summed over the ranks, in place (t itself in a single process)."""
        if self.ddp:
            dist.all_reduce(t, op=dist.ReduceOp.SUM)
        return t

    def all_reduce_mean(self, t):
        return self.all_reduce_sum(t) / self.world_size  # gloo has no AVG: sum, then divide

    def gather(self, value):
        """A number from every rank, in rank order ([value] outside torchrun); a CPU tensor, over gloo."""
        if not self.ddp:
            return [value]
        everyone = [torch.zeros(1, dtype=torch.float64) for _ in range(self.world_size)]
        dist.all_gather(everyone, torch.tensor([float(value)], dtype=torch.float64))
        return [t.item() for t in everyone]

    def any_rank(self, flag):
        """Whether flag is true on any rank: how the ranks agree to stop at the same step. A CPU tensor, which
        goes over gloo: a GPU tensor would make the host wait for the step's kernels."""
        if not self.ddp:
            return bool(flag)
        t = torch.tensor([int(bool(flag))], dtype=torch.int32)
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
        return bool(t.item())

    def synchronize(self):
        """Wait for the device's queued work (GPUs run asynchronously): before and after anything that is timed."""
        if self.device_type == "cuda":
            torch.cuda.synchronize(self.device)



# How long a process waits for the others (a collective, or connecting at the start) before it fails instead of
# hanging: long enough for rank 0 to write gpt2-xl's checkpoint while the others wait at the next step.
DIST_TIMEOUT = datetime.timedelta(minutes=10)
CONNECT_FAILURE_WAIT_SECONDS = 5  # see join_job


def join_job():
    """Under torchrun (RANK is set): join the job's process group, once, bound to this process's GPU if there are
    GPUs. setup_runtime does it; train.py does it earlier, before reading a checkpoint that some nodes may not see,
    so that every rank fails alike instead of some waiting forever for the others."""
    if "RANK" not in os.environ or dist.is_initialized():
        return
    # gloo moves CPU tensors (the stop flag, CPU training); NCCL moves CUDA tensors (the gradients) GPU to GPU
    backend = "gloo"
    if torch.cuda.is_available():
        gpus = torch.cuda.device_count()
        torch.cuda.set_device(int(os.environ["LOCAL_RANK"]) % gpus)
        if int(os.environ.get("LOCAL_WORLD_SIZE", os.environ["WORLD_SIZE"])) <= gpus:
            backend = "cpu:gloo,cuda:nccl"
        # else processes share a GPU (testing the multi-process logic on one GPU): NCCL refuses that, gloo copes
    try:
        dist.init_process_group(backend=backend, timeout=DIST_TIMEOUT)
    except Exception as e:  # DistNetworkError, DistBackendError, RuntimeError: whatever the transport raises
        # torchrun stops every worker once one fails: if rank 0 failed too, its line must come out before this rank
        # ends the job; if rank 0 is still waiting (only this node misconfigured), this rank's line is the only one
        other_rank = os.environ["RANK"] != "0"
        if other_rank:
            time.sleep(CONNECT_FAILURE_WAIT_SECONDS)
        local_first = os.environ.get("LOCAL_RANK", "0") == "0"  # (one line a node, not one a process)
        raise UserError(f"process {os.environ['RANK']} could not connect to the job's other processes "
                        f"({first_line(e)}); "
                        f"on several nodes, set GLOO_SOCKET_IFNAME and NCCL_SOCKET_IFNAME to the network interface "
                        f"that joins them (README.md, several nodes)", from_this_rank=other_rank and local_first)


def setup_runtime(device="auto", dtype="auto"):
    """Pick the device and autocast dtype, and join the process group when launched by torchrun (RANK is set)."""
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "mps" if torch.backends.mps.is_available() else "cpu"
    if device == "cuda" and not torch.cuda.is_available():
        raise UserError("--device cuda: no CUDA GPU is visible to PyTorch; use --device cpu")
    if device == "mps" and not torch.backends.mps.is_available():
        raise UserError("--device mps: MPS is not available on this machine; use --device cpu")
    rt = Runtime(device=device, device_type=device, dtype=torch.float32)
    if device == "cpu":
        keep_freed_memory()
    if "RANK" in os.environ:  # launched by torchrun
        join_job()
        rt.rank, rt.local_rank, rt.world_size = (int(os.environ[k]) for k in ("RANK", "LOCAL_RANK", "WORLD_SIZE"))
    if device == "cuda":
        rt.device = f"cuda:{torch.cuda.current_device()}"  # join_job's choice under torchrun
        torch.backends.cuda.matmul.allow_tf32 = True  # fp32 matmuls (outside autocast) on tensor cores
        torch.backends.cudnn.allow_tf32 = True
    rt.native_bf16  # (measured here, where every rank is: a CPU's ranks agree on it)
    rt.dtype = getattr(torch, auto_dtype(rt) if dtype == "auto" else dtype)
    return rt


def auto_dtype(rt):
    """--dtype auto: the fastest dtype the device runs natively. GPUs without native bf16 (V100s and T4s emulate it
    slowly) do better in fp16 with a scaler."""
    if rt.device_type == "cuda":
        return "bfloat16" if rt.native_bf16 else "float16"
    return "bfloat16" if rt.native_bf16 else "float32"


def agrees_with_rank0(values):
    """Whether these few integers are the same on every rank as on rank 0 (True outside torchrun): e.g. whether
    every node sees the file rank 0 sees. A collective: every rank calls it."""
    if not dist.is_initialized():
        return True
    mine = torch.tensor(values, dtype=torch.int64)
    rank0 = mine.clone()
    dist.broadcast(rank0, src=0)  # CPU tensors: over gloo
    differs = torch.tensor([int(not torch.equal(mine, rank0))], dtype=torch.int32)
    dist.all_reduce(differs, op=dist.ReduceOp.MAX)
    return not differs.item()


def shutdown():
    """Leave the process group, if this process joined one: the last thing a script does under torchrun, once the
    run's objects are gone. A DDP module that outlives the group (collected only when the interpreter exits) can
    abort the process on its way out, so what is left of them is collected first."""
    if dist.is_initialized():
        gc.collect()
        dist.destroy_process_group()



# Set to bfloat16 or float32, this environment variable decides what --dtype auto picks on a CPU instead of the
# measurement below: how the test suite (`pytest --auto-dtype ...`) runs as it would on a CPU of the other kind.
FORCE_AUTO_DTYPE = "GPT2_TEST_AUTO_DTYPE"


def cpu_bf16_is_faster():
    """Whether this CPU multiplies bf16 matrices clearly faster than fp32. CPUs with bf16 units (AMX, AVX512-BF16,
    Arm's BF16) run it several times faster; without them PyTorch emulates it, many times slower. Flags don't tell
    reliably across operating systems and architectures, so time it: a few milliseconds, once per run. The best of
    several products, after two that prepare the kernels: one slow moment of a shared machine must not decide."""
    a = torch.randn(256, 256)

    def seconds(x, give_up_after):
        x @ x
        x @ x
        best = float("inf")
        for _ in range(5):
            t0 = time.perf_counter()
            x @ x
            best = min(best, time.perf_counter() - t0)
            if best > give_up_after:  # several times slower even at its best: emulated, no need to wait for more
                break
        return best

    forced = os.environ.get(FORCE_AUTO_DTYPE)
    if forced:  # the test suite's `--auto-dtype`: run on any CPU as on one of the other kind
        return forced == "bfloat16"
    fp32 = seconds(a, float("inf"))
    return seconds(a.bfloat16(), 4 * fp32) * 1.5 < fp32


def signal_on_parent_death(signum):
    """Have the kernel send this process signum when its parent dies (Linux's PR_SET_PDEATHSIG): how a torchrun
    worker learns that its launcher was killed. Elsewhere nothing happens (train.py also checks its parent's pid)."""
    try:
        PR_SET_PDEATHSIG = 1
        ctypes.CDLL("libc.so.6").prctl(PR_SET_PDEATHSIG, int(signum), 0, 0, 0)
    except (OSError, AttributeError):
        pass


def keep_freed_memory():
    """glibc hands each freed block of more than 32 MB back to the operating system, so a training step's large
    tensors (the (rows, vocab) logits and softmax: 200 MB each at 4 x 256 tokens) come back as fresh pages that the
    kernel must fault in and zero, every step: a large part of a small model's step on a CPU. Raising malloc's
    mmap and trim thresholds keeps that memory in the process for reuse. Not glibc (macOS, musl): nothing to do."""
    try:
        libc = ctypes.CDLL("libc.so.6")
        M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3
        libc.mallopt(M_MMAP_THRESHOLD, 1 << 30)
        libc.mallopt(M_TRIM_THRESHOLD, (1 << 31) - 1)
    except (OSError, AttributeError):
        pass

"""
The GPU check: what only a CUDA GPU can show, in a few minutes on one GPU. Opt-in, skipped without CUDA:

    python -m pytest -m cuda -s        # -s prints bench.py's figures

Run with an 80 GB GPU in mind (gpt2-xl's benchmark); everything else fits a 24 GB one.
"""

import json
import math
import os
import subprocess
import sys

import pytest
import torch
from torch.nn.attention import SDPBackend, sdpa_kernel

import train
from conftest import REPO
from model import GPT, preset_config
from options import make_loader, resolve
from parallel import build_training
from runtime import setup_runtime
from step import get_lr, train_step

pytestmark = [pytest.mark.cuda, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]

GPT2_STEP = ["--model", "gpt2", "--batch_size", "8", "--seq_len", "1024", "--total_batch_size", str(2 * 8 * 1024),
             "--device", "cuda"]


def training_setup(flags, compile=False):
    """What train.setup builds, for steps called one at a time: (train_step's arguments but the step)."""
    opts = resolve(["--dataset_path", os.path.join(REPO, "input.txt"), "--out_dir", "/nonexistent/out", *flags])
    args = opts.args
    rt = setup_runtime(args.device, args.dtype)
    loader = make_loader(args, opts.accum_steps)
    torch.manual_seed(args.seed)
    model, optimizer, scaler = build_training(GPT(opts.cfg), rt, weight_decay=args.weight_decay, lr=args.max_lr,
                                              betas=(args.beta1, args.beta2), compile=compile)
    return model, optimizer, scaler, loader, opts.accum_steps, rt, args


def steps(setup, numbers):
    model, optimizer, scaler, loader, accum_steps, rt, args = setup
    return [train_step(model, optimizer, scaler, loader, step, accum_steps, rt, lr=get_lr(step, args), seed=args.seed,
                       grad_clip=args.grad_clip)[0] for step in numbers]


@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
def test_a_gpt2_training_step_never_waits_for_the_gpu(dtype):
    # float16 runs with a GradScaler, whose inf checks must stay on the GPU too (the fused AdamW takes them)
    if dtype == "bfloat16" and not torch.cuda.is_bf16_supported(including_emulation=False):
        pytest.skip("this GPU has no native bf16")
    setup = training_setup([*GPT2_STEP, "--dtype", dtype])
    steps(setup, [1])  # the first step initialises cuBLAS and the allocator
    torch.cuda.set_sync_debug_mode("error")  # any host-device sync raises
    try:
        losses = steps(setup, [2, 3])
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert all(torch.isfinite(loss) for loss in losses)


@pytest.mark.parametrize("preset", ["gpt2", "gpt2-xl", "gpt2-micro"])
def test_attention_runs_the_flash_kernel_on_the_presets_shapes(preset):
    cfg = preset_config(preset)
    head = GPT(preset_config(preset, n_layer=1)).cuda().transformer.h[0].attn
    x = torch.randn(2, cfg.block_size, cfg.n_embd, device="cuda", requires_grad=True)
    with sdpa_kernel(SDPBackend.FLASH_ATTENTION), torch.autocast("cuda", dtype=torch.bfloat16):
        head(x).sum().backward()  # raises if flash attention cannot take these shapes
    assert x.grad is not None and torch.isfinite(x.grad).all()


def test_compiled_and_eager_steps_agree_within_bf16():
    eager = steps(training_setup([*GPT2_STEP, "--dtype", "bfloat16"]), [1, 2, 3])
    compiled = steps(training_setup([*GPT2_STEP, "--dtype", "bfloat16"], compile=True), [1, 2, 3])
    assert [loss.item() for loss in compiled] == pytest.approx([loss.item() for loss in eager], rel=2e-2)


def run(*cmd, env=None):
    result = subprocess.run([sys.executable, *cmd], cwd=REPO, capture_output=True, text=True, timeout=600,
                            env={**os.environ, **(env or {})})
    assert result.returncode == 0, result.stderr
    return result.stdout


def read_losses(out_dir):
    with open(os.path.join(out_dir, "metrics.jsonl")) as f:
        return [json.loads(line)["loss"] for line in f]


def test_train_resume_eval_and_sample_on_the_gpu(tmp_path):
    flags = ["--model", "gpt2-micro", "--device", "cuda", "--log_interval", "1", "--sample_tokens", "0"]
    run("train.py", *flags, "--max_steps", "6", "--out_dir", str(tmp_path / "whole"))
    run("train.py", *flags, "--max_steps", "3", "--out_dir", str(tmp_path / "split"))
    run("train.py", "--resume", "--max_steps", "6", "--out_dir", str(tmp_path / "split"))
    # GPU kernels may sum in another order from run to run: equal within rounding, not to the bit
    assert read_losses(tmp_path / "split") == pytest.approx(read_losses(tmp_path / "whole"), rel=1e-3)
    evaluation = json.loads(run("eval.py", "--init_from", str(tmp_path / "split"), "--device", "cuda").strip()
                            .splitlines()[-1])
    assert evaluation["val_loss"] < math.log(50257)  # better than a uniform guess, after 6 steps
    assert run("sample.py", "--init_from", str(tmp_path / "split"), "--device", "cuda", "--max_new_tokens", "20",
               "--prompt", "ROMEO:").strip()


def test_two_processes_on_one_gpu_equal_one_process_with_double_accumulation(tmp_path):
    # NCCL refuses two processes on one GPU; with more processes than GPUs the runtime joins them over gloo,
    # which carries CUDA tensors through the host: the multi-process logic, checked on one GPU
    flags = ["--model", "gpt2-micro", "--device", "cuda", "--dtype", "float32", "--max_steps", "4", "--batch_size",
             "2", "--total_batch_size", str(4 * 2 * 256), "--log_interval", "1", "--sample_tokens", "0"]
    run("train.py", *flags, "--out_dir", str(tmp_path / "one"))
    run("-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "train.py", *flags, "--out_dir",
        str(tmp_path / "two"))
    assert read_losses(tmp_path / "two") == pytest.approx(read_losses(tmp_path / "one"), rel=1e-4)


@pytest.mark.parametrize("flags", [
    ["--model", "gpt2", "--batch_size", "16", "--seq_len", "1024"],
    ["--model", "gpt2", "--batch_size", "16", "--seq_len", "1024", "--compile"],
    ["--model", "gpt2-xl", "--batch_size", "8", "--seq_len", "1024"],  # 80 GB
], ids=["gpt2-eager", "gpt2-compiled", "gpt2-xl"])
def test_bench_figures(flags):
    figures = json.loads(run("bench.py", *flags, "--device", "cuda", "--steps", "10").strip().splitlines()[-1])
    print("\n" + json.dumps(figures))  # for README.md's GPU table
    assert figures["dtype"] in ("bfloat16", "float16") and 0 < figures["mfu"] < 1


def test_running_out_of_gpu_memory_is_one_line_with_the_advice(tmp_path, capsys, monkeypatch):
    # past the estimate's check (an upper bound, so close calls run): the GPU's own out-of-memory error
    monkeypatch.setattr(train, "check_memory", lambda *args: None)
    with pytest.raises(SystemExit) as exit_info:
        train.main(["--model", "gpt2", "--batch_size", "2048", "--seq_len", "1024", "--device", "cuda",
                    "--dataset_path", os.path.join(REPO, "input.txt"), "--out_dir", str(tmp_path), "--max_steps", "1"])
    err = capsys.readouterr().err
    assert exit_info.value.code == 2 and err.count("\n") == 1
    assert err.startswith("error: out of GPU memory") and "lower --batch_size" in err


def test_packed_rows_on_the_gpu_run_varlen_flash_attention_with_each_example_s_losses(monkeypatch):
    import model as model_module

    calls = []
    varlen = model_module.VARLEN_ATTENTION
    monkeypatch.setattr(model_module, "VARLEN_ATTENTION", lambda *a, **k: calls.append(1) or varlen(*a, **k))
    torch.manual_seed(0)
    model = GPT(preset_config("gpt2-nano", block_size=64)).cuda()
    lengths = [20, 9, 35, 30, 40, 24]
    examples = [torch.randint(0, 50257, (n,), device="cuda") for n in lengths]
    rows = [[0, 1, 3], [2, 4], [5]]  # examples back to back, each row padded to 64 with its own segment
    idx = torch.zeros(3, 64, dtype=torch.long, device="cuda")
    positions = torch.zeros_like(idx)
    for r, row in enumerate(rows):
        start = 0
        for i in row:
            idx[r, start : start + lengths[i]], positions[r, start : start + lengths[i]] = examples[i], \
                torch.arange(lengths[i])
            start += lengths[i]
        positions[r, start:] = torch.arange(64 - start)
    with torch.autocast("cuda", torch.bfloat16):
        _, packed = model(idx, idx, loss_reduction="none", positions=positions)
        assert calls  # the variable-length kernel, not the mask
        for r, row in enumerate(rows):
            start = 0
            for i in row:
                _, alone = model(examples[i][None], examples[i][None], loss_reduction="none")
                torch.testing.assert_close(packed[r, start : start + lengths[i]], alone[0], atol=0.05, rtol=0.02)
                start += lengths[i]

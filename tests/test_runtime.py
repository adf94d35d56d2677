import pytest
import torch

import runtime


@pytest.mark.parametrize("bf16_faster, expected", [(True, torch.bfloat16), (False, torch.float32)])
def test_auto_dtype_on_cpu_follows_the_measured_matmul_speed(monkeypatch, bf16_faster, expected):
    monkeypatch.delenv(runtime.FORCE_AUTO_DTYPE, raising=False)  # (pytest --auto-dtype)
    assert isinstance(runtime.cpu_bf16_is_faster(), bool)  # the real measurement runs on any CPU
    monkeypatch.setattr(runtime, "cpu_bf16_is_faster", lambda: bf16_faster)
    rt = runtime.setup_runtime("cpu", "auto")
    assert rt.dtype == expected
    with rt.autocast():
        assert (torch.ones(2, 2) @ torch.ones(2, 2)).dtype == expected  # matmuls run in the chosen dtype


@pytest.mark.parametrize("forced", ["bfloat16", "float32"])
def test_the_suite_can_force_what_auto_picks_on_a_cpu(monkeypatch, forced):
    monkeypatch.setenv(runtime.FORCE_AUTO_DTYPE, forced)
    assert runtime.setup_runtime("cpu", "auto").dtype == getattr(torch, forced)


def test_a_grad_scaler_only_under_float16():
    for dtype, enabled in [(torch.float16, True), (torch.bfloat16, False), (torch.float32, False)]:
        assert runtime.Runtime("cpu", "cpu", dtype).grad_scaler().is_enabled() == enabled


def test_auto_dtype_on_a_gpu_that_only_emulates_bf16_is_float16(monkeypatch):
    # a V100 or T4: torch.cuda.is_bf16_supported() says yes by default, counting emulation
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda including_emulation=True: including_emulation)
    assert runtime.auto_dtype(runtime.Runtime("cuda:0", "cuda", torch.float32)) == "float16"
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda including_emulation=True: True)  # Ampere on
    assert runtime.auto_dtype(runtime.Runtime("cuda:0", "cuda", torch.float32)) == "bfloat16"

import pytest
import torch

import runtime


@pytest.mark.parametrize("bf16_faster, expected", [(True, torch.bfloat16), (False, torch.float32)])
def test_auto_dtype_on_cpu_follows_the_measured_matmul_speed(monkeypatch, bf16_faster, expected):
    assert isinstance(runtime.cpu_bf16_is_faster(), bool)  # the real measurement runs on any CPU
    monkeypatch.setattr(runtime, "cpu_bf16_is_faster", lambda: bf16_faster)
    rt = runtime.setup_runtime("cpu", "auto")
    assert rt.dtype == expected
    with rt.autocast():
        assert (torch.ones(2, 2) @ torch.ones(2, 2)).dtype == expected  # matmuls run in the chosen dtype


def test_a_grad_scaler_only_under_float16():
    for dtype, enabled in [(torch.float16, True), (torch.bfloat16, False), (torch.float32, False)]:
        assert runtime.Runtime("cpu", "cpu", dtype).grad_scaler().is_enabled() == enabled


def test_auto_dtype_on_a_gpu_that_only_emulates_bf16_is_float16(monkeypatch):
    # a V100 or T4: torch.cuda.is_bf16_supported() says yes by default, counting emulation
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda including_emulation=True: including_emulation)
    assert runtime.auto_dtype(runtime.Runtime("cuda:0", "cuda", torch.float32)) == "float16"
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda including_emulation=True: True)  # Ampere on
    assert runtime.auto_dtype(runtime.Runtime("cuda:0", "cuda", torch.float32)) == "bfloat16"


@pytest.mark.parametrize("name, flops", [("NVIDIA L4", 121e12), ("NVIDIA L40", 181e12), ("NVIDIA L40S", 362e12),
                                         ("NVIDIA H100 80GB HBM3", 989e12), ("NVIDIA H100 PCIe", 756e12),
                                         ("NVIDIA A100-SXM4-80GB", 312e12), ("Tesla T4", 65e12),
                                         ("NVIDIA GeForce RTX 4090", 165e12), ("NVIDIA GH200 480GB", None)])
def test_known_gpus_are_matched_by_whole_words_of_their_name(name, flops):
    assert runtime.gpu_peak_flops(name) == flops  # None: not in the table, its peak is measured


def test_peak_memory_counts_the_tensors_alive_at_the_worst_moment():
    rt = runtime.Runtime("cpu", "cpu", torch.float32)
    kept = torch.zeros(1_000_000)  # 4 MB that exist before and after: the weights of a training step

    def work():
        a = torch.ones(2_000_000)  # 8 MB
        b = a + 1  # 8 MB more: 20 MB with `kept`, the peak
        del a, b
        return torch.ones(1_000_000)  # 4 MB, after the peak has passed

    peak = runtime.peak_memory_bytes(work, rt, resident=[kept, kept[:10]])  # a view shares its storage
    assert 20_000_000 <= peak < 20_000_100  # (and a few bytes of scalars)



import pytest
import torch

import measure
from measure import gpu_peak_flops, peak_memory_bytes
from runtime import Runtime


@pytest.mark.parametrize("name, flops", [("NVIDIA L4", 121e12), ("NVIDIA L40", 181e12), ("NVIDIA L40S", 362e12),
                                         ("NVIDIA H100 80GB HBM3", 989e12), ("NVIDIA H100 PCIe", 756e12),
                                         ("NVIDIA A100-SXM4-80GB", 312e12), ("Tesla T4", 65e12),
                                         ("NVIDIA GeForce RTX 4090", 165e12), ("NVIDIA GH200 480GB", None)])
def test_known_gpus_are_matched_by_whole_words_of_their_name(name, flops):
    assert gpu_peak_flops(name) == flops  # None: not in the table, its peak is measured


def test_peak_memory_counts_the_tensors_alive_at_the_worst_moment():
    rt = Runtime("cpu", "cpu", torch.float32)
    kept = torch.zeros(1_000_000)  # 4 MB that exist before and after: the weights of a training step

    def work():
        a = torch.ones(2_000_000)  # 8 MB
        b = a + 1  # 8 MB more: 20 MB with `kept`, the peak
        del a, b
        return torch.ones(1_000_000)  # 4 MB, after the peak has passed

    peak = peak_memory_bytes(work, rt, resident=[kept, kept[:10]])  # a view shares its storage
    assert 20_000_000 <= peak < 20_000_100  # (and a few bytes of scalars)


def test_a_peak_measured_on_a_busy_machine_is_measured_again_rather_than_report_an_mfu_over_100(monkeypatch):
    peaks = iter([1e9, 4e9])  # busy at the first reading (another job on the CPU), free later
    monkeypatch.setattr(measure, "peak_flops", lambda rt: next(peaks))
    speed = measure.Throughput(flops_per_token=1e6, rt=Runtime("cpu", "cpu", torch.float32), step=0)
    clock = iter([0.0, 1.0, 1.0, 2.0, 2.0, 3.0, 3.0])  # a second a step (the peak's measurements not counted)
    monkeypatch.setattr(measure.time, "perf_counter", lambda: next(clock))
    speed.restart(0)
    speed.count(500)  # 500 tokens/s: 0.5e9 FLOP/s
    assert speed.read(1)["mfu"] == 0.5
    speed.count(2000)  # 2e9 FLOP/s, twice the first peak: measured again
    assert speed.read(2)["mfu"] == 0.5 and speed.peak == 4e9
    # once only: where a step beats the matmul's peak, measuring it at every log (a second each) would not help
    speed.count(8000)
    assert speed.read(3)["mfu"] == 2.0

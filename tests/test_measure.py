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
    monkeypatch.setattr(measure, "peak_flops", lambda rt, measure_again=False: next(peaks))
    speed = measure.Throughput(rt=Runtime("cpu", "cpu", torch.float32), step=0)
    clock = iter([0.0, 1.0, 1.0, 2.0, 2.0, 3.0, 3.0])  # a second a step (the peak's measurements not counted)
    monkeypatch.setattr(measure.time, "perf_counter", lambda: next(clock))
    speed.restart(0)
    speed.count(500, 0.5e9)  # 0.5e9 FLOP/s
    assert speed.read(1)["mfu"] == 0.5
    speed.count(2000, 2e9)  # 2e9 FLOP/s, twice the first peak: measured again
    assert speed.read(2)["mfu"] == 0.5 and speed.peak == 4e9
    # once only: where a step beats the matmul's peak, measuring it at every log (a second each) would not help
    speed.count(8000, 8e9)
    assert speed.read(3)["mfu"] == 2.0


def test_a_measured_peak_is_kept_per_machine_and_dtype_so_mfu_does_not_move_from_run_to_run(monkeypatch, tmp_path):
    monkeypatch.setattr(measure, "PEAK_FLOPS_CACHE", str(tmp_path / "cache" / "peak_flops.json"))
    measured = iter([1e12, 3e12, 2e12, 5e12])  # a shared machine's readings: they move from one moment to the next
    monkeypatch.setattr(measure, "measured_matmul_flops", lambda rt: next(measured))
    fp32, bf16 = Runtime("cpu", "cpu", torch.float32), Runtime("cpu", "cpu", torch.bfloat16)
    assert measure.peak_flops(fp32) == 1e12
    assert measure.peak_flops(fp32) == 1e12  # the next run: read back, not measured
    assert measure.peak_flops(bf16) == 3e12  # another dtype, another peak
    assert measure.peak_flops(fp32, measure_again=True) == 2e12  # measured again: the higher kept
    assert measure.peak_flops(fp32) == 2e12
    (tmp_path / "cache" / "peak_flops.json").write_text("{not json")  # damaged: measured anew
    assert measure.peak_flops(fp32) == 5e12


def test_the_matmul_peak_is_a_real_measurement_that_leaves_the_random_numbers_of_the_run_alone():
    # train.py measures the peak at its first log when the cache has none (or again when a step beats it): drawing
    # its matrices from the global generator would change the run's later dropout masks, so the same command would
    # train differently on a machine that had measured its peak before and on one that had not
    state = torch.get_rng_state()
    flops = measure.measured_matmul_flops(Runtime("cpu", "cpu", torch.float32))
    assert 1e9 < flops < 1e14  # a CPU's fp32: between a GFLOP/s and 100 TFLOP/s
    assert torch.equal(torch.get_rng_state(), state)

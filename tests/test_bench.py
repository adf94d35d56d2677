import contextlib
import io
import json
import os
import subprocess
import sys

import pytest

import bench
import measure
import step
from conftest import REPO

NANO = ["--model", "gpt2-nano", "--device", "cpu", "--dtype", "float32", "--optimizer", "adamw"]


def run_bench(*flags):
    """bench.py's JSON line, run in this process (a failure is an exception, or its one-line error's exit)."""
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        bench.main([*NANO, *flags])
    return json.loads(out.getvalue().strip().splitlines()[-1])


def test_training_benchmark_reports_speed_mfu_and_memory_as_a_json_line(small_text):
    result = run_bench("--dataset_path", small_text, "--seq_len", "32", "--batch_size", "2", "--steps", "2",
                       "--warmup", "1")
    assert result["mode"] == "train" and result["tokens_per_step"] == 64 and result["dtype"] == "float32"
    assert result["tokens_per_sec"] > 0 and 0 < result["mfu"] < 1 and result["peak_memory_gb"] > 0
    assert result["tokens_per_sec"] == pytest.approx(64 / (result["ms_per_step"] / 1000), rel=1e-3)
    # the step's two parts: forward and backward, then the optimizer (its share shows what Muon costs)
    assert 0 < result["optimizer_ms"] < result["ms_per_step"] and 0 < result["forward_backward_ms"]
    assert result["forward_backward_ms"] + result["optimizer_ms"] == pytest.approx(result["ms_per_step"], rel=0.1)


def test_the_training_benchmark_times_the_trainer_s_own_step(small_text, monkeypatch):
    # step.train_step, as train.py's loop calls it: a change to the step changes what is measured
    calls = []
    real = bench.train_step
    assert real is step.train_step

    def counted(*args, **kwargs):
        calls.append(args[4])  # the step's number
        return real(*args, **kwargs)

    monkeypatch.setattr(bench, "train_step", counted)
    result = run_bench("--dataset_path", small_text, "--seq_len", "32", "--batch_size", "2", "--steps", "2",
                       "--warmup", "1")
    assert calls == [1, 2, 3, 4] and result["tokens_per_step"] == 64  # warm-up, 2 timed, 1 for the peak memory
    assert result["padding_share"] == 0  # windows of text are full


def test_profile_prints_the_operators_that_take_the_timed_steps_longest(small_text):
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        bench.main([*NANO, "--dataset_path", small_text, "--seq_len", "32", "--batch_size", "2", "--steps", "2",
                    "--warmup", "1", "--profile", "5"])
    lines = out.getvalue().strip().splitlines()
    rules = [i for i, line in enumerate(lines) if set(line) <= {"-", " "} and line]  # the table's horizontal rules
    rows = lines[rules[1] + 1 : rules[2]]
    assert len(rows) == 5 and any("aten::" in row for row in rows)  # the step's operators, the longest first
    assert json.loads(lines[-1])["mode"] == "train"  # the figures still end with their JSON line


@pytest.mark.parametrize("flags, why", [
    (["--attention", "--chat"], "four benchmarks: give one"),
    (["--sample", "--profile", "3"], "--profile profiles training steps: leave out --sample")])
def test_flags_of_two_benchmarks_at_once_are_refused_in_one_line(flags, why, capsys):
    with pytest.raises(SystemExit) as exit_info:
        bench.main([*NANO, *flags])
    err = capsys.readouterr().err
    assert exit_info.value.code == 2 and err.count("\n") == 1 and err.startswith("error: ") and why in err, err


def test_decoding_benchmark_checks_the_cache_against_no_cache_and_transformers():
    pytest.importorskip("transformers")
    result = run_bench("--sample", "--prompt_tokens", "8", "--new_tokens", "8")
    assert result["mode"] == "sample" and result["kv_cache_tokens_per_sec"] > 0
    assert result["same_tokens_with_and_without_cache"] and result["same_tokens_as_transformers"]


def test_checkpoint_benchmark_times_saving_loading_and_the_checksum():
    result = run_bench("--checkpoint")
    assert result["mode"] == "checkpoint" and result["params"] > 0
    for key in ("save_seconds", "load_seconds", "load_unverified_seconds", "checksum_seconds", "checkpoint_gb"):
        assert result[key] > 0, key
    assert result["checkpoint_gb"] > 3 * 4 * result["params"] / 1e9  # the weights and AdamW's two moments


def test_attention_benchmark_times_the_kernel_in_the_run_s_dtype_and_in_float32_at_the_model_s_shape():
    result = run_bench("--attention", "--dtype", "bfloat16", "--batch_size", "2", "--seq_len", "32", "--steps", "1")
    assert result["mode"] == "attention" and result["dtype"] == "bfloat16"
    assert result["shape"] == [2, 2, 32, 16]  # (batch, heads, positions, head size) of gpt2-nano
    assert result["dtype_ms"] > 0 and result["float32_ms"] > 0


@pytest.mark.slow
def test_under_torchrun_padding_and_tokens_are_the_whole_job_s():
    # the same global batch of Alpaca examples, 8 a step: one process, and two ranks of 4 (each packs its own rows)
    flags = ["--dataset_type", "alpaca", "--dataset_path", os.path.join(REPO, "alpaca_sample.json"), "--seq_len", "128",
             "--steps", "2", "--warmup", "1"]
    alone = run_bench(*flags, "--batch_size", "8")
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2"]
    result = subprocess.run([*torchrun, "bench.py", *NANO, *flags, "--batch_size", "4"], cwd=REPO, capture_output=True,
                            text=True, timeout=240, env=dict(os.environ, OMP_NUM_THREADS="1"))
    assert result.returncode == 0, result.stderr
    job = json.loads(result.stdout.strip().splitlines()[-1])

    def data_tokens_per_step(figures):  # what no padding fills: the examples' tokens, all ranks'
        return (1 - figures["padding_share"]) * figures["tokens_per_sec"] * figures["ms_per_step"] / 1000

    assert 0 < job["padding_share"] < 1 and 0 < job["mfu"] < 1
    assert data_tokens_per_step(job) == pytest.approx(data_tokens_per_step(alone), rel=1e-3)


@pytest.mark.slow
def test_under_torchrun_fsdp_holds_half_of_ddp_s_weights_gradients_and_optimizer_state_per_rank(small_text):
    flags = ["bench.py", *NANO, "--dataset_path", small_text, "--seq_len", "32", "--batch_size", "2", "--steps", "1",
             "--warmup", "1"]
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2"]
    figures = {}
    for name, extra in [("ddp", []), ("fsdp", ["--fsdp"])]:
        result = subprocess.run([*torchrun, *flags, *extra], cwd=REPO, capture_output=True, text=True, timeout=240,
                                env=dict(os.environ, OMP_NUM_THREADS="1"))
        assert result.returncode == 0, result.stderr
        figures[name] = json.loads(result.stdout.strip().splitlines()[-1])
    ddp, fsdp = figures["ddp"], figures["fsdp"]
    assert len(fsdp["state_memory_gb_per_rank"]) == 2
    for ddp_rank, fsdp_rank in zip(ddp["state_memory_gb_per_rank"], fsdp["state_memory_gb_per_rank"]):
        assert fsdp_rank == pytest.approx(ddp_rank / 2, rel=0.05)
    assert max(fsdp["peak_memory_gb_per_rank"]) < min(ddp["peak_memory_gb_per_rank"])


@pytest.mark.slow
def test_activation_checkpointing_lowers_the_peak_memory_of_a_step(small_text):
    # a shape whose block activations are a fair part of the step (the output layer's logits are the rest)
    flags = ["--dataset_path", small_text, "--n_layer", "4", "--n_embd", "128", "--n_head", "4", "--seq_len", "64",
             "--batch_size", "8", "--steps", "1", "--warmup", "1"]
    plain = run_bench(*flags)
    checkpointed = run_bench(*flags, "--activation_checkpointing")
    assert checkpointed["state_memory_gb_per_rank"] == plain["state_memory_gb_per_rank"]
    assert checkpointed["peak_memory_gb"] < plain["peak_memory_gb"]


@pytest.mark.parametrize("preset, params", [("gpt2", 124_439_808), ("gpt2-xl", 1_557_611_200), ("gpt2-nano", None)])
def test_the_memory_estimate_counts_the_parameters_without_building_the_model(preset, params):
    cfg = bench.preset_config(preset)
    assert measure.param_count(cfg) == (params or bench.GPT(cfg).num_params())


def test_the_memory_estimate_of_weights_gradients_and_optimizer_state_is_what_a_step_holds(small_text):
    result = run_bench("--dataset_path", small_text, "--seq_len", "32", "--batch_size", "2", "--steps", "1")
    parts = measure.memory_estimate(bench.preset_config("gpt2-nano"), 2 * 32, 1, False, low_precision=False)
    estimate = (parts["weights"] + parts["gradients"] + parts["optimizer"]) / 1e9
    assert result["state_memory_gb_per_rank"] == [pytest.approx(estimate, abs=1e-4)]
    assert result["peak_memory_gb"] <= result["estimated_memory_gb"]  # the parts' sum bounds the peak


def test_memory_table_prints_every_gpt2_size_under_ddp_fsdp_and_checkpointing(capsys):
    bench.main(["--memory_table", "8", "--batch_size", "8"])
    rows = [line for line in capsys.readouterr().out.splitlines() if line.startswith("| gpt2")]
    assert [row.split(" | ")[0] for row in rows] == ["| gpt2", "| gpt2-medium", "| gpt2-large", "| gpt2-xl"]
    totals = [float(cell.split("**")[1]) for cell in rows[-1].split(" | ")[1:]]  # gpt2-xl: DDP, FSDP, FSDP + AC
    assert totals[0] > totals[1] > totals[2]


def test_chat_benchmark_prefills_only_each_turn_s_new_tokens_with_the_kept_cache_and_gives_the_same_replies():
    result = run_bench("--chat", "--turns", "3", "--reply_tokens", "4", "--seq_len", "128")
    kept, again = result["kept_cache_fed"], result["prefill_all_fed"]
    assert result["mode"] == "chat" and kept[0] == again[0] and max(kept[1:]) < kept[0] < again[1] < again[2]
    assert len(result["kept_cache_prefill_ms"]) == 3 and result["same_replies"]

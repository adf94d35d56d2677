import json
import subprocess
import sys

import pytest

from conftest import REPO

NANO = ["--model", "gpt2-nano", "--device", "cpu", "--dtype", "float32"]


def run_bench(*flags):
    result = subprocess.run([sys.executable, "bench.py", *NANO, *flags], cwd=REPO, capture_output=True, text=True,
                            timeout=120)
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout.strip().splitlines()[-1])


def test_training_benchmark_reports_speed_mfu_and_memory_as_a_json_line(small_text):
    result = run_bench("--dataset_path", small_text, "--seq_len", "32", "--batch_size", "2", "--steps", "2",
                       "--warmup", "1")
    assert result["mode"] == "train" and result["tokens_per_step"] == 64 and result["dtype"] == "float32"
    assert result["tokens_per_sec"] > 0 and 0 < result["mfu"] < 1 and result["peak_memory_gb"] > 0
    assert result["tokens_per_sec"] == pytest.approx(64 / (result["ms_per_step"] / 1000), rel=1e-3)


def test_decoding_benchmark_checks_the_cache_against_no_cache_and_transformers():
    pytest.importorskip("transformers")
    result = run_bench("--sample", "--prompt_tokens", "8", "--new_tokens", "8")
    assert result["mode"] == "sample" and result["kv_cache_tokens_per_sec"] > 0
    assert result["same_tokens_with_and_without_cache"] and result["same_tokens_as_transformers"]

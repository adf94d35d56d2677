"""What the tests share: the repo, a small text, and train.py run on a tiny model."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)
SHARED = os.path.join(os.path.dirname(REPO), "shared")


def pytest_addoption(parser):
    parser.addoption("--auto-dtype", choices=["bfloat16", "float32"], help="what --dtype auto picks on this CPU, for "
                     "every test (in process and in the scripts it launches) instead of the speed measurement: the "
                     "suite as it runs on a CPU of the other kind (bf16 units, or AVX2 only)")


def pytest_configure(config):
    forced = config.getoption("--auto-dtype")
    if forced:
        os.environ["GPT2_TEST_AUTO_DTYPE"] = forced  # (runtime.FORCE_AUTO_DTYPE; inherited by subprocesses)
    config.addinivalue_line("markers", "slow: minutes-long end-to-end checks; run with `pytest -m slow`")
    config.addinivalue_line("markers", "cuda: the GPU check, minutes on one CUDA GPU; run with `pytest -m cuda`")


@pytest.fixture
def small_text(tmp_path):
    """The first 20,000 characters of Tiny Shakespeare (about 5,600 tokens) in a fresh folder."""
    with open(os.path.join(REPO, "input.txt"), encoding="utf-8") as f:
        text = f.read(20_000)
    path = tmp_path / "small.txt"
    path.write_text(text, encoding="utf-8")
    return str(path)


# ----------------------------------------------------------------------------------------------------------------
# train.py, run as the tests run it: in process (train.main) or as a script (torchrun too), on a tiny model.

TINY = ["--model", "gpt2-nano", "--batch_size", "4", "--seq_len", "32", "--warmup_steps", "2", "--max_lr", "3e-3",
        "--log_interval", "1", "--eval_interval", "3", "--eval_steps", "2", "--sample_tokens", "0",
        "--device", "cpu", "--dtype", "float32", "--optimizer", "adamw"]
TORCHRUN = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2"]


def run_train(dataset, out_dir, *flags):
    import train

    train.main(["--dataset_path", dataset, "--out_dir", str(out_dir), *TINY, *flags])
    return read_metrics(out_dir)


def run_script(*cmd, torchrun=False):
    env = dict(os.environ, OMP_NUM_THREADS="1")
    result = subprocess.run([*(TORCHRUN if torchrun else [sys.executable]), *cmd], cwd=REPO, capture_output=True,
                            text=True, env=env, timeout=300)
    assert result.returncode == 0, result.stderr
    return result


def read_metrics(out_dir):
    with open(os.path.join(out_dir, "metrics.jsonl")) as f:
        return [json.loads(line) for line in f]


def losses(records):
    return [r["loss"] for r in records]


def without_model_flag(flags):
    i = flags.index("--model")
    return flags[:i] + flags[i + 2 :]


def write_alpaca(path, n, output=lambda i: f"Answer number {i} is {i * 7 % 13}."):
    words = ["apple", "river", "stone", "cloud", "music", "paper", "light", "green", "quiet", "seven"]
    records = [{"instruction": f"Say something about {words[i % 10]} and {words[i * 3 % 10]} ({i}).",
                "input": f"context {i}" if i % 3 == 0 else "", "output": output(i)} for i in range(n)]
    path.write_text(json.dumps(records))
    return str(path)


def write_chat(path, n, reply=lambda i: f"Reply {i} is {i * 7 % 13}.", seed=0):
    """n conversations of two exchanges, in OpenAI's format; the user turns are random words."""
    rng = np.random.default_rng(seed)
    words = ["apple", "river", "stone", "cloud", "music", "paper", "light", "green", "quiet", "seven", "north",
             "glass", "ember", "tiger", "salt", "wheel"]
    def user():
        return " ".join(rng.choice(words, 6))
    records = [{"messages": [{"role": "system", "content": "Answer briefly."},
                             {"role": "user", "content": user()}, {"role": "assistant", "content": reply(i)},
                             {"role": "user", "content": user()}, {"role": "assistant", "content": reply(i + 1)}]}
               for i in range(n)]
    path.write_text(json.dumps(records))
    return str(path)

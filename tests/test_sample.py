import argparse
import io
import subprocess
import sys

import pytest
import torch

import sample
from checkpoint import save_checkpoint
from conftest import REPO
from data import EOT_TOKEN, alpaca_prompt, get_tokenizer
from model import GPT, GPTConfig


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    """A small random model saved as train.py saves it: sampling needs weights, not good ones."""
    torch.manual_seed(0)
    model = GPT(GPTConfig(n_layer=2, n_head=2, n_embd=32, block_size=32))
    path = tmp_path_factory.mktemp("run") / "ckpt.pt"
    save_checkpoint(str(path), model, torch.optim.AdamW(model.parameters()), torch.amp.GradScaler("cpu", enabled=False),
                    1, argparse.Namespace())
    return model.eval(), str(path)


def run_sample(capsys, *flags):
    sample.main(["--device", "cpu", "--dtype", "float32", *flags])
    return capsys.readouterr().out


def test_greedy_sample_prints_the_prompt_and_generate_s_tokens_up_to_endoftext(checkpoint, capsys):
    model, path = checkpoint
    out = run_sample(capsys, "--init_from", path, "--prompt", "ROMEO:", "--temperature", "0",
                     "--max_new_tokens", "60")  # past the context of 32: the window slides
    tokenizer = get_tokenizer()
    prompt = tokenizer.encode_ordinary("ROMEO:")
    expected = model.generate(torch.tensor([prompt]), 60, temperature=0, stop_token=EOT_TOKEN)[0, len(prompt):]
    expected = expected.tolist()
    expected = expected[: expected.index(EOT_TOKEN)] if EOT_TOKEN in expected else expected
    assert out == "ROMEO:" + tokenizer.decode(expected) + "\n"


def test_samples_are_reproducible_with_a_seed_and_differ_between_seeds(checkpoint, capsys):
    _, path = checkpoint
    flags = ["--init_from", path, "--max_new_tokens", "20", "--num_samples", "2", "--top_p", "0.95"]
    first = run_sample(capsys, *flags, "--seed", "1")
    assert first == run_sample(capsys, *flags, "--seed", "1")
    assert first != run_sample(capsys, *flags, "--seed", "2")
    assert first.count("-" * 80) == 1  # two samples, one separator


def test_the_prompt_can_come_from_a_file_or_stdin(checkpoint, capsys, tmp_path, monkeypatch):
    _, path = checkpoint
    flags = ["--init_from", path, "--temperature", "0", "--max_new_tokens", "10"]
    direct = run_sample(capsys, *flags, "--prompt", "JULIET:\nO Romeo")
    (tmp_path / "prompt.txt").write_text("JULIET:\nO Romeo", encoding="utf-8")
    assert run_sample(capsys, *flags, "--prompt", f"FILE:{tmp_path / 'prompt.txt'}") == direct
    monkeypatch.setattr(sys, "stdin", io.StringIO("JULIET:\nO Romeo"))
    assert run_sample(capsys, *flags, "--prompt", "-") == direct


@pytest.mark.parametrize("flags, message", [
    (["--init_from", "/nonexistent/run"], "no such file or directory"),
    (["--prompt", "FILE:/nonexistent/prompt.txt"], "cannot read the prompt file"),
    (["--top_p", "0"], "argument --top_p: must be a number in (0, 1], got 0"),
    (["--temperature", "nan"], "argument --temperature: must be a number, 0 or more, got nan"),
    (["--instruction", "Add.", "--prompt", "x"], "exclude each other"),
])
def test_bad_options_get_one_line_without_a_traceback(checkpoint, flags, message):
    _, path = checkpoint
    result = subprocess.run([sys.executable, "sample.py", "--init_from", path, "--device", "cpu", *flags],
                            cwd=REPO, capture_output=True, text=True)
    assert result.returncode == 2
    assert len(result.stderr.strip().splitlines()) == 1 and message in result.stderr, result.stderr


def test_instruction_is_wrapped_in_the_alpaca_template_and_only_the_response_printed(checkpoint, capsys):
    _, path = checkpoint
    # the template alone is ~40 tokens: a model with room for it
    big = GPT(GPTConfig(n_layer=1, n_head=2, n_embd=16, block_size=128)).eval()
    save_checkpoint(path + ".big", big, torch.optim.AdamW(big.parameters()), torch.amp.GradScaler("cpu", enabled=False),
                    1, argparse.Namespace())
    out = run_sample(capsys, "--init_from", path + ".big", "--instruction", "Add the numbers.", "--input", "2, 3",
                     "--temperature", "0", "--max_new_tokens", "12")
    tokenizer = get_tokenizer()
    prompt = tokenizer.encode_ordinary(alpaca_prompt("Add the numbers.", "2, 3"))
    expected = big.generate(torch.tensor([prompt]), 12, temperature=0, stop_token=EOT_TOKEN)[0, len(prompt):].tolist()
    expected = expected[: expected.index(EOT_TOKEN)] if EOT_TOKEN in expected else expected
    assert out == tokenizer.decode(expected) + "\n"
    assert "### Response:" not in out

import argparse
import json
import os
import subprocess
import sys

import pytest
import torch

import checkpoint
import sample
from checkpoint import MetricsLog, load_checkpoint, load_model, save_checkpoint
from conftest import REPO
from model import GPT, GPTConfig
from cli import UserError
from parallel import build_training
from runtime import Runtime

# written by the code as it was before the checkpoint module existed (a 1-layer model after one AdamW step)
OLD_CHECKPOINT = os.path.join(os.path.dirname(__file__), "fixtures", "ckpt_before_issue_12.pt")


def small_model():
    torch.manual_seed(0)
    return GPT(GPTConfig(n_layer=1, n_head=2, n_embd=8, block_size=16, vocab_size=300))


def test_a_checkpoint_written_before_the_layout_change_still_loads_resumes_and_samples(capsys):
    saved = torch.load(OLD_CHECKPOINT, weights_only=True)
    model = load_model(OLD_CHECKPOINT)
    for name, tensor in saved["model"].items():
        assert torch.equal(model.state_dict()[name], tensor)
    assert model.lm_head.weight is model.transformer.wte.weight
    _, optimizer, _ = build_training(GPT(model.config), Runtime("cpu", "cpu", torch.float32), weight_decay=0.1,
                                     lr=1e-3, betas=(0.9, 0.95), state=saved)
    assert optimizer.state_dict()["state"][0]["exp_avg"].equal(saved["optimizer"]["state"][0]["exp_avg"])
    assert load_checkpoint(os.path.dirname(OLD_CHECKPOINT) + "/ckpt_before_issue_12.pt")["step"] == 1
    sample.main(["--init_from", OLD_CHECKPOINT, "--device", "cpu", "--dtype", "float32", "--max_new_tokens", "5"])
    assert capsys.readouterr().out.startswith("\n")  # the default prompt, then the sample


def test_a_save_killed_midway_leaves_the_previous_checkpoint_whole(tmp_path, monkeypatch):
    model = small_model()
    optimizer, scaler = torch.optim.AdamW(model.parameters()), torch.amp.GradScaler("cpu", enabled=False)
    path = str(tmp_path / "ckpt.pt")
    save_checkpoint(path, model, optimizer, scaler, 5, argparse.Namespace(seed=1))
    before = open(path, "rb").read()

    def save_then_die(state, file):
        file.write(b"half a checkpoint")
        raise KeyboardInterrupt

    monkeypatch.setattr(checkpoint.torch, "save", save_then_die)
    with pytest.raises(KeyboardInterrupt):
        save_checkpoint(path, model, optimizer, scaler, 6, argparse.Namespace(seed=1))
    assert open(path, "rb").read() == before and load_checkpoint(path)["step"] == 5
    assert os.listdir(tmp_path) == ["ckpt.pt"]  # and no half-written temporary left behind


@pytest.mark.parametrize("content", [b"not a checkpoint", None])
def test_a_damaged_or_missing_checkpoint_is_one_line_naming_the_file(tmp_path, content):
    path = tmp_path / "ckpt.pt"
    if content is not None:
        path.write_bytes(content)
    with pytest.raises(UserError, match="damaged" if content else "no checkpoint at") as error:
        load_checkpoint(str(tmp_path))  # an out_dir stands for its ckpt.pt
    assert str(path) in str(error.value) and "\n" not in str(error.value)


def test_resumed_metrics_drop_the_records_logged_after_the_checkpoint(tmp_path):
    path = str(tmp_path / "metrics.jsonl")
    with MetricsLog(path) as metrics:
        for step in (1, 2, 3, 4):
            metrics.write({"step": step, "loss": 5.0 - step})
    with open(path, "a") as f:
        f.write("[" * 50_000 + "]" * 50_000 + "\n")  # damage that Python's JSON parser cannot even read
        f.write('{"step": 5, "lo')  # a line cut short by a crash
    with MetricsLog(path, resume_step=2) as metrics:
        metrics.write({"step": 3, "loss": 1.5})
    assert metrics.file is None  # closed on leaving the block
    assert [json.loads(line) for line in open(path)] == [{"step": 1, "loss": 4.0}, {"step": 2, "loss": 3.0},
                                                          {"step": 3, "loss": 1.5}]


def write_altered_checkpoint(path, alter):
    model = small_model()
    save_checkpoint(path, model, torch.optim.AdamW(model.parameters()), torch.amp.GradScaler("cpu", enabled=False),
                    3, argparse.Namespace(seed=1))
    ckpt = torch.load(path, weights_only=True)
    alter(ckpt)
    torch.save(ckpt, path)
    return model


def drop(key):
    return lambda ckpt: ckpt["model_config"].pop(key)


FOREIGN_CHECKPOINTS = {  # what was altered -> None if it loads, else the one line's message
    "compiled model's names": (lambda c: c.update(model={"_orig_mod." + k: v for k, v in c["model"].items()}), None),
    "DDP module's names": (lambda c: c.update(model={"module." + k: v for k, v in c["model"].items()}), None),
    "a size missing from the config": (drop("n_layer"), None),
    "bias missing from the config": (drop("bias"), None),
    "heads missing from the config": (drop("n_head"), "does not say its number of heads"),
    "a field of another version": (lambda c: c["model_config"].update(rotary=True), r"does not know \(rotary\)"),
    "config contradicting the weights": (lambda c: c["model_config"].update(n_embd=16),
                                         "n_embd=16, its weights have 8"),
    "no config": (lambda c: c.update(model_config=None), "has no model config"),
    "a weight missing": (lambda c: c["model"].pop("transformer.h.0.mlp.c_fc.weight"), "do not fit its config"),
}


@pytest.mark.parametrize("case", FOREIGN_CHECKPOINTS)
def test_a_checkpoint_that_does_not_fit_loads_where_unambiguous_and_is_one_line_otherwise(case, tmp_path):
    alter, message = FOREIGN_CHECKPOINTS[case]
    path = str(tmp_path / "ckpt.pt")
    model = write_altered_checkpoint(path, alter)
    if message is None:
        loaded = load_model(path)
        for name, tensor in model.state_dict().items():
            assert torch.equal(loaded.state_dict()[name], tensor)
    else:
        with pytest.raises(UserError, match=message) as error:
            load_model(path)
        assert "\n" not in str(error.value)


def test_a_model_without_biases_loads_and_samples(tmp_path):
    model = GPT(GPTConfig(n_layer=1, n_head=2, n_embd=8, block_size=16, vocab_size=300, bias=False))
    path = str(tmp_path / "ckpt.pt")
    save_checkpoint(path, model, torch.optim.AdamW(model.parameters()), torch.amp.GradScaler("cpu", enabled=False),
                    1, argparse.Namespace(seed=1))
    loaded = load_model(path)
    assert not loaded.config.bias
    assert loaded.generate(torch.zeros(1, 1, dtype=torch.long), 4, temperature=0).shape == (1, 5)


@pytest.mark.parametrize("script", [["sample.py", "--max_new_tokens", "2"], ["eval.py", "--dataset_path", "none"],
                                    ["export.py"]])
def test_every_script_refuses_a_damaged_checkpoint_in_one_line(script, tmp_path):
    path = str(tmp_path / "ckpt.pt")
    write_altered_checkpoint(path, lambda c: c.update(model_config=None))
    extra = ["--out_dir", str(tmp_path / "hf")] if script[0] == "export.py" else []
    result = subprocess.run([sys.executable, script[0], "--init_from", path, *script[1:], *extra], cwd=REPO,
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 2 and result.stderr.count("\n") == 1 and "has no model config" in result.stderr

import argparse
import json
import importlib
import os

import pytest
import torch

import checkpoint
import sample
from checkpoint import MetricsLog, load_checkpoint, load_model, save_checkpoint
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


def write_checkpoint(path):
    model = small_model()
    save_checkpoint(path, model, torch.optim.AdamW(model.parameters()), torch.amp.GradScaler("cpu", enabled=False),
                    3, argparse.Namespace(seed=1))
    return model


def write_altered_checkpoint(path, alter):
    """A checkpoint as edited by hand or written by another tool: altered, and without the checksum."""
    model = write_checkpoint(path)
    ckpt = torch.load(path, weights_only=True)
    ckpt.pop(checkpoint.CHECKSUM, None)
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


def flip_a_byte_of_a_weight(path, name="transformer.h.0.mlp.c_fc.weight"):
    """Damage that torch.load does not see: one byte in the middle of a weight's data in the file (found by its
    bytes: torch.save stores each tensor's data uncompressed) inverted."""
    weight = torch.load(path, weights_only=True)["model"][name].numpy().tobytes()
    data = bytearray(open(path, "rb").read())
    at = data.find(weight)
    assert at >= 0 and data.find(weight, at + 1) < 0  # found, and only there
    data[at + len(weight) // 2] ^= 0xFF
    open(path, "wb").write(data)


DAMAGED = "is damaged: its tensors do not match the checksum written with them"


def test_a_checkpoint_with_a_byte_flipped_in_its_tensors_is_refused_in_one_line(tmp_path):
    path = str(tmp_path / "ckpt.pt")
    write_checkpoint(path)
    flip_a_byte_of_a_weight(path)
    for load in (load_checkpoint, load_model):
        with pytest.raises(UserError, match=DAMAGED) as error:
            load(path)
        assert str(error.value).startswith(f"checkpoint {path} is damaged") and "\n" not in str(error.value)
    assert load_checkpoint(path, verify=False)["step"] == 3  # a look at the config alone does not verify


def write_checkpoint_after_a_step(path):
    """A checkpoint whose optimizer has state (AdamW's moments): after one step."""
    model = small_model()
    optimizer = torch.optim.AdamW(model.parameters())
    idx = torch.zeros(1, 4, dtype=torch.long)
    model(idx, idx)[1].backward()
    optimizer.step()
    save_checkpoint(path, model, optimizer, torch.amp.GradScaler("cpu", enabled=False), 1, argparse.Namespace())


def test_a_checkpoint_with_the_previous_version_s_single_checksum_is_verified_whole(tmp_path):
    path = str(tmp_path / "ckpt.pt")
    write_checkpoint_after_a_step(path)
    state = torch.load(path, weights_only=True)
    state.pop(checkpoint.CHECKSUM)
    state[checkpoint.CHECKSUM] = checkpoint.checksum(state)  # as that version wrote it: one int over every tensor
    torch.save(state, path)
    assert load_model(path) is not None and load_checkpoint(path)["step"] == 1
    flip_a_byte_of_a_weight(path)
    with pytest.raises(UserError, match=DAMAGED):
        load_model(path)


def test_the_weights_alone_are_verified_where_they_alone_are_used_and_everything_on_resume(tmp_path):
    path = str(tmp_path / "ckpt.pt")
    write_checkpoint_after_a_step(path)
    state = torch.load(path, weights_only=True)
    state["optimizer"]["state"][0]["exp_avg"].view(-1)[0] += 1  # damage in the optimizer state only
    torch.save(state, path)
    load_model(path)  # sample.py, export.py, eval.py: the weights are sound, and the rest is not read
    with pytest.raises(UserError, match=DAMAGED):
        load_checkpoint(path)  # --resume reads (and verifies) everything


def test_a_saved_checkpoint_carries_the_checksum_of_its_tensors_and_loads_back_the_same(tmp_path):
    path = str(tmp_path / "ckpt.pt")
    write_checkpoint_after_a_step(str(tmp_path / "stepped.pt"))
    saved = torch.load(tmp_path / "stepped.pt", weights_only=True)
    crcs = saved.pop(checkpoint.CHECKSUM)
    assert crcs.keys() == saved.keys() and all(crc == checkpoint.checksum(saved[part]) for part, crc in crcs.items())
    assert crcs["model"] != 0 and crcs["optimizer"] != 0
    model = write_checkpoint(path)
    loaded = load_checkpoint(path, verify=True)
    for name, tensor in model.state_dict().items():
        assert torch.equal(loaded["model"][name], tensor)


def test_the_checksum_covers_every_tensor_whatever_its_dtype_and_the_order_the_dicts_were_built_in():
    state = {"b": [torch.ones(3, dtype=torch.bfloat16), (torch.tensor(2.0), torch.zeros(0))], "a": {1: torch.eye(2)},
             "step": 7, "config": {"lr": 1e-3}}
    reordered = {"step": 8, "config": {}, "a": {1: torch.eye(2)},  # other non-tensors: not covered
                 "b": [torch.ones(3, dtype=torch.bfloat16), (torch.tensor(2.0), torch.zeros(0))]}
    before = checkpoint.checksum(state)
    assert before == checkpoint.checksum(reordered)
    for tensor in (state["b"][0], state["b"][1][0], state["a"][1]):
        tensor.view(-1)[-1] += 1
        after = checkpoint.checksum(state)
        assert after != before
        before = after


def test_a_checkpoint_from_before_the_checksum_loads_with_nothing_printed(capfd):
    assert checkpoint.CHECKSUM not in torch.load(OLD_CHECKPOINT, weights_only=True)
    assert load_checkpoint(OLD_CHECKPOINT, verify=True)["step"] == 1
    load_model(OLD_CHECKPOINT)
    assert capfd.readouterr() == ("", "")


SCRIPT_DAMAGE = {  # how the checkpoint was damaged -> (the damage, what the one line says)
    "no model config": (lambda path: write_altered_checkpoint(path, lambda c: c.update(model_config=None)),
                        "has no model config"),
    "a byte flipped in a weight": (lambda path: (write_checkpoint(path), flip_a_byte_of_a_weight(path)), DAMAGED),
}


@pytest.mark.parametrize("damage", SCRIPT_DAMAGE)
@pytest.mark.parametrize("script", [["sample", "--max_new_tokens", "2"], ["eval", "--dataset_path", "none"],
                                    ["export"]])
def test_every_script_refuses_a_damaged_checkpoint_in_one_line(script, damage, tmp_path, capsys):
    path = str(tmp_path / "ckpt.pt")
    write_damaged, message = SCRIPT_DAMAGE[damage]
    write_damaged(path)
    extra = ["--out_dir", str(tmp_path / "hf")] if script[0] == "export" else []
    with pytest.raises(SystemExit) as exit_info:  # (any other exception, a traceback, fails the test)
        importlib.import_module(script[0]).main(["--init_from", path, *script[1:], *extra])
    err = capsys.readouterr().err
    assert exit_info.value.code == 2 and err.count("\n") == 1 and message in err, err
    assert not os.path.exists(tmp_path / "hf")  # (export.py: nothing written)


def test_resume_refuses_a_checkpoint_with_a_byte_flipped_and_leaves_it_as_it_was(small_text, tmp_path, capsys):
    import train

    train.main(["--out_dir", str(tmp_path), "--dataset_path", small_text, "--model", "gpt2-nano", "--batch_size", "2",
                "--seq_len", "32", "--max_steps", "1", "--eval_steps", "1", "--sample_tokens", "0", "--device", "cpu",
                "--dtype", "float32", "--optimizer", "adamw"])
    path = str(tmp_path / "ckpt.pt")
    flip_a_byte_of_a_weight(path)
    damaged = open(path, "rb").read()
    capsys.readouterr()
    with pytest.raises(SystemExit) as exit_info:  # on the damaged weights, it would train and save over them
        train.main(["--out_dir", str(tmp_path), "--resume", "--max_steps", "2"])
    err = capsys.readouterr().err
    assert exit_info.value.code == 2 and err.count("\n") == 1 and DAMAGED in err
    assert path in err and open(path, "rb").read() == damaged


def test_a_checkpoint_of_weights_that_are_not_finite_is_refused_by_every_loader(tmp_path, capsys):
    # what a diverged run saved with an earlier version: sample.py and eval.py would print NaN and exit 0
    model = small_model()
    with torch.no_grad():
        model.transformer.h[0].mlp.c_fc.weight[3, 1] = float("nan")
    path = str(tmp_path / "ckpt.pt")
    save_checkpoint(path, model, torch.optim.AdamW(model.parameters()), torch.amp.GradScaler("cpu", enabled=False),
                    1, argparse.Namespace(seed=1))
    with pytest.raises(UserError, match=r"not finite .* transformer.h.0.mlp.c_fc.weight.*: it was saved from a "
                                        r"diverged run") as error:
        load_model(path)
    assert "\n" not in str(error.value)
    for script in (["sample", "--init_from", path], ["eval", "--init_from", path, "--dataset_path", "none"]):
        with pytest.raises(SystemExit) as exit_info:
            importlib.import_module(script[0]).main([*script[1:], "--device", "cpu"])
        err = capsys.readouterr().err
        assert exit_info.value.code == 2 and err.count("\n") == 1 and "not finite" in err, err

"""
The training loop through train.main: what a run writes, gradient accumulation, resuming exactly (and across dtypes
and versions), the out_dir kept for one run, and what setup refuses in one line (data, out_dir, memory). The options'
resolution is tests/test_options.py's; the step itself tests/test_step.py's.
"""

import argparse
import ast
import json
import os
import shlex
import shutil
import subprocess
import sys
import time

import pytest
import torch

import prepare
import sample
import train
from conftest import REPO, TINY, losses, read_metrics, run_script, run_train
from model import GPT, GPTConfig
from parallel import build_training
from runtime import setup_runtime


def test_no_script_or_shared_module_imports_the_trainer():
    # the shared concerns live in their own files, so that the tools never depend on the training script
    for name in sorted(os.listdir(REPO)):
        if name.endswith(".py") and name != "train.py":
            tree = ast.parse(open(os.path.join(REPO, name), encoding="utf-8").read())
            imported = {alias.name for node in ast.walk(tree) if isinstance(node, ast.Import) for alias in node.names}
            imported |= {node.module for node in ast.walk(tree) if isinstance(node, ast.ImportFrom)}
            assert "train" not in imported, f"{name} imports train.py"


def test_a_run_writes_a_checkpoint_metrics_and_a_sample(small_text, tmp_path, capsys):
    records = run_train(small_text, tmp_path, "--max_steps", "6", "--sample_tokens", "5")
    assert [r["step"] for r in records] == [1, 2, 3, 4, 5, 6]
    for r in records:
        assert {"step", "loss", "lr", "grad_norm", "tokens_per_sec"} <= set(r)
    assert [r["step"] for r in records if "val_loss" in r] == [3, 6]
    assert records[-1]["loss"] < records[0]["loss"]
    ckpt = torch.load(tmp_path / "ckpt.pt", weights_only=True)
    assert ckpt["step"] == 6 and ckpt["config"]["model"] == "gpt2-nano"
    assert {"model", "optimizer", "scaler", "model_config"} <= set(ckpt)
    assert not any(k.startswith(("_orig_mod", "module")) for k in ckpt["model"])
    assert "-" * 80 in capsys.readouterr().out  # the sample's frame


def test_four_micro_steps_equal_one_step_on_a_four_times_larger_batch(small_text, tmp_path):
    whole = run_train(small_text, tmp_path / "whole", "--max_steps", "4", "--batch_size", "8")
    accumulated = run_train(small_text, tmp_path / "accum", "--max_steps", "4", "--batch_size", "2",
                            "--total_batch_size", str(8 * 32))
    assert losses(accumulated) == pytest.approx(losses(whole), rel=1e-5)
    a = torch.load(tmp_path / "whole" / "ckpt.pt", weights_only=True)["model"]
    b = torch.load(tmp_path / "accum" / "ckpt.pt", weights_only=True)["model"]
    for name in a:
        torch.testing.assert_close(a[name], b[name], rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("dataset_type, optimizer", [("text", "adamw"), ("shards", "adamw"), ("text", "muon")])
def test_resuming_gives_the_losses_of_an_uninterrupted_run(dataset_type, optimizer, small_text, tmp_path, monkeypatch):
    flags = ["--max_steps", "8", "--save_interval", "5", "--dropout", "0.1",  # dropout: so the RNG matters too
             "--optimizer", optimizer]
    if dataset_type == "shards":  # a corpus of shards, a window crossing from one to the next
        prepare.main([small_text, "--out_dir", str(tmp_path / "shards"), "--shard_tokens", "1000",
                      "--val_tokens", "1000", "--workers", "1"])
        small_text = str(tmp_path / "shards")
        flags += ["--dataset_type", "shards"]
    interrupted = tmp_path / "interrupted"
    save_checkpoint = train.save_checkpoint

    def save_and_keep_step_5(path, model, optimizer, scaler, step, args, write=True, **more):
        save_checkpoint(path, model, optimizer, scaler, step, args, write, **more)
        if step == 5:  # what a run killed after step 5 leaves behind
            interrupted.mkdir()
            for name in ("ckpt.pt", "metrics.jsonl"):
                (interrupted / name).write_bytes((tmp_path / "straight" / name).read_bytes())

    monkeypatch.setattr(train, "save_checkpoint", save_and_keep_step_5)
    straight = run_train(small_text, tmp_path / "straight", *flags)
    monkeypatch.setattr(train, "save_checkpoint", save_checkpoint)
    resumed = run_train(small_text, interrupted, "--resume", "--optimizer", optimizer)
    assert [r["step"] for r in resumed] == list(range(1, 9))
    for before, after in zip(straight, resumed):
        speed = {"tokens_per_sec", "mfu"}
        assert {k: v for k, v in after.items() if k not in speed} == \
            {k: v for k, v in before.items() if k not in speed}  # bit for bit, evaluations included
    a = torch.load(tmp_path / "straight" / "ckpt.pt", weights_only=True)["model"]
    b = torch.load(interrupted / "ckpt.pt", weights_only=True)["model"]
    assert all(torch.equal(a[name], b[name]) for name in a)  # and the same weights


@pytest.mark.parametrize("first, then", [("float16", "bfloat16"), ("bfloat16", "float16")])
def test_a_run_resumes_in_another_dtype(first, then, small_text, tmp_path, capsys):
    # --dtype auto may land elsewhere on the next machine (bf16 on an A100, fp16 on a V100): the GradScaler's state
    # exists in fp16 only, and resuming across that line must work
    run_train(small_text, tmp_path, "--max_steps", "2", "--dtype", first, "--batch_size", "2", "--seq_len", "16")
    records = run_train(small_text, tmp_path, "--resume", "--max_steps", "4", "--dtype", then, "--batch_size", "2")
    assert [r["step"] for r in records] == [1, 2, 3, 4] and all(r["loss"] < 11 for r in records)
    assert torch.load(tmp_path / "ckpt.pt", weights_only=True)["config"]["dtype"] == then
    assert ("loss scaling" in capsys.readouterr().err) == (then == "float16")


@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
def test_low_precision_autocast_trains_on_cpu(small_text, tmp_path, dtype):
    records = run_train(small_text, tmp_path, "--max_steps", "3", "--dtype", dtype, "--batch_size", "2",
                        "--seq_len", "16", "--eval_steps", "1")
    assert all(r["loss"] < 11 for r in records)  # finite, and no worse than a uniform guess (ln 50257 = 10.8)


def test_activation_checkpointing_gives_the_same_losses(small_text, tmp_path):
    flags = ["--max_steps", "3", "--dropout", "0.1"]  # dropout: recomputation must draw the same masks
    plain = run_train(small_text, tmp_path / "plain", *flags)
    checkpointed = run_train(small_text, tmp_path / "checkpointed", *flags, "--activation_checkpointing")
    assert losses(checkpointed) == pytest.approx(losses(plain), rel=1e-6)


@pytest.mark.parametrize("dtype", ["float32", "bfloat16", "float16"])
def test_muon_lowers_the_loss_under_every_dtype(dtype, small_text, tmp_path):
    records = run_train(small_text, tmp_path, "--optimizer", "muon", "--max_steps", "12", "--dtype", dtype,
                        "--eval_interval", "12")
    assert records[-1]["loss"] < records[0]["loss"] - 0.5  # finite, and learning


# written by the code before the optimizers moved to optim.py (torch.optim.Muon's state, in an AdamW/Muon pair):
# step 4 of an 8-step Muon run, with the losses of that run, uninterrupted
OLD_MUON = os.path.join(REPO, "tests", "fixtures", "muon_ckpt_before_issue_20")


@pytest.mark.parametrize("launch", [[], pytest.param(["--fsdp"], marks=pytest.mark.slow),
                                    pytest.param(["--no-fsdp"], marks=pytest.mark.slow)],
                         ids=["one process", "fsdp", "ddp"])
def test_a_muon_checkpoint_from_before_the_optimizer_move_resumes_with_its_run_s_losses(launch, tmp_path):
    os.makedirs(tmp_path / "out")
    shutil.copy(OLD_MUON + ".pt", tmp_path / "out" / "ckpt.pt")
    run_script("train.py", "--resume", "--out_dir", str(tmp_path / "out"), *launch, torchrun=bool(launch))
    records = read_metrics(tmp_path / "out")
    expected = json.load(open(OLD_MUON + ".json"))["losses"]
    assert [r["step"] for r in records] == [5, 6, 7, 8]
    # (the checkpoint's run orthogonalised in bf16; where the CPU has no bf16 units this code does it in fp32)
    assert losses(records) == pytest.approx([expected[str(r["step"])] for r in records], abs=1e-4)


def test_an_old_muon_checkpoint_s_optimizer_state_is_restored_whole():
    # the losses above cannot tell a lost momentum on a model this small: the state itself must come back
    saved = torch.load(OLD_MUON + ".pt", weights_only=True)
    rt = setup_runtime("cpu", "float32")
    _, optimizer, _ = build_training(GPT(GPTConfig(**saved["model_config"])), rt, weight_decay=0.1, lr=4e-3,
                                     betas=(0.9, 0.99), optimizer="muon", state=saved)
    restored = optimizer.state_dict()
    for name in ("muon", "adamw"):
        assert restored[name]["state"].keys() == saved["optimizer"][name]["state"].keys()
        for index, state in saved["optimizer"][name]["state"].items():
            for key, tensor in state.items():
                assert torch.equal(restored[name]["state"][index][key], tensor), (name, index, key)
    assert any(s["momentum_buffer"].abs().sum() > 0 for s in restored["muon"]["state"].values())


def test_a_second_run_into_the_out_dir_of_a_live_run_is_refused_and_a_killed_run_leaves_no_lock(small_text,
                                                                                                 tmp_path, capsys):
    cmd = [sys.executable, "train.py", "--dataset_path", small_text, "--out_dir", str(tmp_path), *TINY,
           "--max_steps", "100000", "--save_interval", "2"]
    live = subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.time() + 60
        while not (tmp_path / "ckpt.pt").exists() and time.time() < deadline:
            time.sleep(0.1)
        metrics_before = (tmp_path / "metrics.jsonl").read_text()
        for flags in (["--dataset_path", small_text, *TINY, "--overwrite"], ["--resume"]):  # neither may touch it
            capsys.readouterr()
            with pytest.raises(SystemExit):
                train.main(["--out_dir", str(tmp_path), *flags])
            err = capsys.readouterr().err
            assert err.count("\n") == 1 and "is in use by another run (process" in err, err
        assert (tmp_path / "metrics.jsonl").read_text().startswith(metrics_before)  # its records all there
    finally:
        live.kill()  # kill -9: no handler runs, and the operating system releases the lock
        live.wait()
    step = torch.load(tmp_path / "ckpt.pt", weights_only=True)["step"]
    records = run_train(small_text, tmp_path, "--resume", "--max_steps", str(step + 1))
    assert records[-1]["step"] == step + 1


def test_a_checkpoint_path_that_cannot_be_written_is_refused_before_the_first_step(small_text, tmp_path, capsys):
    (tmp_path / "ckpt.pt").mkdir()  # a directory where the checkpoint goes
    with pytest.raises(SystemExit):
        train.main(["--dataset_path", small_text, "--out_dir", str(tmp_path), *TINY, "--overwrite"])
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "ckpt.pt is not a file" in err
    assert not (tmp_path / "metrics.jsonl").exists()  # no step ran


# what setup refuses once the options are resolved (the options' own refusals: tests/test_options.py, BAD_OPTIONS)
BAD_INPUTS = {
    "missing dataset": (["--dataset_path", "/nonexistent/data.txt"], "does not exist"),
    "empty dataset": (["--dataset_path", "{empty}"], "is empty"),
    "non-UTF-8 dataset": (["--dataset_path", "{latin1}"], "not UTF-8"),
    "text shorter than one batch": (["--dataset_path", "{short}"], "shorter than one sequence"),
    "out_dir inside a file": (["--out_dir", "{empty}/out"], "cannot create --out_dir"),
    "text given as alpaca": (["--dataset_type", "alpaca"], "use --dataset_type text"),
    "alpaca given as text": (["--dataset_path", "{alpaca}"], "use --dataset_type alpaca"),
    "alpaca record without output": (["--dataset_type", "alpaca", "--dataset_path", "{no_output}"],
                                     'record 1 of'),
    "chat without a reply": (["--dataset_type", "chat", "--dataset_path", "{no_reply}"],
                             "has no assistant message"),
    "alpaca given as chat": (["--dataset_type", "chat", "--dataset_path", "{alpaca}"], "use --dataset_type alpaca"),
    # refused before anything is allocated: the kernel would otherwise kill the process without a word
    "a batch too big for memory": (["--batch_size", "100000"], "and the process's share of this machine's memory has"),
}


@pytest.mark.parametrize("case", BAD_INPUTS)
def test_bad_input_gets_one_line_and_leaves_out_dir_untouched(case, small_text, tmp_path, capsys):
    flags, message = BAD_INPUTS[case]
    files = {"empty": b"", "latin1": "café crème".encode("latin-1"), "short": b"Too short to train on.",
             "alpaca": b'[{"instruction": "Add 2 and 2.", "output": "4"}]',
             "no_output": b'[{"instruction": "Add 2 and 2.", "output": "4"}, {"instruction": "Add 3 and 3."}]',
             "no_reply": b'{"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hi."}]}\n'
                         b'{"messages": [{"role": "user", "content": "Hi"}]}\n'}
    for name, content in files.items():
        (tmp_path / f"{name}.txt").write_bytes(content)
    flags = [f.format(**{name: str(tmp_path / f"{name}.txt") for name in files}) for f in flags]
    out_dir = tmp_path / "out"
    before = {p: p.read_bytes() for p in out_dir.glob("*")} if out_dir.exists() else None
    capsys.readouterr()
    with pytest.raises(SystemExit) as exit_info:
        train.main(["--dataset_path", small_text, "--out_dir", str(out_dir), *TINY, "--max_steps", "2", *flags])
    err = capsys.readouterr().err
    assert exit_info.value.code != 0
    assert err.count("\n") == 1 and message in err, err
    after = {p: p.read_bytes() for p in out_dir.glob("*")} if out_dir.exists() else None
    assert after == before


def test_bad_input_on_the_command_line_prints_no_traceback(tmp_path):
    result = subprocess.run([sys.executable, "train.py", "--dataset_path", str(tmp_path / "missing.txt"),
                             "--out_dir", str(tmp_path / "out")], cwd=REPO, capture_output=True, text=True)
    assert result.returncode != 0
    assert result.stderr.strip().splitlines() == [
        f"error: dataset file {tmp_path / 'missing.txt'} does not exist: pass an existing text file with --dataset_path"
    ]
    assert not (tmp_path / "out").exists()


@pytest.mark.slow
def test_the_default_run_trains_on_input_txt_and_val_loss_falls(tmp_path):
    (tmp_path / "input.txt").write_bytes(open(os.path.join(REPO, "input.txt"), "rb").read())
    result = subprocess.run([sys.executable, os.path.join(REPO, "train.py")], cwd=tmp_path, capture_output=True,
                            text=True)
    assert result.returncode == 0, result.stderr
    val = [r["val_loss"] for r in read_metrics(tmp_path / "out") if "val_loss" in r]
    assert len(val) >= 2 and val[-1] < val[0] - 0.5 and val == sorted(val, reverse=True)
    assert (tmp_path / "out" / "ckpt.pt").exists() and "-" * 80 in result.stdout


@pytest.mark.parametrize("dataset_type, flag", [("text", None), ("alpaca", "instruction"), ("chat", "chat")])
def test_the_next_steps_a_finished_run_prints_sample_it_in_the_template_it_was_trained_on(dataset_type, flag):
    args = argparse.Namespace(out_dir="out-x", dataset_type=dataset_type)
    lines = train.done_lines(args, {"step": 20, "val_loss": 2.0, "val_bpb": 1.0}, 65.0)
    command = lines.splitlines()[1].removeprefix("next: ").split(" | ")[0]
    assert command.startswith("python sample.py --init_from out-x")
    parsed = sample.build_parser().parse_args(shlex.split(command)[2:])  # a command sample.py takes
    assert parsed.chat == (flag == "chat") and (parsed.instruction is not None) == (flag == "instruction")

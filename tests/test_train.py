import argparse
import ast
import dataclasses
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time

import numpy as np
import pytest
import torch

import hf
import prepare
import train
from checkpoint import load_model, save_checkpoint
from conftest import REPO
from data import LOADERS, ExampleLoader, TextLoader
from model import GPT, GPTConfig
from parallel import build_training
from measure import peak_memory_bytes
from runtime import setup_runtime
from tokenizer import chat_pieces, chat_tokens, get_tokenizer

TINY = ["--model", "gpt2-nano", "--batch_size", "4", "--seq_len", "32", "--warmup_steps", "2", "--max_lr", "3e-3",
        "--log_interval", "1", "--eval_interval", "3", "--eval_steps", "2", "--sample_tokens", "0",
        "--device", "cpu", "--dtype", "float32", "--optimizer", "adamw"]


def run_train(dataset, out_dir, *flags):
    train.main(["--dataset_path", dataset, "--out_dir", str(out_dir), *TINY, *flags])
    return read_metrics(out_dir)


def read_metrics(out_dir):
    with open(os.path.join(out_dir, "metrics.jsonl")) as f:
        return [json.loads(line) for line in f]


def losses(records):
    return [r["loss"] for r in records]


def test_help_lists_every_option_with_its_default():
    out = subprocess.run([sys.executable, "train.py", "--help"], cwd=REPO, capture_output=True, text=True,
                         env=dict(os.environ, COLUMNS="200")).stdout  # wide: no default cut across lines
    for option in ["--dataset_type", "--dataset_path", "--model", "--n_layer", "--n_head", "--n_embd", "--batch_size",
                   "--seq_len", "--total_batch_size", "--max_steps", "--warmup_steps", "--max_lr", "--min_lr",
                   "--weight_decay", "--grad_clip", "--dtype", "--device", "--compile", "--seed", "--out_dir",
                   "--log_interval", "--eval_interval", "--eval_steps", "--save_interval", "--resume"]:
        assert option in out
    assert "(default: input.txt)" in out and "(default: out)" in out


def test_no_script_or_shared_module_imports_the_trainer():
    # the shared concerns live in their own files, so that the tools never depend on the training script
    for name in sorted(os.listdir(REPO)):
        if name.endswith(".py") and name != "train.py":
            tree = ast.parse(open(os.path.join(REPO, name), encoding="utf-8").read())
            imported = {alias.name for node in ast.walk(tree) if isinstance(node, ast.Import) for alias in node.names}
            imported |= {node.module for node in ast.walk(tree) if isinstance(node, ast.ImportFrom)}
            assert "train" not in imported, f"{name} imports train.py"


def test_learning_rate_warms_up_from_zero_then_decays_to_min_lr():
    args = argparse.Namespace(max_lr=1e-3, min_lr=1e-4, warmup_steps=10, max_steps=100)
    assert train.get_lr(0, args) == 0.0
    assert train.get_lr(5, args) == pytest.approx(5e-4)
    assert train.get_lr(10, args) == pytest.approx(1e-3)
    assert train.get_lr(55, args) == pytest.approx(5.5e-4)  # halfway through the cosine
    assert train.get_lr(100, args) == pytest.approx(1e-4)
    schedule = [train.get_lr(s, args) for s in range(10, 101)]
    assert all(a >= b for a, b in zip(schedule, schedule[1:]))


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

    def save_and_keep_step_5(path, model, optimizer, scaler, step, args, write=True):
        save_checkpoint(path, model, optimizer, scaler, step, args, write)
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
        assert {k: v for k, v in after.items() if k not in speed} == {k: v for k, v in before.items() if k not in speed}


def test_a_fresh_run_refuses_to_replace_an_existing_checkpoint(small_text, tmp_path, capsys):
    run_train(small_text, tmp_path, "--max_steps", "2")
    before = (tmp_path / "ckpt.pt").read_bytes()
    with pytest.raises(SystemExit) as exit_info:
        run_train(small_text, tmp_path, "--max_steps", "2")
    assert exit_info.value.code != 0 and "--resume" in capsys.readouterr().err
    assert (tmp_path / "ckpt.pt").read_bytes() == before


def test_a_diverging_run_stops_and_keeps_the_last_good_checkpoint(small_text, tmp_path, capsys):
    run_train(small_text, tmp_path, "--max_steps", "2")
    good = (tmp_path / "ckpt.pt").read_bytes()
    with pytest.raises(SystemExit) as exit_info:
        run_train(small_text, tmp_path, "--overwrite", "--max_steps", "20", "--max_lr", "1e30", "--warmup_steps", "0",
                  "--grad_clip", "0")
    err = capsys.readouterr().err.splitlines()
    assert exit_info.value.code != 0
    assert all(line.endswith("their gradient not finite") for line in err[:-1])  # (notes of skipped updates)
    assert "loss became nan" in err[-1] and "still holds the last good checkpoint" in err[-1]
    assert (tmp_path / "ckpt.pt").read_bytes() == good


class NaNGradient(torch.autograd.Function):
    """The identity going forward, NaN coming back: a loss that is finite with a gradient that is not."""

    @staticmethod
    def forward(ctx, x):
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad):
        return grad * float("nan")


def test_a_gradient_that_turns_nan_never_reaches_the_weights_or_a_checkpoint(small_text, tmp_path, capsys,
                                                                             monkeypatch):
    # from step 2 on, each loss is finite and its gradient NaN: the updates are skipped, and after a few in a row the
    # run stops. Made so on purpose, not by a huge learning rate: where a divergence first shows (the gradient or the
    # loss) depends on the CPU's kernels.
    real_forward, training_forwards = GPT.forward, []

    def forward(self, *args, **kwargs):
        logits, loss = real_forward(self, *args, **kwargs)
        if self.training and torch.is_grad_enabled():
            training_forwards.append(1)
            if len(training_forwards) > 1:
                loss = NaNGradient.apply(loss)
        return logits, loss

    monkeypatch.setattr(GPT, "forward", forward)
    flags = ["--max_steps", "50", "--save_interval", "1", "--optimizer", "muon"]
    with pytest.raises(SystemExit) as exit_info:
        run_train(small_text, tmp_path, *flags)
    assert exit_info.value.code == 2
    err = capsys.readouterr().err.splitlines()
    assert sum("skipped since the last log" in line for line in err) == train.MAX_SKIPPED_STEPS
    assert err[-1].startswith(f"error: the gradient was not finite for {train.MAX_SKIPPED_STEPS} steps in a row")
    ckpt = torch.load(tmp_path / "ckpt.pt", weights_only=True)
    assert f"still holds the last good checkpoint, of step {ckpt['step']}" in err[-1]
    assert all(t.isfinite().all() for t in ckpt["model"].values())
    assert all(t.isfinite().all() for opt in ckpt["optimizer"].values() for s in opt["state"].values()
               for t in s.values())


def test_sigterm_saves_a_checkpoint_that_resumes(small_text, tmp_path):
    cmd = [sys.executable, "train.py", "--dataset_path", small_text, "--out_dir", str(tmp_path), *TINY,
           "--max_steps", "100000", "--save_interval", "100000"]
    proc = subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    metrics = tmp_path / "metrics.jsonl"
    deadline = time.time() + 60
    while not (metrics.exists() and metrics.read_text().count("\n") >= 2) and time.time() < deadline:
        time.sleep(0.1)
    proc.send_signal(signal.SIGTERM)
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == 128 + signal.SIGTERM, err
    assert "checkpoint saved" in out
    step = torch.load(tmp_path / "ckpt.pt", weights_only=True)["step"]
    assert step >= 2
    records = run_train(small_text, tmp_path, "--resume", "--max_steps", str(step + 1))
    assert records[-1]["step"] == step + 1


# train.py with torch.save slowed down from its second call on: it writes half a file, says so, and waits, so that
# a test can signal a process in the middle of a save
SLOW_SECOND_SAVE = """
import sys, time, torch
real_save, calls = torch.save, []
def slow_save(state, f, *args, **kwargs):
    calls.append(1)
    if len(calls) > 1:
        f.write(b"half a checkpoint")
        print("SAVING", flush=True)
        time.sleep(60)
    real_save(state, f, *args, **kwargs)
torch.save = slow_save
sys.argv = ["train.py", *sys.argv[1:]]
exec(compile(open("train.py").read(), "train.py", "exec"), {"__name__": "__main__"})
"""


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM])
def test_a_second_signal_during_a_save_stops_at_once_and_leaves_the_last_checkpoint(signum, small_text, tmp_path):
    cmd = [sys.executable, "-c", SLOW_SECOND_SAVE, "--dataset_path", small_text, "--out_dir", str(tmp_path), *TINY,
           "--max_steps", "100", "--save_interval", "1"]
    proc = subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    for line in proc.stdout:
        if line.startswith("SAVING"):  # step 1's checkpoint is written; step 2's is being written
            break
    good = (tmp_path / "ckpt.pt").read_bytes()
    proc.send_signal(signum)  # the first asks for a save after the step...
    time.sleep(0.5)
    proc.send_signal(signum)  # ...the second stops at once
    out, err = proc.communicate(timeout=30)
    assert proc.returncode == 128 + signum
    name = signal.Signals(signum).name
    assert err.strip().splitlines() == [f"error: {name} again: stopped at once, without saving; {tmp_path / 'ckpt.pt'} "
                                        f"holds the last checkpoint saved"]
    assert (tmp_path / "ckpt.pt").read_bytes() == good and torch.load(tmp_path / "ckpt.pt")["step"] == 1


def test_a_second_ctrl_c_during_a_step_stops_at_once_without_a_traceback(small_text, tmp_path):
    micro_steps = 200  # a step of a few seconds: both signals land inside it
    cmd = [sys.executable, "train.py", "--dataset_path", small_text, "--out_dir", str(tmp_path), *TINY, "--batch_size",
           "2", "--total_batch_size", str(2 * 32 * micro_steps), "--max_steps", "5"]
    proc = subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    for line in proc.stdout:
        if line.startswith("model "):  # the loop starts, with its handlers
            break
    time.sleep(0.5)
    proc.send_signal(signal.SIGINT)
    time.sleep(0.3)
    proc.send_signal(signal.SIGINT)
    out, err = proc.communicate(timeout=30)
    assert proc.returncode == 130 and "Traceback" not in err
    assert err.strip().splitlines() == ["error: SIGINT again: stopped at once, without saving; no checkpoint was saved"]
    assert not (tmp_path / "ckpt.pt").exists()


def test_workers_whose_launcher_is_killed_save_and_stop_and_the_run_resumes(small_text, tmp_path):
    # kill -9 to torchrun alone (a scheduler, a closed terminal): its workers must not train on as orphans
    flags = [*TINY, "--dataset_path", small_text, "--out_dir", str(tmp_path), "--max_steps", "100000",
             "--save_interval", "100000"]
    launcher = subprocess.Popen([*TORCHRUN, "train.py", *flags], cwd=REPO, stdout=subprocess.PIPE,
                                stderr=open(tmp_path / "stderr.txt", "w"), text=True,
                                env=dict(os.environ, OMP_NUM_THREADS="1"))
    for line in launcher.stdout:
        if line.startswith("step 2/"):
            break
    workers = [int(pid) for pid in subprocess.run(["pgrep", "-P", str(launcher.pid)], capture_output=True,
                                                  text=True).stdout.split()]
    assert len(workers) == 2
    launcher.kill()
    launcher.wait()
    deadline = time.time() + 60
    while any(os.path.exists(f"/proc/{pid}") and open(f"/proc/{pid}/stat").read().split()[2] != "Z"
              for pid in workers) and time.time() < deadline:
        time.sleep(0.2)
    assert time.time() < deadline, "the workers outlived their launcher"
    step = torch.load(tmp_path / "ckpt.pt", weights_only=True)["step"]  # they saved on the way out
    assert step >= 2
    records = run_train(small_text, tmp_path, "--resume", "--max_steps", str(step + 1))  # the out_dir is free
    assert records[-1]["step"] == step + 1


# slow: multi-process runs that repeat what a faster test covers for the default optimizer (pytest -m slow)
@pytest.mark.parametrize("optimizer", [pytest.param("adamw", marks=pytest.mark.slow), "muon"])
def test_torchrun_with_two_processes_equals_one_process_with_double_accumulation(optimizer, small_text, tmp_path):
    # 4 micro-batches of 2 sequences a step: 2 processes x 2 micro-steps, or 1 process x 4. Under Muon each rank
    # orthogonalises the same all-reduced gradient.
    flags = ["--dataset_path", small_text, *TINY, "--max_steps", "4", "--batch_size", "2",
             "--total_batch_size", str(4 * 2 * 32), "--optimizer", optimizer]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    single = subprocess.run([sys.executable, "train.py", *flags, "--out_dir", str(tmp_path / "one")],
                            cwd=REPO, capture_output=True, text=True, env=env)
    assert single.returncode == 0, single.stderr
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2"]
    double = subprocess.run([*torchrun, "train.py", *flags, "--out_dir", str(tmp_path / "two")],
                            cwd=REPO, capture_output=True, text=True, env=env, timeout=240)
    assert double.returncode == 0, double.stderr
    one, two = read_metrics(tmp_path / "one"), read_metrics(tmp_path / "two")
    assert [r["step"] for r in two] == [1, 2, 3, 4]
    assert losses(two) == pytest.approx(losses(one), rel=1e-5)
    assert [r["val_loss"] for r in two if "val_loss" in r] == pytest.approx(
        [r["val_loss"] for r in one if "val_loss" in r], rel=1e-5)


@pytest.mark.parametrize("optimizer", [pytest.param("adamw", marks=pytest.mark.slow), "muon"])
def test_compiled_and_eager_training_steps_give_the_same_losses(optimizer, small_text):
    args = train.build_parser().parse_args([*TINY, "--dataset_path", small_text, "--batch_size", "2",
                                            "--optimizer", optimizer])
    train.check_args(args)
    cfg = train.model_config(args)
    accum_steps = train.batch_geometry(args, cfg, 1)
    rt = setup_runtime("cpu", "float32")
    loader = LOADERS["text"](small_text, args.seq_len, args.batch_size, accum_steps)
    losses_by_mode = {}
    for compiled in (False, True):
        torch.manual_seed(0)
        step_model, opt, scaler = build_training(GPT(cfg), rt, weight_decay=args.weight_decay, lr=args.max_lr,
                                                 betas=(args.beta1, args.beta2), optimizer=optimizer, compile=compiled)
        losses_by_mode[compiled] = [train.train_step(step_model, opt, scaler, loader, step, accum_steps, rt,
                                                     args)[1].item() for step in (1, 2, 3)]
    # the same math in another order of operations: equal to float rounding, far inside bf16's 1e-2
    assert losses_by_mode[True] == pytest.approx(losses_by_mode[False], rel=1e-3)


@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
def test_low_precision_autocast_trains_on_cpu(small_text, tmp_path, dtype):
    records = run_train(small_text, tmp_path, "--max_steps", "3", "--dtype", dtype, "--batch_size", "2",
                        "--seq_len", "16", "--eval_steps", "1")
    assert all(r["loss"] < 11 for r in records)  # finite, and no worse than a uniform guess (ln 50257 = 10.8)


def without_model_flag(flags):
    i = flags.index("--model")
    return flags[:i] + flags[i + 2 :]


@pytest.mark.parametrize("source", ["hf_dir", "checkpoint"])
def test_init_from_starts_from_the_weights_with_their_shape_and_a_fresh_schedule(source, small_text, tmp_path):
    torch.manual_seed(0)
    start = GPT(GPTConfig(n_layer=1, n_head=2, n_embd=24, block_size=48))  # a shape of no preset
    if source == "hf_dir":
        pytest.importorskip("safetensors")
        hf.save_pretrained(start, str(tmp_path / "start"))
    else:
        (tmp_path / "start").mkdir()
        save_checkpoint(str(tmp_path / "start" / "ckpt.pt"), start, torch.optim.AdamW(start.parameters()),
                        torch.amp.GradScaler("cpu", enabled=False), 7, argparse.Namespace(model="x"))
    out = tmp_path / "out"
    train.main(["--dataset_path", small_text, "--out_dir", str(out), *without_model_flag(TINY),
                "--init_from", str(tmp_path / "start"), "--max_steps", "3"])
    records = read_metrics(out)
    ckpt = torch.load(out / "ckpt.pt", weights_only=True)
    assert ckpt["model_config"] == dataclasses.asdict(start.config) and ckpt["step"] == 3
    assert [r["step"] for r in records] == [1, 2, 3] and records[0]["lr"] == pytest.approx(3e-3 / 2)
    # step 1's loss is the loss of the starting weights on step 1's batch
    x, y, _ = TextLoader(small_text, 32, 4, 1).get_batch("train", 0, 0)
    with torch.no_grad():
        assert records[0]["loss"] == pytest.approx(start(x, y)[1].item(), rel=1e-5)


def test_init_from_defaults_to_a_fine_tuning_recipe_and_flags_given_win(small_text, tmp_path, capsys):
    # the from-scratch defaults (Muon at 4e-3, warmup, decay) would undo trained weights in a few steps
    torch.manual_seed(0)
    start = GPT(GPTConfig(n_layer=1, n_head=2, n_embd=24, block_size=48))
    save_checkpoint(str(tmp_path / "start.pt"), start, torch.optim.AdamW(start.parameters()),
                    torch.amp.GradScaler("cpu", enabled=False), 7, argparse.Namespace(model="x"))
    common = ["--dataset_path", small_text, "--seq_len", "32", "--batch_size", "2", "--max_steps", "2",
              "--log_interval", "1", "--eval_steps", "1", "--sample_tokens", "0", "--device", "cpu", "--dtype",
              "float32"]

    def settings(out_dir, *flags):
        train.main([*common, "--out_dir", str(tmp_path / out_dir), *flags])
        config = torch.load(tmp_path / out_dir / "ckpt.pt", weights_only=True)["config"]
        lrs = [r["lr"] for r in read_metrics(tmp_path / out_dir)]
        return config["optimizer"], config["max_lr"], config["min_lr"], config["warmup_steps"], lrs

    # weights trained with AdamW (or not saying: before there was a choice) go on with AdamW, at a small constant rate
    init = ["--init_from", str(tmp_path / "start.pt")]
    assert settings("fine_tuned", *init) == ("adamw", 3e-5, 3e-5, 0, [3e-5, 3e-5])
    notes = capsys.readouterr().err
    assert "--init_from: fine-tuning defaults --optimizer adamw --max_lr 3e-05 --warmup_steps 0" in notes
    assert settings("given", *init, "--optimizer", "muon", "--max_lr", "1e-3", "--warmup_steps", "1") == \
        ("muon", 1e-3, 1e-3, 1, [1e-3, 1e-3])
    # a run trained with Muon (the default from scratch) is fine-tuned with Muon
    assert settings("scratch", "--model", "gpt2-nano")[:4] == ("muon", 4e-3, 4e-4, 20)
    assert settings("fine_tuned_muon", "--init_from", str(tmp_path / "scratch"))[:4] == ("muon", 3e-5, 3e-5, 0)


def test_from_scratch_a_seq_len_beyond_the_preset_s_context_extends_it(small_text, tmp_path):
    run_train(small_text, tmp_path, "--max_steps", "1", "--seq_len", "80")  # gpt2-nano's context is 64
    assert torch.load(tmp_path / "ckpt.pt", weights_only=True)["model_config"]["block_size"] == 80


def test_init_from_refuses_shape_flags_and_unknown_sources(small_text, tmp_path, capsys):
    trained = GPT(GPTConfig(n_layer=1, n_head=2, n_embd=16, block_size=64))  # weights whose context is 64
    save_checkpoint(str(tmp_path / "trained.pt"), trained, torch.optim.AdamW(trained.parameters()),
                    torch.amp.GradScaler("cpu", enabled=False), 1, argparse.Namespace())
    for flags, message in [(["--init_from", str(tmp_path), "--model", "gpt2-nano"], "drop --model"),
                           (["--init_from", str(tmp_path / "trained.pt"), "--seq_len", "65"],
                            "--seq_len 65 is longer than the model's context (64)"),
                           (["--init_from", str(tmp_path)], "neither a ckpt.pt nor a Hugging Face config.json"),
                           (["--init_from", "no-such-model"], "no such file or directory")]:
        with pytest.raises(SystemExit):
            train.main(["--dataset_path", small_text, "--out_dir", str(tmp_path / "out"),
                        *without_model_flag(TINY), *flags])
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and message in err, err


# ----------------------------------------------------------------------------------------------------------------
# Alpaca fine-tuning through train.py


def write_alpaca(path, n, output=lambda i: f"Answer number {i} is {i * 7 % 13}."):
    words = ["apple", "river", "stone", "cloud", "music", "paper", "light", "green", "quiet", "seven"]
    records = [{"instruction": f"Say something about {words[i % 10]} and {words[i * 3 % 10]} ({i}).",
                "input": f"context {i}" if i % 3 == 0 else "", "output": output(i)} for i in range(n)]
    path.write_text(json.dumps(records))
    return str(path)


ALPACA = ["--dataset_type", "alpaca", "--seq_len", "64", "--sample_tokens", "0"]


def test_alpaca_loss_weighs_every_response_token_alike_however_the_batch_is_split(tmp_path):
    data = write_alpaca(tmp_path / "data.json", 40)
    # padding to each micro-batch's longest example makes micro-batches hold different numbers of labels
    whole = run_train(data, tmp_path / "whole", *ALPACA, "--max_steps", "3", "--batch_size", "8")
    split = run_train(data, tmp_path / "split", *ALPACA, "--max_steps", "3", "--batch_size", "2",
                      "--total_batch_size", str(8 * 64))
    assert losses(split) == pytest.approx(losses(whole), rel=1e-5)
    assert [r["val_loss"] for r in split if "val_loss" in r] == pytest.approx(
        [r["val_loss"] for r in whole if "val_loss" in r], rel=1e-5)


def test_with_the_prompt_masked_a_fixed_response_is_learned_to_near_zero_loss(tmp_path, capsys):
    # the instructions vary and cannot be predicted; the response is always the same sentence. Only because the
    # loss ignores the prompt can it fall to ~0
    data = write_alpaca(tmp_path / "data.json", 60, output=lambda i: "The answer is always forty two.")
    records = run_train(data, tmp_path / "out", *ALPACA, "--max_steps", "40", "--batch_size", "8",
                        "--max_lr", "1e-2", "--min_lr", "1e-2", "--eval_interval", "40", "--sample_tokens", "20")
    assert records[-1]["loss"] < 0.05 and records[-1]["val_loss"] < 0.05
    assert "### Response:\nThe answer is always forty two." in capsys.readouterr().out  # the end-of-run sample


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


@pytest.mark.parametrize("kind", ["alpaca", "chat"])
def test_packed_and_padded_runs_log_the_same_losses(tmp_path, kind, monkeypatch):
    # packing changes where the examples sit in the batch, and the time; never what a step computes
    path = tmp_path / "data.json"
    data = write_alpaca(path, 40) if kind == "alpaca" else write_chat(path, 40)
    flags = ["--dataset_type", kind, "--seq_len", "64", "--max_steps", "3", "--batch_size", "8", "--eval_steps", "1"]
    packed_rows = []
    pack = ExampleLoader.pack
    monkeypatch.setattr(ExampleLoader, "pack", lambda self, ids: packed_rows.append(len(ids)) or pack(self, ids))
    packed = run_train(data, tmp_path / "packed", *flags, "--packing")
    assert packed_rows
    packed_rows.clear()
    padded = run_train(data, tmp_path / "padded", *flags, "--no-packing")
    assert not packed_rows
    assert losses(packed) == pytest.approx(losses(padded), abs=1e-4)
    assert [r["val_loss"] for r in packed if "val_loss" in r] == pytest.approx(
        [r["val_loss"] for r in padded if "val_loss" in r], abs=1e-4)


def test_a_chat_model_learns_its_fixed_replies_but_not_the_random_user_turns(tmp_path, capsys):
    # the replies are always the same sentence, the user turns random words: only the replies can be learned, and
    # only because the loss is on them alone can it fall to ~0
    data = write_chat(tmp_path / "chat.json", 60, reply=lambda i: "I hear you, and I agree.")
    records = run_train(data, tmp_path / "out", "--dataset_type", "chat", "--seq_len", "64", "--max_steps", "50",
                        "--batch_size", "8", "--max_lr", "1e-2", "--min_lr", "1e-2", "--eval_interval", "50",
                        "--sample_tokens", "12")
    assert records[-1]["loss"] < 0.05 and records[-1]["val_loss"] < 0.05
    assert "User:\n" in capsys.readouterr().out  # the end-of-run sample: a conversation's first reply
    model = load_model(str(tmp_path / "out")).eval()
    messages = json.load(open(data))[0]["messages"]
    tokens, labelled, _ = chat_tokens(messages)
    pieces = [text for text, _, _ in chat_pieces(messages)]  # start, header, system, end, header, user, end, ...
    second_user_turn = len(get_tokenizer().encode("".join(pieces[:11]), allowed_special="all"))  # where it starts
    with torch.no_grad():
        _, nats = model(torch.tensor([tokens[:-1]]), torch.tensor([tokens[1:]]), loss_reduction="none")
    nats = nats[0]  # nats[j]: predicting token j + 1
    reply = torch.tensor(labelled[1:])
    user = torch.zeros_like(reply)
    user[second_user_turn : second_user_turn + 6] = True  # its six words (the first predicted from the header)
    assert nats[reply].mean() < 0.05 and nats[user].mean() > 1.0  # (random words: 2.8 nats at best)


def write_checkpoint_of_other_shape(small_text, out_dir):
    run_train(small_text, out_dir, "--max_steps", "1", "--n_embd", "16")


BAD_INPUTS = {
    "missing dataset": (["--dataset_path", "/nonexistent/data.txt"], "does not exist"),
    "empty dataset": (["--dataset_path", "{empty}"], "is empty"),
    "non-UTF-8 dataset": (["--dataset_path", "{latin1}"], "not UTF-8"),
    "text shorter than one batch": (["--dataset_path", "{short}"], "shorter than one sequence"),
    "batch arithmetic": (["--total_batch_size", "100"], "not a multiple"),
    "unknown preset": (["--model", "gpt5"], "unknown --model"),
    "n_embd not divisible by n_head": (["--n_embd", "30", "--n_head", "4"], "divisible"),
    "resume without checkpoint": (["--resume"], "no checkpoint"),
    "resume of another shape": (["--resume", "--n_embd", "64"], "shape"),
    "zero batch size": (["--batch_size", "0"], "must be a positive integer"),
    "negative steps": (["--max_steps", "-5"], "must be a positive integer"),
    "zero layers": (["--n_layer", "0"], "must be a positive integer"),
    "not a number": (["--max_lr", "fast"], "must be a positive number"),
    "nan": (["--max_lr", "nan"], "must be a positive number"),
    "beta beyond 1": (["--beta2", "1.5"], "must be a number in [0, 1)"),
    "out_dir inside a file": (["--out_dir", "{empty}/out"], "cannot create --out_dir"),
    "text given as alpaca": (["--dataset_type", "alpaca"], "use --dataset_type text"),
    "alpaca given as text": (["--dataset_path", "{alpaca}"], "use --dataset_type alpaca"),
    "alpaca record without output": (["--dataset_type", "alpaca", "--dataset_path", "{no_output}"],
                                     'record 1 of'),
    "chat without a reply": (["--dataset_type", "chat", "--dataset_path", "{no_reply}"],
                             "has no assistant message"),
    "alpaca given as chat": (["--dataset_type", "chat", "--dataset_path", "{alpaca}"], "use --dataset_type alpaca"),
    "fsdp without torchrun": (["--fsdp"], "launch it with torchrun"),
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
    if case == "resume of another shape":
        write_checkpoint_of_other_shape(small_text, out_dir)
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


@pytest.mark.parametrize("first, then", [("float16", "bfloat16"), ("bfloat16", "float16")])
def test_a_run_resumes_in_another_dtype(first, then, small_text, tmp_path, capsys):
    # --dtype auto may land elsewhere on the next machine (bf16 on an A100, fp16 on a V100): the GradScaler's state
    # exists in fp16 only, and resuming across that line must work
    run_train(small_text, tmp_path, "--max_steps", "2", "--dtype", first, "--batch_size", "2", "--seq_len", "16")
    records = run_train(small_text, tmp_path, "--resume", "--max_steps", "4", "--dtype", then, "--batch_size", "2")
    assert [r["step"] for r in records] == [1, 2, 3, 4] and all(r["loss"] < 11 for r in records)
    assert torch.load(tmp_path / "ckpt.pt", weights_only=True)["config"]["dtype"] == then
    assert ("loss scaling" in capsys.readouterr().err) == (then == "float16")


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_resume_on_nodes_that_do_not_share_out_dir_is_one_line(small_text, tmp_path):
    # two "nodes": rank 0 sees the checkpoint in its out_dir, rank 1's disk has none at the same path
    run_train(small_text, tmp_path / "node0", "--max_steps", "2")
    procs, port = [], free_port()
    for rank in (0, 1):  # what torchrun sets on two nodes of one process each
        env = dict(os.environ, RANK=str(rank), LOCAL_RANK="0", WORLD_SIZE="2", LOCAL_WORLD_SIZE="1",
                   MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
        cmd = [sys.executable, "train.py", "--resume", "--out_dir", str(tmp_path / f"node{rank}"), "--max_steps", "4"]
        procs.append(subprocess.Popen(cmd, cwd=REPO, env=env, stderr=subprocess.PIPE, text=True))
    errors = [proc.communicate(timeout=120)[1] for proc in procs]
    assert [proc.returncode for proc in procs] == [2, 2]
    assert errors[0].count("\n") == 1 and "is not the same file on every node" in errors[0]
    assert "Traceback" not in errors[1]
    assert not (tmp_path / "node1").exists()


def test_under_torchrun_sigterm_saves_before_the_processes_are_killed(small_text, tmp_path):
    # torchrun passes SIGTERM on to its processes and kills them TORCH_ELASTIC_SHUTDOWN_TIMEOUT seconds later. The
    # evaluation due at the signalled step takes longer than that here: the save must not wait for it.
    micro_steps = 100  # a training step of a second or two: the signal arrives during it
    flags = [*TINY, "--dataset_path", small_text, "--out_dir", str(tmp_path), "--max_steps", "1000", "--batch_size",
             "2", "--total_batch_size", str(2 * 32 * 2 * micro_steps), "--eval_interval", "1", "--eval_steps", "40"]
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1", TORCH_ELASTIC_SHUTDOWN_TIMEOUT="8")
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2"]
    proc = subprocess.Popen([*torchrun, "train.py", *flags], cwd=REPO, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    for line in proc.stdout:
        if line.startswith("model "):  # setup is done: the loop starts, with its signal handlers
            break
    time.sleep(0.5)  # into the first step, which takes a second or two
    proc.send_signal(signal.SIGTERM)
    out, err = proc.communicate(timeout=120)
    assert "stopped by signal at step 1; checkpoint saved" in out, err
    assert torch.load(tmp_path / "ckpt.pt", weights_only=True)["step"] == 1
    assert "val_loss" not in read_metrics(tmp_path)[-1]  # the evaluation was skipped, not run


def test_more_micro_steps_keep_no_more_logits_alive(small_text):
    # each micro-step's logits (the largest tensor of a small model's step) are dropped before the next forward
    args = train.build_parser().parse_args([*TINY, "--dataset_path", small_text, "--batch_size", "2"])
    cfg = train.model_config(args)
    train.batch_geometry(args, cfg, 1)
    rt = setup_runtime("cpu", "float32")
    peaks = []
    for accum_steps in (1, 3):
        loader = LOADERS["text"](small_text, args.seq_len, args.batch_size, accum_steps)
        torch.manual_seed(0)
        model, optimizer, scaler = build_training(GPT(cfg), rt, weight_decay=0.1, lr=1e-3, betas=(0.9, 0.95))
        train.train_step(model, optimizer, scaler, loader, 1, accum_steps, rt, args)  # the optimizer's state
        resident = [*model.parameters(), *(t for state in optimizer.state.values() for t in state.values())]
        peaks.append(peak_memory_bytes(lambda: train.train_step(model, optimizer, scaler, loader, 2, accum_steps,
                                                                rt, args), rt, resident))
    # accumulating into the gradients costs a gradient's size (the sum is made beside it), a micro-step's logits more
    gradient_bytes = sum(p.numel() * 4 for p in model.parameters())
    logits_bytes = args.batch_size * args.seq_len * cfg.vocab_size * 4
    assert peaks[1] - peaks[0] < gradient_bytes + logits_bytes / 4


def test_processes_that_cannot_connect_say_so_in_one_line(small_text, tmp_path):
    # the usual multi-node misconfiguration: gloo on a network interface that isn't there
    env = dict(os.environ, OMP_NUM_THREADS="1", GLOO_SOCKET_IFNAME="no-such-interface0")
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2"]
    result = subprocess.run([*torchrun, "train.py", *TINY, "--dataset_path", small_text, "--out_dir", str(tmp_path)],
                            cwd=REPO, capture_output=True, text=True, env=env, timeout=240)
    assert result.returncode != 0
    ours = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(ours) == 1 and "could not connect" in ours[0] and "GLOO_SOCKET_IFNAME" in ours[0]
    assert "[rank0]: Traceback" not in result.stderr and not (tmp_path / "ckpt.pt").exists()


TORCHRUN = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2"]


def run_script(*cmd, torchrun=False):
    env = dict(os.environ, OMP_NUM_THREADS="1")
    result = subprocess.run([*(TORCHRUN if torchrun else [sys.executable]), *cmd], cwd=REPO, capture_output=True,
                            text=True, env=env, timeout=300)
    assert result.returncode == 0, result.stderr
    return result


def write_hellaswag(path, n):
    items = [{"ctx": f"Item {i}: the cat", "endings": ["sat on the mat.", "flew away.", "sang.", "is blue."],
              "label": i % 4} for i in range(n)]
    path.write_text("\n".join(json.dumps(item) for item in items))
    return str(path)


@pytest.mark.parametrize("dataset_type, optimizer, extra", [
    ("text", "muon", []),
    pytest.param("alpaca", "muon", ["--activation_checkpointing"], marks=pytest.mark.slow),
    pytest.param("chat", "adamw", [], marks=pytest.mark.slow),  # packed: each rank its own number of rows
    pytest.param("text", "adamw", [], marks=pytest.mark.slow)])
def test_fsdp_on_two_processes_equals_one_process_with_double_accumulation(dataset_type, optimizer, extra, small_text,
                                                                           tmp_path):
    # 4 micro-batches of 2 sequences a step; 3 HellaSwag items, an uneven share (a sharded forward needs every rank).
    # Muon gathers each sharded matrix's update on the rank that orthogonalises it, and hands back the shards.
    data = {"text": lambda: small_text, "alpaca": lambda: write_alpaca(tmp_path / "alpaca.json", 60),
            "chat": lambda: write_chat(tmp_path / "chat.json", 60)}[dataset_type]()
    seq_len = 32 if dataset_type == "text" else 64  # an Alpaca prompt alone is about 40 tokens
    flags = ["train.py", *TINY, "--dataset_type", dataset_type, "--dataset_path", data, "--max_steps", "6",
             "--seq_len", str(seq_len), "--batch_size", "2", "--total_batch_size", str(4 * 2 * seq_len),
             "--sample_tokens", "8", "--optimizer", optimizer, "--eval_interval", "6",
             "--hellaswag_path", write_hellaswag(tmp_path / "hs.jsonl", 3), "--hellaswag_interval", "3"]
    run_script(*flags, "--out_dir", str(tmp_path / "one"))
    sharded = run_script(*flags, "--fsdp", *extra, "--out_dir", str(tmp_path / "two"), torchrun=True)
    one, two = read_metrics(tmp_path / "one"), read_metrics(tmp_path / "two")
    assert [r["step"] for r in two] == [1, 2, 3, 4, 5, 6]
    for name in ("loss", "val_loss", "hellaswag_acc_norm"):
        assert [r[name] for r in two if name in r] == pytest.approx([r[name] for r in one if name in r], abs=1e-4)
    # the norm of gradients summed in another order (shard by shard): equal to rounding
    assert [r["grad_norm"] for r in two] == pytest.approx([r["grad_norm"] for r in one], rel=1e-3)
    assert sharded.stdout.count("-" * 80) == 2  # the end-of-run sample, printed once


def test_a_sharded_checkpoint_resumes_in_one_process(small_text, tmp_path):
    # one format for both: the losses of the run that was never interrupted (a constant learning rate after warmup,
    # so that stopping at step 3 and going on to 6 is that run). The other way, a one-process checkpoint resumed
    # under FSDP: test_a_muon_checkpoint_from_before_the_optimizer_move_resumes_with_its_run_s_losses[fsdp]
    flags = ["--batch_size", "2", "--total_batch_size", str(4 * 2 * 32), "--min_lr", "3e-3", "--optimizer", "muon"]
    whole = run_train(small_text, tmp_path / "whole", *flags, "--max_steps", "6")
    run_script("train.py", *TINY, "--dataset_path", small_text, *flags, "--max_steps", "3", "--fsdp", "--out_dir",
               str(tmp_path / "fsdp_then_one"), torchrun=True)
    resumed = run_script("train.py", "--resume", "--max_steps", "6", "--out_dir", str(tmp_path / "fsdp_then_one"))
    assert "goes on with the whole model" in resumed.stderr
    records = read_metrics(tmp_path / "fsdp_then_one")
    assert [r["step"] for r in records] == list(range(1, 7))
    assert losses(records) == pytest.approx(losses(whole), abs=1e-4)


def test_activation_checkpointing_gives_the_same_losses(small_text, tmp_path):
    flags = ["--max_steps", "3", "--dropout", "0.1"]  # dropout: recomputation must draw the same masks
    plain = run_train(small_text, tmp_path / "plain", *flags)
    checkpointed = run_train(small_text, tmp_path / "checkpointed", *flags, "--activation_checkpointing")
    assert losses(checkpointed) == pytest.approx(losses(plain), rel=1e-6)


@pytest.mark.slow
def test_fsdp_compiled_gives_the_losses_of_fsdp_eager(small_text, tmp_path):
    flags = ["train.py", *TINY, "--dataset_path", small_text, "--max_steps", "3", "--fsdp"]
    run_script(*flags, "--out_dir", str(tmp_path / "eager"), torchrun=True)
    run_script(*flags, "--compile", "--out_dir", str(tmp_path / "compiled"), torchrun=True)
    assert losses(read_metrics(tmp_path / "compiled")) == pytest.approx(losses(read_metrics(tmp_path / "eager")),
                                                                        rel=1e-3)


def test_resuming_with_another_max_steps_says_what_the_schedule_becomes(small_text, tmp_path, capsys):
    run_train(small_text, tmp_path, "--max_steps", "4", "--save_interval", "2")
    capsys.readouterr()
    records = run_train(small_text, tmp_path, "--resume", "--max_steps", "10")
    note = capsys.readouterr().err
    assert "decays to 3.00e-04 at step 10 instead of 4: 3.00e-04 at step 4, 2.17e-03 at step 5" in note
    assert records[-1]["step"] == 10
    for max_steps in ("4", "3"):  # at or below the checkpoint's step: nothing to train
        with pytest.raises(SystemExit):
            train.main(["--resume", "--out_dir", str(tmp_path), "--max_steps", max_steps])
        assert "is not beyond the checkpoint's step 10" in capsys.readouterr().err


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


@pytest.mark.parametrize("dtype", ["float32", "bfloat16", "float16"])
def test_muon_lowers_the_loss_under_every_dtype(dtype, small_text, tmp_path):
    records = run_train(small_text, tmp_path, "--optimizer", "muon", "--max_steps", "12", "--dtype", dtype,
                        "--eval_interval", "12")
    assert records[-1]["loss"] < records[0]["loss"] - 0.5  # finite, and learning


def test_muon_fine_tunes_on_alpaca_records(tmp_path):
    records = run_train(write_alpaca(tmp_path / "alpaca.json", 60), tmp_path / "out", *ALPACA, "--optimizer",
                        "muon", "--max_steps", "6")
    assert records[-1]["loss"] < records[0]["loss"]


def test_a_checkpoint_of_one_optimizer_resumed_with_the_other_is_one_line(small_text, tmp_path, capsys):
    run_train(small_text, tmp_path, "--max_steps", "2")
    capsys.readouterr()
    with pytest.raises(SystemExit):
        train.main(["--resume", "--out_dir", str(tmp_path), "--max_steps", "4", "--optimizer", "muon"])
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "trained with --optimizer adamw" in err and "--init_from" in err
    train.main(["--dataset_path", small_text, "--out_dir", str(tmp_path / "fresh"), *without_model_flag(TINY),
                "--init_from", str(tmp_path), "--optimizer", "muon", "--max_steps", "2"])  # its weights, afresh
    assert [r["step"] for r in read_metrics(tmp_path / "fresh")] == [1, 2]


# written by the code before the optimizers moved to optim.py (torch.optim.Muon's state, in an AdamW/Muon pair):
# step 4 of an 8-step Muon run, with the losses of that run, uninterrupted
OLD_MUON = os.path.join(REPO, "tests", "fixtures", "muon_ckpt_before_issue_20")


@pytest.mark.parametrize("launch", [[], ["--fsdp"], pytest.param(["--no-fsdp"], marks=pytest.mark.slow)],
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


def test_train_alpaca_sh_fine_tunes_with_train_py_s_recipe_and_trains_from_scratch_with_its_own(tmp_path):
    # a `python` that prints what it would run: the script's choice of flags, without training
    fake = tmp_path / "bin" / "python"
    fake.parent.mkdir()
    fake.write_text('#!/bin/sh\necho "$@"\n')
    fake.chmod(0o755)

    def flags(**env):
        result = subprocess.run(["bash", os.path.join(REPO, "train_alpaca.sh")], capture_output=True, text=True,
                                env={**os.environ, "PATH": f"{fake.parent}:{os.environ['PATH']}", **env})
        assert result.returncode == 0, result.stderr
        return result.stdout.split()

    scratch = flags()
    assert scratch[scratch.index("--max_lr") + 1] == "1e-3" and scratch[scratch.index("--optimizer") + 1] == "adamw"
    fine_tuning = flags(INIT_FROM="gpt2")
    assert "--init_from" in fine_tuning and not {"--max_lr", "--optimizer", "--warmup_steps"} & set(fine_tuning)
    given = flags(INIT_FROM="gpt2", MAX_LR="1e-5")
    assert given[given.index("--max_lr") + 1] == "1e-5"
    # the dataset type follows the records: Alpaca's by default, chat for conversations of either format
    assert scratch[scratch.index("--dataset_type") + 1] == "alpaca"
    for name, records in [("openai.json", [{"messages": []}]), ("sharegpt.jsonl", {"conversations": []})]:
        (tmp_path / name).write_text(json.dumps(records))
        chat = flags(DATASET_PATH=str(tmp_path / name))
        assert chat[chat.index("--dataset_type") + 1] == "chat"
    (tmp_path / "alpaca.json").write_text(json.dumps([{"instruction": 'say \"messages\": hi', "output": "hi"}]))
    alpaca = flags(DATASET_PATH=str(tmp_path / "alpaca.json"))
    assert alpaca[alpaca.index("--dataset_type") + 1] == "alpaca"
    told = flags(DATASET_PATH=str(tmp_path / "alpaca.json"), DATASET_TYPE="chat")  # a type given wins
    assert told[told.index("--dataset_type") + 1] == "chat"


def test_resume_with_fsdp_in_one_process_is_one_line_and_no_notes(small_text, tmp_path, capsys):
    run_train(small_text, tmp_path, "--max_steps", "2")
    with pytest.raises(SystemExit):
        train.main(["--resume", "--out_dir", str(tmp_path), "--fsdp", "--max_steps", "4", "--seed", "7"])
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("error: --fsdp shards the model")  # not the notes first


def test_a_one_process_run_resumes_on_two_processes_with_its_losses(small_text, tmp_path):
    # the default split, 1 process x 4 sequences, cannot go on as 2 x 4: the refusal names the --batch_size that
    # fits, and with it the run goes on with the global batch, so the losses of the uninterrupted run
    whole = run_train(small_text, tmp_path / "whole", "--min_lr", "3e-3", "--optimizer", "muon", "--max_steps", "6")
    run_train(small_text, tmp_path / "resumed", "--min_lr", "3e-3", "--optimizer", "muon", "--max_steps", "3")
    refused = subprocess.run([*TORCHRUN, "train.py", "--resume", "--max_steps", "6", "--out_dir",
                              str(tmp_path / "resumed")], cwd=REPO, capture_output=True, text=True,
                             env=dict(os.environ, OMP_NUM_THREADS="1"), timeout=300)
    assert refused.returncode != 0
    assert "error: --resume on 2 processes: the checkpoint's global batch of 4 sequences" in refused.stderr
    assert "pass --batch_size 2 " in refused.stderr and refused.stderr.count("error:") == 1  # (torchrun adds its own)
    resumed = run_script("train.py", "--resume", "--max_steps", "6", "--batch_size", "2", "--out_dir",
                         str(tmp_path / "resumed"), torchrun=True)
    assert resumed.stderr.count("--resume: the learning rate now decays") == 1  # a note, from rank 0 only
    assert losses(read_metrics(tmp_path / "resumed")) == pytest.approx(losses(whole), abs=1e-4)


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

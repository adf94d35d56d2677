"""
Faults and signals: a run that diverges or whose gradient turns NaN stops and keeps its last good checkpoint; SIGTERM
and Ctrl-C save and stop (a second one at once); workers whose launcher dies save and stop.
"""

import os
import signal
import subprocess
import sys
import time

import pytest
import torch

import train
from conftest import REPO, TINY, TORCHRUN, read_metrics, run_train
from model import GPT


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


def test_a_signal_during_an_evaluation_saves_and_stops_at_once_without_waiting_for_it(small_text, tmp_path):
    # an evaluation of 100,000 batches (minutes): under torchrun the launcher kills the workers a set time after its
    # signal, so the save cannot wait for the evaluation to end
    cmd = [sys.executable, "train.py", "--dataset_path", small_text, "--out_dir", str(tmp_path), *TINY,
           "--max_steps", "10", "--eval_interval", "1", "--eval_steps", "100000"]
    proc = subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        while not proc.stdout.readline().startswith("model "):  # set up: step 1, then its evaluation
            assert proc.poll() is None, proc.stderr.read()
        time.sleep(4)
        proc.send_signal(signal.SIGTERM)
        out, err = proc.communicate(timeout=60)
    finally:
        proc.kill()
    assert proc.returncode == 128 + signal.SIGTERM, err
    assert "stopped by signal at step 1; checkpoint saved" in out
    assert torch.load(tmp_path / "ckpt.pt", weights_only=True)["step"] == 1
    assert "val_loss" not in read_metrics(tmp_path)[-1]  # the evaluation dropped, the step's record kept


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


@pytest.mark.parametrize("signum", [signal.SIGINT, pytest.param(signal.SIGTERM, marks=pytest.mark.slow)])
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


@pytest.mark.slow  # (7-10 s: torchrun, its launcher killed, then a resume)
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


"""
train.py under torchrun: DDP and FSDP on two processes give the losses of one process with twice the accumulation; a
run moves between one process and two, sharded or not; processes that cannot reach each other, or nodes that do not
share the out_dir, are one line.
"""

import json
import os
import socket
import subprocess
import sys

import pytest

from conftest import REPO, TINY, TORCHRUN, losses, read_metrics, run_script, run_train, write_alpaca, write_chat


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


@pytest.mark.slow  # (15 s; across numbers of processes, the default set resumes a one-process run on two)
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


@pytest.mark.slow
def test_fsdp_compiled_gives_the_losses_of_fsdp_eager(small_text, tmp_path):
    flags = ["train.py", *TINY, "--dataset_path", small_text, "--max_steps", "3", "--fsdp"]
    run_script(*flags, "--out_dir", str(tmp_path / "eager"), torchrun=True)
    run_script(*flags, "--compile", "--out_dir", str(tmp_path / "compiled"), torchrun=True)
    assert losses(read_metrics(tmp_path / "compiled")) == pytest.approx(losses(read_metrics(tmp_path / "eager")),
                                                                        rel=1e-3)


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


@pytest.mark.slow  # (11 s: three launches, one under torchrun)
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


"""
Fine-tuning through train.py: --init_from's weights and shape, Alpaca and chat records (losses on the responses
alone, packed or padded alike), and train_alpaca.sh's choice of flags. Fine-tuning's defaults are resolved in
tests/test_options.py.
"""

import argparse
import dataclasses
import json
import os
import subprocess

import pytest
import torch

import hf
import train
from checkpoint import load_model, save_checkpoint
from conftest import REPO, TINY, losses, read_metrics, run_train, without_model_flag, write_alpaca, write_chat
from data import ExampleLoader, TextLoader
from tokenizer import chat_pieces, chat_tokens, get_tokenizer
from model import GPT, GPTConfig


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


def test_muon_fine_tunes_on_alpaca_records(tmp_path):
    records = run_train(write_alpaca(tmp_path / "alpaca.json", 60), tmp_path / "out", *ALPACA, "--optimizer",
                        "muon", "--max_steps", "6")
    assert records[-1]["loss"] < records[0]["loss"]


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
    # each kind of data into its own out_dir, so that the chat example does not collide with the Alpaca one
    assert alpaca[alpaca.index("--out_dir") + 1] == "out-alpaca" and told[told.index("--out_dir") + 1] == "out-chat"
    assert flags(OUT_DIR="mine")[flags(OUT_DIR="mine").index("--out_dir") + 1] == "mine"



def test_weights_trained_with_adamw_fine_tune_with_muon_when_asked(small_text, tmp_path):
    # what a --resume with the other optimizer is told to do instead (tests/test_options.py): the weights, afresh
    torch.manual_seed(0)
    start = GPT(GPTConfig(n_layer=1, n_head=2, n_embd=24, block_size=48))
    save_checkpoint(str(tmp_path / "ckpt.pt"), start, torch.optim.AdamW(start.parameters()),
                    torch.amp.GradScaler("cpu", enabled=False), 2, argparse.Namespace(optimizer="adamw"))
    train.main(["--dataset_path", small_text, "--out_dir", str(tmp_path / "fresh"), *without_model_flag(TINY),
                "--init_from", str(tmp_path), "--optimizer", "muon", "--max_steps", "2"])
    assert [r["step"] for r in read_metrics(tmp_path / "fresh")] == [1, 2]
    ckpt = torch.load(tmp_path / "fresh" / "ckpt.pt", weights_only=True)
    assert ckpt["config"]["optimizer"] == "muon" and set(ckpt["optimizer"]) == {"adamw", "muon"}

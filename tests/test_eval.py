import argparse
import json
import math
import os

import pytest
import torch
import torch.nn.functional as F

import eval as eval_script
import train
from checkpoint import save_checkpoint
from model import GPT, GPTConfig
from test_evaluation import write_hellaswag
from tokenizer import get_tokenizer


def save_random_model(path, block_size=32, **config):
    torch.manual_seed(0)
    model = GPT(GPTConfig(n_layer=1, n_head=2, n_embd=16, block_size=block_size)).eval()
    os.makedirs(path, exist_ok=True)
    save_checkpoint(os.path.join(path, "ckpt.pt"), model, torch.optim.AdamW(model.parameters()),
                    torch.amp.GradScaler("cpu", enabled=False), 1, argparse.Namespace(**config))
    return model


def run_eval(capsys, *flags):
    eval_script.main(["--device", "cpu", "--dtype", "float32", *flags])
    return json.loads(capsys.readouterr().out.strip().splitlines()[-1])


def test_bits_per_byte_over_the_whole_split_matches_a_hand_computation(tmp_path, small_text, capsys):
    model = save_random_model(tmp_path / "run")
    result = run_eval(capsys, "--init_from", str(tmp_path / "run"), "--dataset_path", small_text, "--seq_len", "16")
    # by hand: the last 10% of the tokens, cut into windows of 16, each token after the first predicted once
    tokenizer = get_tokenizer()
    tokens = tokenizer.encode_ordinary(open(small_text, encoding="utf-8").read())
    val = tokens[len(tokens) - int(len(tokens) * 0.1) :]
    nats = []
    for start in range(0, len(val) - 1, 16):
        window = torch.tensor([val[start : start + 17]])
        with torch.no_grad():
            logits, _ = model(window[:, :-1], window[:, 1:])
        nats += F.cross_entropy(logits[0], window[0, 1:], reduction="none").tolist()
    predicted_bytes = len(tokenizer.decode_bytes(val[1:]))  # the text of every token but the first
    assert result["val_tokens"] == len(val) - 1 == len(nats)
    assert result["val_loss"] == pytest.approx(sum(nats) / len(nats), rel=1e-5)
    assert result["val_ppl"] == pytest.approx(math.exp(sum(nats) / len(nats)), rel=1e-5)
    assert result["val_bpb"] == pytest.approx(sum(nats) / math.log(2) / predicted_bytes, rel=1e-5)


def test_hellaswag_picks_the_endings_a_model_was_trained_on(tmp_path, capsys):
    items = [
        {"ctx": "The cat sat on the", "endings": ["mat and purred.", "moon with a spoon.", "car that drove.",
                                                   "sea of green."], "label": 0},
        {"ctx": "To bake bread, first", "endings": ["paint the fence blue.", "mix flour with water.",
                                                     "sing a loud song.", "call the plumber."], "label": 1},
        {"ctx": "After the rain the children", "endings": ["sold the house.", "ate the stars.",
                                                             "jumped in the puddles.", "fixed a laptop."], "label": 2},
    ]
    path = write_hellaswag(tmp_path / "hs.jsonl", items)
    text = "".join(f"{i['ctx']} {i['endings'][i['label']]}\n" for i in items) * 60
    (tmp_path / "train.txt").write_text(text)
    train.main(["--dataset_path", str(tmp_path / "train.txt"), "--out_dir", str(tmp_path / "out"), "--model",
                "gpt2-nano", "--seq_len", "32", "--batch_size", "8", "--max_steps", "60", "--max_lr", "1e-2",
                "--min_lr", "1e-2", "--warmup_steps", "2", "--log_interval", "30", "--eval_interval", "60",
                "--eval_steps", "1", "--sample_tokens", "0", "--device", "cpu", "--dtype", "float32",
                "--hellaswag_path", path, "--hellaswag_interval", "60"])
    with open(tmp_path / "out" / "metrics.jsonl") as f:
        last = [json.loads(line) for line in f][-1]
    assert last["hellaswag_acc_norm"] == 1.0 and last["hellaswag_acc"] == 1.0
    capsys.readouterr()
    result = run_eval(capsys, "--init_from", str(tmp_path / "out"), "--dataset_path", "none", "--hellaswag_path",
                      path)
    assert result["hellaswag_acc_norm"] == 1.0 and result["hellaswag_items"] == 3


def test_a_checkpoint_s_run_gives_the_data_defaults_and_the_flags_given_win(tmp_path, small_text, capsys):
    save_random_model(tmp_path / "run", dataset_type="text", dataset_path=small_text, seq_len=16)
    saved = run_eval(capsys, "--init_from", str(tmp_path / "run"))
    assert saved["dataset"] == f"text:{small_text}"
    (tmp_path / "other.txt").write_text(open(small_text).read()[:8000])
    given = run_eval(capsys, "--init_from", str(tmp_path / "run"), "--dataset_path", str(tmp_path / "other.txt"))
    assert given["dataset"] == f"text:{tmp_path / 'other.txt'}" and given["val_tokens"] < saved["val_tokens"]


def test_ctrl_c_while_evaluating_stops_without_a_traceback(tmp_path, small_text, capsys, monkeypatch):
    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt
    monkeypatch.setattr(eval_script, "evaluate", interrupted)
    save_random_model(str(tmp_path), dataset_type="text", dataset_path=small_text, seq_len=32)
    with pytest.raises(SystemExit) as exit_info:
        eval_script.main(["--init_from", str(tmp_path), "--device", "cpu"])
    assert exit_info.value.code == 130 and "Traceback" not in capsys.readouterr().err


def test_a_long_evaluation_shows_its_progress(tmp_path, small_text, capsys, monkeypatch):
    save_random_model(str(tmp_path), dataset_type="text", dataset_path=small_text, seq_len=32)
    clock = iter(range(0, 10_000, 2))  # two seconds between batches: a line each
    monkeypatch.setattr(eval_script.time, "time", lambda: next(clock))
    eval_script.main(["--device", "cpu", "--dtype", "float32", "--init_from", str(tmp_path)])
    out, err = capsys.readouterr()
    result = json.loads(out.strip().splitlines()[-1])
    assert f"evaluating: {result['val_tokens']:,} tokens in" in err

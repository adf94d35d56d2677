import json
import math
import os

import numpy as np
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import eval as eval_script
import train
from data import EOT_TOKEN, get_tokenizer, load_hellaswag, token_byte_lengths
from model import GPT, GPTConfig


def save_random_model(path, block_size=32):
    torch.manual_seed(0)
    model = GPT(GPTConfig(n_layer=1, n_head=2, n_embd=16, block_size=block_size)).eval()
    os.makedirs(path, exist_ok=True)
    train.save_checkpoint(os.path.join(path, "ckpt.pt"), model, torch.optim.AdamW(model.parameters()),
                          torch.amp.GradScaler("cpu", enabled=False), 1, train.argparse.Namespace())
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


def test_endoftext_has_no_bytes_and_other_tokens_their_text_s():
    lengths = token_byte_lengths()
    assert lengths[EOT_TOKEN] == 0 and len(lengths) == EOT_TOKEN + 1
    ids = get_tokenizer().encode_ordinary("Héllo, wörld! 日本")
    assert sum(lengths[ids]) == len("Héllo, wörld! 日本".encode("utf-8"))


class FixedCostModel(nn.Module):
    """Logits that give each token the same loss wherever it is: cost[t] less the same normaliser for all."""

    def __init__(self, costs):
        super().__init__()
        self.config = GPTConfig(n_layer=1, n_head=1, n_embd=4, block_size=64, vocab_size=len(costs))
        self.log_probs = -torch.tensor(costs)

    def forward(self, x, y=None):
        return self.log_probs.expand(*x.shape, -1), None


def write_hellaswag(path, items):
    path.write_text("\n".join(json.dumps(item) for item in items))
    return str(path)


def test_acc_norm_divides_an_ending_s_loss_by_its_length():
    # context [0]; the right ending: 4 tokens of ~0.5 nat (2 in all); a wrong one: 1 token of ~1.5 nats
    model = FixedCostModel([3.0, 1.0, 2.0, 3.0])
    items = [([0], [[1, 1, 1, 1], [2]], 0)]
    scores = train.hellaswag_accuracy(model, items, train.setup_runtime("cpu", "float32"), lambda t: t)
    assert scores == {"acc": 0.0, "acc_norm": 1.0}


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


@pytest.mark.parametrize("line, message", [("not json", "line 1 is not a HellaSwag item"),
                                           ('{"ctx": "a", "endings": ["b"], "label": 0}', "line 1")])
def test_a_bad_hellaswag_file_is_one_line(tmp_path, line, message):
    (tmp_path / "hs.jsonl").write_text(line)
    with pytest.raises(train.DataError, match=message):
        load_hellaswag(str(tmp_path / "hs.jsonl"))


def test_plot_draws_several_runs_into_a_png(tmp_path):
    pytest.importorskip("matplotlib")
    import plot

    for run in ("a", "b"):
        (tmp_path / run).mkdir()
        (tmp_path / run / "metrics.jsonl").write_text("\n".join(json.dumps(
            {"step": s, "loss": 5 - s / 10, "lr": 1e-3, "tokens_per_sec": 900, **({"val_loss": 5} if s % 5 == 0
                                                                                    else {})}) for s in range(1, 11)))
    plot.main([str(tmp_path / "a"), str(tmp_path / "b" / "metrics.jsonl"), "--out", str(tmp_path / "runs.png")])
    assert (tmp_path / "runs.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

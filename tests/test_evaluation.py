import json
import random

import torch
import torch.nn as nn
import pytest

import evaluation
from evaluation import hellaswag_accuracy, load_hellaswag, token_byte_lengths
from files import DataError
from model import GPT, GPTConfig
from runtime import Runtime, setup_runtime
from tokenizer import EOT_TOKEN, get_tokenizer


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

    def forward(self, x, y=None, loss_reduction="mean", return_logits=True):
        log_probs = self.log_probs.expand(*x.shape, -1)
        nats = -log_probs.gather(-1, y.clamp(min=0)[..., None]).squeeze(-1) * (y != -100)  # (B, T), as GPT's
        return log_probs, nats


def write_hellaswag(path, items):
    path.write_text("\n".join(json.dumps(item) for item in items))
    return str(path)


def test_acc_norm_divides_an_ending_s_loss_by_its_length():
    # context [0]; the right ending: 4 tokens of ~0.5 nat (2 in all); a wrong one: 1 token of ~1.5 nats
    model = FixedCostModel([3.0, 1.0, 2.0, 3.0])
    items = [([0], [[1, 1, 1, 1], [2]], 0)]
    scores = hellaswag_accuracy(model, items, setup_runtime("cpu", "float32"))
    assert scores == {"acc": 0.0, "acc_norm": 1.0}


@pytest.mark.parametrize("line, message", [("not json", "line 1 is not a HellaSwag item"),
                                           ("[" * 50_000 + "]" * 50_000, "line 1 is not a HellaSwag item"),
                                           ('{"ctx": "a", "endings": ["b"], "label": 0}', "line 1")])
def test_a_bad_hellaswag_file_is_one_line(tmp_path, line, message):
    (tmp_path / "hs.jsonl").write_text(line)
    with pytest.raises(DataError, match=message):
        load_hellaswag(str(tmp_path / "hs.jsonl"), setup_runtime("cpu", "float32"))


def test_batched_hellaswag_scores_each_item_as_a_forward_pass_of_its_own_would():
    torch.manual_seed(0)
    model = GPT(GPTConfig(n_layer=2, n_head=2, n_embd=32, block_size=32)).eval()
    rng = random.Random(0)
    items = [([rng.randrange(50257) for _ in range(rng.randrange(1, 40))],  # some contexts longer than the model's
              [[rng.randrange(50257) for _ in range(rng.randrange(1, 6))] for _ in range(rng.choice([2, 4]))],
              rng.randrange(2)) for _ in range(23)]

    def alone(context, ending):  # the ending's total loss, in a forward pass of its own row
        row = (context + ending)[-33:]
        x, y = torch.tensor([row[:-1]]), torch.tensor([[-100] * (len(row) - 1 - len(ending)) + ending])
        return model(x, y, loss_reduction="none")[1].sum().item()

    expected = {"acc": 0, "acc_norm": 0}
    for context, endings, label in items:
        losses = [alone(context, ending) for ending in endings]
        expected["acc"] += min(range(len(endings)), key=lambda i: losses[i]) == label
        expected["acc_norm"] += min(range(len(endings)), key=lambda i: losses[i] / len(endings[i])) == label
    expected = {name: right / len(items) for name, right in expected.items()}
    assert 0 < expected["acc"] < 1
    rt = setup_runtime("cpu", "float32")
    for items_per_forward in (1, 5, 64):
        assert hellaswag_accuracy(model, items, rt, items_per_forward) == expected


def test_hellaswag_is_downloaded_by_the_first_process_of_a_node_only(tmp_path, monkeypatch):
    monkeypatch.setenv("HOME", str(tmp_path))
    fetched = []
    monkeypatch.setattr(evaluation, "fetch", lambda url, path: fetched.append(path))
    path = evaluation.download_hellaswag(Runtime("cpu", "cpu", torch.float32, rank=1, local_rank=1))
    assert fetched == []  # the others wait (any_rank), then read what it wrote
    assert evaluation.download_hellaswag(Runtime("cpu", "cpu", torch.float32, rank=2, local_rank=0)) == path
    assert fetched == [path]

"""
Evaluation, the same for train.py's periodic evaluation and for eval.py: loss, perplexity and bits per byte over
batches of (x, y), and HellaSwag (reading its items, and scoring them). Over all ranks under torchrun: each rank
passes its own batches or items, and the figures are the whole job's.
"""

import functools
import math
import os

import numpy as np
import torch

from files import DataError, WriteError, describe_write_failure, parse_json, write_atomically
from tokenizer import EOT_TOKEN, IGNORE_INDEX, get_tokenizer


@functools.lru_cache(maxsize=None)
def token_byte_lengths():
    """The UTF-8 byte length of every token's text, as an int64 array indexed by token id. <|endoftext|> is not
    text: 0 bytes. Bits per byte divides a loss by these, so models with other tokenizers or sequence lengths
    compare."""
    tokenizer = get_tokenizer()
    lengths = [len(tokenizer.decode_single_token_bytes(i)) for i in range(EOT_TOKEN)]
    return np.array(lengths + [0], dtype=np.int64)


@torch.no_grad()
def evaluate(model, batches, rt, stop=None):
    """{"loss": nats per label, "ppl": perplexity, "bpb": bits per byte, "labels": labels counted} over a loader's
    batches (x, y, positions), all ranks' together. Bits per byte leave out <|endoftext|>, which stands for no text
    (nanochat's convention). stop: asked before each batch (every rank alike: each has as many batches), and when it
    says so the evaluation is dropped and None returned: train.py's signal, which must not wait for the whole of it."""
    was_training = model.training
    model.eval()
    byte_lengths = torch.from_numpy(token_byte_lengths()).to(rt.device)
    sums = torch.zeros(4, device=rt.device, dtype=sum_dtype(rt))  # nats, labels, nats of text tokens, their bytes
    for batch in batches:
        if stop is not None and stop():
            model.train(was_training)
            return None
        x, y, positions = rt.to_device(batch)
        with rt.autocast():
            # (B, T), 0 where y is IGNORE_INDEX
            _, nats = model(x, y, loss_reduction="none", positions=positions, return_logits=False)
        labelled = y != IGNORE_INDEX
        token_bytes = byte_lengths[y.clamp(min=0)] * labelled
        nats = nats.to(sums.dtype)
        text_nats = nats * (token_bytes > 0)  # a mask, not an index: no wait for the device
        sums += torch.stack([nats.sum(), labelled.sum(), text_nats.sum(), token_bytes.sum()]).to(sums)
    model.train(was_training)
    nats, labels, text_nats, text_bytes = rt.all_reduce_sum(sums).tolist()
    loss = nats / labels
    return {"loss": loss, "ppl": math.exp(min(loss, 700)), "bpb": text_nats / math.log(2) / max(text_bytes, 1),
            "labels": int(labels)}


def sum_dtype(rt):
    """Sums over a whole evaluation are kept in float64 (millions of float32 terms would lose digits), except on
    Apple's MPS, which has no float64."""
    return torch.float32 if rt.device_type == "mps" else torch.float64


# ----------------------------------------------------------------------------------------------------------------
# HellaSwag: 10,042 validation items, a context and four endings each, one of them right.

HELLASWAG_URL = "https://raw.githubusercontent.com/rowanz/hellaswag/master/data/hellaswag_val.jsonl"


def load_hellaswag(path, rt):
    """HellaSwag items from its JSONL (rowanz/hellaswag's hellaswag_val.jsonl: "ctx", "endings", "label"), as
    (context tokens, [tokens of each ending], label). Each ending is scored as a completion of the context,
    the way GPT-2 reproductions do it: " " + ending after the context. path "download": fetched once (every rank
    calls this)."""
    if path == "download":
        path = download_hellaswag(rt)
    tokenizer, items = get_tokenizer(), []
    try:
        with open(path, encoding="utf-8") as f:
            for lineno, line in enumerate(f, 1):
                if not line.strip():
                    continue
                try:
                    item = parse_json(line)
                    context, endings, label = item["ctx"], item["endings"], int(item["label"])
                    if not (isinstance(endings, list) and len(endings) >= 2 and 0 <= label < len(endings)):
                        raise ValueError
                except (ValueError, KeyError, TypeError):
                    raise DataError(f'{path} line {lineno} is not a HellaSwag item (JSON with "ctx", a list of '
                                    f'"endings" and the "label" of the right one)')
                items.append((tokenizer.encode_ordinary(context),
                              [tokenizer.encode_ordinary(" " + ending) for ending in endings], label))
    except OSError as e:
        raise DataError(f"cannot read HellaSwag file {path}: {e.strerror}; pass hellaswag_val.jsonl from "
                        f"github.com/rowanz/hellaswag, or 'download' when online")
    if not items:
        raise DataError(f"{path} holds no HellaSwag items")
    return items


def download_hellaswag(rt):
    """HellaSwag's validation set, fetched once into ~/.cache/gpt2-train: by the first process of each node while
    the others wait (a node's processes share the cache; nodes may not), then read by all. Returns its path."""
    path = os.path.join(os.path.expanduser("~"), ".cache", "gpt2-train", "hellaswag_val.jsonl")
    error = None
    if rt.local_rank == 0 and not os.path.exists(path):
        try:
            fetch(HELLASWAG_URL, path)
        except DataError as e:
            error = e
    if rt.any_rank(error is not None):  # also the wait: every rank passes here once the downloads are done
        raise error or DataError("HellaSwag's download failed on another node (its log says why)")
    return path


def fetch(url, path):
    """url's content into path, atomically (files.write_atomically): another job fetching it at the same time (two
    nodes sharing a home directory) never sees half a file."""
    import urllib.request

    try:
        with urllib.request.urlopen(url, timeout=30) as response:
            data = response.read()
    except OSError as e:
        raise DataError(f"cannot download HellaSwag from {url} ({e}): offline? Download hellaswag_val.jsonl "
                        f"elsewhere and pass its path")
    try:
        os.makedirs(os.path.dirname(path), exist_ok=True)
    except OSError as e:
        raise WriteError(describe_write_failure(path, e))
    write_atomically(path, lambda f: f.write(data))


@torch.no_grad()
def hellaswag_accuracy(model, items, rt, items_per_forward=16, stop=None):
    """HellaSwag as GPT-2 reproductions score it: each ending's tokens are scored by their loss after the context;
    acc picks the ending with the lowest total loss, acc_norm the lowest loss per token (so long endings are not
    penalised for their length). Each rank scores its share of the items, items_per_forward of them (all their
    endings, a row each) per forward pass; the counts stay on the device until the end: one wait for it in all.
    stop: as evaluate's (asked before each forward pass, as many on every rank)."""
    was_training = model.training
    model.eval()
    counts = torch.zeros(3, device=rt.device, dtype=sum_dtype(rt))  # items, right by acc, right by acc_norm
    mine = items[rt.rank :: rt.world_size]
    # as many forward passes on every rank (a sharded model's forward is a collective): a rank short of items
    # scores its first ones again, uncounted
    forwards = math.ceil(math.ceil(len(items) / rt.world_size) / items_per_forward)
    for start in range(0, forwards * items_per_forward, items_per_forward):
        if stop is not None and stop():
            model.train(was_training)
            return None
        batch = mine[start : start + items_per_forward]
        counted, batch = bool(batch), batch or items[:1]
        x, y, item, ending, lengths, labels = rt.to_device(hellaswag_batch(batch, model.config.block_size))
        with rt.autocast():
            _, nats = model(x, y, loss_reduction="none", return_logits=False)  # (rows, T): each ending's tokens' losses
        # (items, endings) tables of the endings' losses, inf where an item has fewer endings than the widest
        total = torch.full((len(batch), max(len(endings) for _, endings, _ in batch)), math.inf, device=rt.device)
        per_token = total.clone()
        total[item, ending] = nats.sum(1)
        per_token[item, ending] = nats.sum(1) / lengths
        if counted:
            counts[0] += len(batch)  # a number, not a tensor from the host: no copy that waits for the device
            counts[1] += (total.argmin(1) == labels).sum()
            counts[2] += (per_token.argmin(1) == labels).sum()
    model.train(was_training)
    n, right, right_norm = rt.all_reduce_sum(counts).tolist()
    return {"acc": right / n, "acc_norm": right_norm / n}


def hellaswag_batch(items, block_size):
    """The rows of some HellaSwag items, one per ending: x, y (rows, longest row - 1), y IGNORE_INDEX except on the
    ending's tokens; then each row's item (index in items) and ending (index in the item), the number of tokens
    scored, and each item's label. A row too long for the model loses the start of its context."""
    rows, item, ending, lengths = [], [], [], []
    for i, (context, endings, _) in enumerate(items):
        for j, tokens in enumerate(endings):
            row = (context + tokens)[-(block_size + 1) :]
            rows.append(row)
            item.append(i)
            ending.append(j)
            lengths.append(min(len(tokens), len(row) - 1))
    x = torch.full((len(rows), max(map(len, rows)) - 1), EOT_TOKEN, dtype=torch.long)
    y = torch.full_like(x, IGNORE_INDEX)
    for r, (row, n) in enumerate(zip(rows, lengths)):
        x[r, : len(row) - 1] = torch.tensor(row[:-1])
        y[r, len(row) - 1 - n : len(row) - 1] = torch.tensor(row[len(row) - n :])
    labels = [label for _, _, label in items]
    return x, y, *(torch.tensor(values) for values in (item, ending, lengths, labels))

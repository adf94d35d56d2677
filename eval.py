"""
Evaluate a model: loss, perplexity and bits per byte over a whole split, and HellaSwag accuracy.

    python eval.py --init_from out                               # the run's own validation data
    python eval.py --init_from gpt2 --dataset_path input.txt     # any model on a text file's last 10%
    python eval.py --init_from out --dataset_type shards --dataset_path fineweb10B --max_tokens 10_000_000
    python eval.py --init_from gpt2 --hellaswag_path hellaswag_val.jsonl   # or 'download' (online)

Text and shards: the split is cut into consecutive windows of --seq_len tokens, each token predicted once with the
preceding tokens of its window as context. Alpaca: every example of the split, loss on its response. Bits per byte
divide the loss by the UTF-8 bytes of the predicted tokens, so models with other tokenizers or context lengths
compare. Prints a line per metric, then one JSON line.
"""

import argparse
import json
import sys

import numpy as np
import torch

from checkpoint import is_checkpoint, load_checkpoint, load_model
from data import IGNORE_INDEX, LOADERS, AlpacaLoader, DataError
from evaluation import evaluate, hellaswag_accuracy, load_hellaswag
from cli import OneLineParser, UserError, add_device_flags, positive_int, print_error
from runtime import setup_runtime


def build_parser():
    p = OneLineParser(description="Evaluate a model on a split and on HellaSwag.",
                            formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    a = p.add_argument
    a("--init_from", default="out", help="a checkpoint (out/ckpt.pt or its directory), a Hugging Face GPT-2 "
      "directory, or gpt2, gpt2-medium, gpt2-large, gpt2-xl")
    a("--dataset_type", choices=list(LOADERS), help="as in train.py (default: the checkpoint's, else "
      "text)")
    a("--dataset_path", help="as in train.py (default: the checkpoint's, else input.txt; 'none' skips the split)")
    a("--split", default="val", choices=["val", "train"], help="which split to evaluate")
    a("--seq_len", type=positive_int, help="tokens per window (default: the model's context)")
    a("--batch_size", type=positive_int, default=8, help="windows or examples per forward pass")
    a("--max_tokens", type=positive_int, help="stop after about this many predicted tokens (default: the whole split)")
    a("--hellaswag_path", help="HellaSwag's hellaswag_val.jsonl, or 'download' (online)")
    a("--hellaswag_limit", type=positive_int, help="score only the first N items")
    add_device_flags(p)
    return p


def windows(tokens, seq_len, batch_size, max_tokens):
    """(x, y) batches of consecutive windows over a token array: every token but the first predicted once."""
    n_windows = -(-(len(tokens) - 1) // seq_len)  # the last window may be shorter
    if max_tokens:
        n_windows = min(n_windows, -(-max_tokens // seq_len))
    for first in range(0, n_windows, batch_size):
        rows = [np.asarray(tokens[w * seq_len : (w + 1) * seq_len + 1], dtype=np.int64)
                for w in range(first, min(first + batch_size, n_windows))]
        x = torch.full((len(rows), max(map(len, rows)) - 1), 0, dtype=torch.long)
        y = torch.full_like(x, IGNORE_INDEX)
        for i, row in enumerate(rows):
            x[i, : len(row) - 1] = torch.from_numpy(row[:-1])
            y[i, : len(row) - 1] = torch.from_numpy(row[1:])
        yield x, y


def alpaca_batches(loader, split, batch_size, max_tokens):
    ids, predicted = loader.splits[split], 0
    for first in range(0, len(ids), batch_size):
        x, y = loader.collate(ids[first : first + batch_size])
        yield x, y
        predicted += int((y != IGNORE_INDEX).sum())
        if max_tokens and predicted >= max_tokens:
            return


def evaluate_split(model, args, rt):
    loader = LOADERS[args.dataset_type](args.dataset_path, args.seq_len, args.batch_size, 1, seed=args.seed)
    if isinstance(loader, AlpacaLoader):
        batches = alpaca_batches(loader, args.split, args.batch_size, args.max_tokens)
    else:
        batches = windows(loader.splits[args.split], args.seq_len, args.batch_size, args.max_tokens)
    result = evaluate(model, batches, rt)
    return {"loss": result["loss"], "ppl": result["ppl"], "bpb": result["bpb"], "tokens": result["labels"]}


def main(argv=None):
    args = build_parser().parse_args(argv)
    try:
        saved = {}
        if is_checkpoint(args.init_from):
            # the run's own data, by default (a look at the config: load_model checks the weights below)
            saved = load_checkpoint(args.init_from, mmap=True, verify=False)["config"]
        args.dataset_type = args.dataset_type or saved.get("dataset_type", "text")
        args.dataset_path = args.dataset_path or saved.get("dataset_path", "input.txt")
        rt = setup_runtime(args.device, args.dtype)
        model = load_model(args.init_from).to(rt.device).eval()
        args.seq_len = args.seq_len or saved.get("seq_len") or model.config.block_size
        if args.seq_len > model.config.block_size:
            raise UserError(f"--seq_len {args.seq_len} is longer than the model's context "
                            f"({model.config.block_size})")
        args.seed = saved.get("seed", 1337)  # the seed of the Alpaca split and of the loaders' defaults
        results = {"model": args.init_from}
        if args.dataset_path != "none":
            split = evaluate_split(model, args, rt)
            results.update({f"{args.split}_{name}": value for name, value in split.items()})
            results["dataset"] = f"{args.dataset_type}:{args.dataset_path}"
        if args.hellaswag_path:
            items = load_hellaswag(args.hellaswag_path, rt)[: args.hellaswag_limit]
            scores = hellaswag_accuracy(model, items, rt)
            results.update({"hellaswag_items": len(items), **{f"hellaswag_{k}": v for k, v in scores.items()}})
    except (UserError, DataError) as e:
        print_error(e)
        sys.exit(2)
    for key, value in results.items():
        print(f"{key:<20} {value:.4f}" if isinstance(value, float) else f"{key:<20} {value}")
    print(json.dumps({k: round(v, 6) if isinstance(v, float) else v for k, v in results.items()}))


if __name__ == "__main__":
    main()

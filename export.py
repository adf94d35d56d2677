"""
Export a model to the Hugging Face format, for transformers, lm-evaluation-harness and the rest of that ecosystem.

    python export.py --init_from out --out_dir out/hf
    python -c "from transformers import pipeline; print(pipeline('text-generation', 'out/hf')('ROMEO:'))"
    lm_eval --model hf --model_args pretrained=out/hf --tasks hellaswag

The directory gets config.json and model.safetensors (GPT.save_pretrained), and GPT-2's tokenizer as vocab.json
and merges.txt, written from the repo's own tokenizer file, so it loads with AutoTokenizer too.
"""

import argparse
import json
import os
import sys

from data import EOT_TOKEN, get_tokenizer
from train import OneLineParser, TrainError, load_model


def bytes_to_unicode():
    """GPT-2's byte-level BPE writes each byte as a printable character in vocab.json and merges.txt: printable
    bytes stand for themselves, the others are shifted past 255 (the mapping of OpenAI's encoder.py)."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    shifted = [b for b in range(256) if b not in printable]
    return {**{b: chr(b) for b in printable}, **{b: chr(256 + i) for i, b in enumerate(shifted)}}


def save_hf_tokenizer(directory, model_max_length):
    """vocab.json and merges.txt for transformers' GPT2Tokenizer, from tiktoken's ranks. A token's rank is its
    merge's priority, so its merge is the last step of BPE run on its own bytes with the lower-ranked merges only."""
    ranks = get_tokenizer()._mergeable_ranks
    byte_char = bytes_to_unicode()

    def text(token):
        return "".join(byte_char[b] for b in token)

    merges = []
    for token, rank in sorted(ranks.items(), key=lambda item: item[1]):
        if len(token) == 1:
            continue
        parts = [bytes([b]) for b in token]
        while len(parts) > 2:
            pairs = [(ranks.get(a + b, rank), i) for i, (a, b) in enumerate(zip(parts, parts[1:]))]
            best, i = min(pairs)
            if best >= rank:
                raise ValueError(f"token {rank} is not a merge of two earlier tokens")
            parts[i : i + 2] = [parts[i] + parts[i + 1]]
        merges.append(f"{text(parts[0])} {text(parts[1])}")
    vocab = {text(token): rank for token, rank in ranks.items()}
    vocab["<|endoftext|>"] = EOT_TOKEN
    files = {
        "vocab.json": json.dumps(vocab, ensure_ascii=False),
        "merges.txt": "#version: 0.2\n" + "\n".join(merges) + "\n",
        "tokenizer_config.json": json.dumps({
            "tokenizer_class": "GPT2Tokenizer", "model_max_length": model_max_length, "add_prefix_space": False,
            "bos_token": "<|endoftext|>", "eos_token": "<|endoftext|>", "unk_token": "<|endoftext|>"}, indent=2),
    }
    for name, content in files.items():
        with open(os.path.join(directory, name + ".tmp"), "w", encoding="utf-8") as f:
            f.write(content)
        os.replace(os.path.join(directory, name + ".tmp"), os.path.join(directory, name))


def main(argv=None):
    p = OneLineParser(description="Export a model to the Hugging Face format.",
                      formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--init_from", default="out", help="a checkpoint (out/ckpt.pt or its directory), or a Hugging "
                   "Face GPT-2 directory or hub name")
    p.add_argument("--out_dir", required=True, help="the directory to write (created if needed)")
    args = p.parse_args(argv)
    try:
        model = load_model(args.init_from)
        os.makedirs(args.out_dir, exist_ok=True)
        model.save_pretrained(args.out_dir)
        save_hf_tokenizer(args.out_dir, model.config.block_size)
    except (TrainError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    except OSError as e:
        print(f"error: cannot write {args.out_dir}: {e.strerror}", file=sys.stderr)
        sys.exit(2)
    print(f"wrote {args.out_dir}: {model.num_params() / 1e6:.2f}M parameters, loads with "
          f"transformers.GPT2LMHeadModel.from_pretrained({args.out_dir!r})")


if __name__ == "__main__":
    main()

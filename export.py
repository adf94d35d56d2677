"""
Export a model to the Hugging Face format, for transformers, lm-evaluation-harness and the rest of that ecosystem.

    python export.py --init_from out --out_dir out/hf
    python -c "from transformers import pipeline; print(pipeline('text-generation', 'out/hf')('ROMEO:'))"
    lm_eval --model hf --model_args pretrained=out/hf --tasks hellaswag

The directory gets config.json and model.safetensors (hf.save_pretrained), and GPT-2's tokenizer as vocab.json
and merges.txt (hf.save_tokenizer), written from the repo's own tokenizer file, so it loads with AutoTokenizer too.
"""

import argparse
import os
import sys

import hf
from checkpoint import load_model
from runtime import OneLineParser, UserError, print_error


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
        hf.save_pretrained(model, args.out_dir)
        hf.save_tokenizer(args.out_dir, model.config.block_size)
    except (UserError, ValueError) as e:
        print_error(e)
        sys.exit(2)
    except OSError as e:
        print_error(f"cannot write {args.out_dir}: {e.strerror}")
        sys.exit(2)
    print(f"wrote {args.out_dir}: {model.num_params() / 1e6:.2f}M parameters, loads with "
          f"transformers.GPT2LMHeadModel.from_pretrained({args.out_dir!r})")


if __name__ == "__main__":
    main()

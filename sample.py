"""
Generate text from a trained model, printing tokens as they come.

    python sample.py                                             # from the run in out/
    python sample.py --init_from gpt2 --prompt "Hello, I'm a language model,"   # OpenAI's weights (online once)
    python sample.py --init_from out --prompt FILE:prompt.txt --num_samples 3 --top_p 0.9
    echo "ROMEO:" | python sample.py --prompt -
    python sample.py --init_from out-alpaca --instruction "Name three primary colors."   # after train_alpaca.sh

A sample ends at <|endoftext|> or after --max_new_tokens. Past the model's context the window slides (see
GPT.generate_stream), so any length can be asked for.
"""

import argparse
import codecs
import os
import sys

import torch

from checkpoint import load_model
from data import EOT_TOKEN, alpaca_prompt, get_tokenizer
from model import GPT
from cli import (OneLineParser, UserError, add_device_flags, non_negative_float, non_negative_int, positive_int,
                 print_error, probability)
from runtime import setup_runtime


def build_parser():
    p = OneLineParser(description="Sample from a trained GPT-2.",
                      formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    a = p.add_argument
    a("--init_from", default="out", help="a checkpoint (out/ckpt.pt or its directory), a Hugging Face GPT-2 "
      "directory, or gpt2, gpt2-medium, gpt2-large, gpt2-xl")
    a("--prompt", help="the text to continue; FILE:path reads it from a file, - from stdin; an empty prompt "
      "starts from <|endoftext|>, as a new document (default: a newline)")
    a("--instruction", help="for models fine-tuned on Alpaca data: wrap this (and --input) in the Alpaca template "
      "the model was trained with, and print only the response")
    a("--input", default="", help="with --instruction: the context of the task, if any")
    a("--max_new_tokens", type=positive_int, default=200, help="tokens to generate per sample, at most")
    a("--temperature", type=non_negative_float, default=0.8, help="below 1 sharpens, above 1 flattens; 0 is greedy")
    a("--top_k", type=non_negative_int, default=200, help="sample only among the k most likely tokens (0: all)")
    a("--top_p", type=probability, default=1.0, help="sample only among the most likely tokens that make up this "
      "probability (nucleus sampling; 1: all)")
    a("--num_samples", type=positive_int, default=1, help="samples to draw, one after the other")
    a("--seed", type=int, default=1337, help="seeds the sampling: the same seed gives the same samples")
    add_device_flags(p)
    return p


def read_prompt(prompt):
    if prompt == "-":
        return sys.stdin.read()
    if prompt.startswith("FILE:"):
        path = prompt.removeprefix("FILE:")
        try:
            with open(path, encoding="utf-8") as f:
                return f.read()
        except (OSError, UnicodeDecodeError) as e:
            raise UserError(f"cannot read the prompt file {path}: {getattr(e, 'strerror', None) or e}")
    return prompt


def check_args(args):
    if args.instruction is not None and args.prompt is not None:
        raise UserError("--prompt and --instruction exclude each other: --instruction builds the prompt")
    if args.input and args.instruction is None:
        raise UserError("--input goes with --instruction")


def stream_sample(model: GPT, prompt_tokens, args, rt, generator):
    """Print one sample as it is generated; return its new tokens."""
    out = sys.stdout
    tokenizer = get_tokenizer()
    idx = torch.tensor([prompt_tokens], device=rt.device)
    # a character may span several tokens: decode bytes incrementally and print only whole characters
    decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
    new_tokens = []
    with rt.autocast():
        for token in model.generate_stream(idx, args.max_new_tokens, temperature=args.temperature,
                                           top_k=args.top_k or None, top_p=args.top_p, generator=generator,
                                           stop_token=EOT_TOKEN):
            token = token.item()
            if token == EOT_TOKEN:
                break
            new_tokens.append(token)
            out.write(decoder.decode(tokenizer.decode_single_token_bytes(token)))
            out.flush()
    out.write(decoder.decode(b"", final=True))
    return new_tokens


def main(argv=None):
    args = build_parser().parse_args(argv)
    try:
        check_args(args)
        if args.instruction is not None:
            prompt = alpaca_prompt(read_prompt(args.instruction), read_prompt(args.input))
        else:
            prompt = read_prompt("\n" if args.prompt is None else args.prompt)
        rt = setup_runtime(args.device, args.dtype)
        model = load_model(args.init_from).to(rt.device).eval()
    except UserError as e:
        print_error(e)
        sys.exit(2)
    tokenizer = get_tokenizer()
    prompt_tokens = tokenizer.encode_ordinary(prompt) or [EOT_TOKEN]
    if len(prompt_tokens) > model.config.block_size:
        print(f"note: the prompt's {len(prompt_tokens)} tokens exceed the model's context; the model sees the last "
              f"{model.config.block_size}", file=sys.stderr)
    generator = torch.Generator(device=rt.device).manual_seed(args.seed)
    try:
        for i in range(args.num_samples):
            if i > 0:
                print("\n" + "-" * 80)
            if args.instruction is None:
                sys.stdout.write(prompt)
            stream_sample(model, prompt_tokens, args, rt, generator)
        print()
    except BrokenPipeError:  # the reader went away (`| head`): stop quietly, as command-line tools do
        sys.stdout = open(os.devnull, "w")


if __name__ == "__main__":
    main()

"""
Generate text from a trained model, printing tokens as they come.

    python sample.py                                             # from the run in out/
    python sample.py --init_from gpt2 --prompt "Hello, I'm a language model,"   # OpenAI's weights (online once)
    python sample.py --init_from out --prompt FILE:prompt.txt --num_samples 3 --top_p 0.9
    echo "ROMEO:" | python sample.py --prompt -
    python sample.py --init_from out-alpaca --instruction "Name three primary colors."   # after train_alpaca.sh
    python sample.py --init_from out-chat --chat --system "Be brief."   # a conversation, after chat fine-tuning
    printf 'Hi!\nWhat is 2+2?\n' | python sample.py --init_from out-chat --chat --temperature 0   # one reply a line

A sample ends at <|endoftext|> or after --max_new_tokens. Past the model's context the window slides (see
GPT.generate_stream), so any length can be asked for.

--chat reads the user's turns from stdin, one a line, and answers each in tokenizer.py's chat template until the input
ends. The conversation stays in one KV cache from turn to turn: each turn feeds the model only its own new tokens
(bench.py --chat measures it). When a turn would not fit in the model's context, the oldest exchanges are dropped
(the system message stays) and the cache is filled again from what is kept.
"""

import codecs
import os
import sys

import torch

from checkpoint import load_model, trained_on
from model import GPT, KVCache
from cli import (HelpFormatter, OneLineParser, UserError, add_device_flags, non_negative_float, non_negative_int,
                 positive_int, print_error, probability, seed)
from runtime import setup_runtime
from tokenizer import EOT_TOKEN, alpaca_prompt, chat_tokens, get_tokenizer


def build_parser():
    p = OneLineParser(description="Sample from a trained GPT-2.",
                      formatter_class=HelpFormatter)
    a = p.add_argument
    a("--init_from", default="out", help="a checkpoint (out/ckpt.pt or its directory), a Hugging Face GPT-2 "
      "directory, or gpt2, gpt2-medium, gpt2-large, gpt2-xl")
    a("--prompt", help="the text to continue; FILE:path reads it from a file, - from stdin; an empty prompt "
      "starts from <|endoftext|>, as a new document (default: a newline)")
    a("--instruction", help="for models fine-tuned on Alpaca data: wrap this (and --input) in the Alpaca template "
      "the model was trained with, and print only the response")
    a("--input", default="", help="with --instruction: the context of the task, if any")
    a("--chat", action="store_true", help="a conversation in the chat template (tokenizer.py) of a model fine-tuned on "
      "chat data: each line of stdin is a user's turn, each reply printed as it comes, until the input ends")
    a("--system", help="with --chat: the system message that starts the conversation")
    a("--max_new_tokens", type=positive_int, default=200, help="tokens to generate per sample, at most")
    a("--temperature", type=non_negative_float, default=0.8, help="below 1 sharpens, above 1 flattens; 0 is greedy")
    a("--top_k", type=non_negative_int, default=200, help="sample only among the k most likely tokens (0: all)")
    a("--top_p", type=probability, default=1.0, help="sample only among the most likely tokens that make up this "
      "probability (nucleus sampling; 1: all)")
    a("--num_samples", type=positive_int, default=1, help="samples to draw, one after the other")
    a("--seed", type=seed, default=1337, help="seeds the sampling: the same seed gives the same samples")
    add_device_flags(p)
    return p


def read_prompt(prompt):
    if prompt == "-":
        return utf8(sys.stdin.read, "stdin")
    if prompt.startswith("FILE:"):
        path = prompt.removeprefix("FILE:")
        try:
            with open(path, encoding="utf-8") as f:
                return f.read()
        except (OSError, UnicodeDecodeError) as e:
            raise UserError(f"cannot read the prompt file {path}: {getattr(e, 'strerror', None) or e}")
    return prompt


def utf8(read, where):
    """read()'s text, or a UserError if it is not UTF-8: under a strict UTF-8 locale a bad byte raises as it is
    read, under the C locale it arrives as a lone surrogate (surrogateescape) that the tokenizer would choke on."""
    try:
        text = read()
        text.encode("utf-8")
        return text
    except (UnicodeDecodeError, UnicodeEncodeError) as e:
        raise UserError(f"{where} is not UTF-8 text (a bad byte at offset {e.start}): convert it to UTF-8, e.g. "
                        f"iconv -f LATIN1 -t UTF-8")


def check_args(args):
    if args.instruction is not None and args.prompt is not None:
        raise UserError("--prompt and --instruction exclude each other: --instruction builds the prompt")
    if args.input and args.instruction is None:
        raise UserError("--input goes with --instruction")
    if args.chat and (args.prompt is not None or args.instruction is not None):
        raise UserError("--chat excludes --prompt and --instruction: its turns come from stdin")
    if args.system is not None and not args.chat:
        raise UserError("--system goes with --chat")
    if args.chat and args.num_samples != 1:
        raise UserError("--num_samples is for prompts: --chat gives one reply to each turn")


def sampling_kwargs(args, generator):
    """generate_stream's sampling arguments, from the flags."""
    return dict(temperature=args.temperature, top_k=args.top_k or None, top_p=args.top_p, generator=generator)


def print_tokens(tokens):
    """Print token ids as they come; return them. A character may span several tokens: the bytes are decoded
    incrementally and only whole characters printed."""
    tokenizer = get_tokenizer()
    decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
    printed = []
    for token in tokens:
        printed.append(token)
        sys.stdout.write(decoder.decode(tokenizer.decode_single_token_bytes(token)))
        sys.stdout.flush()
    sys.stdout.write(decoder.decode(b"", final=True))
    return printed


def until_endoftext(stream):
    """The ids of generate_stream's tokens (batch of one) up to <|endoftext|>, which is left out."""
    for token in stream:
        token = token.item()
        if token == EOT_TOKEN:
            return
        yield token


def stream_sample(model: GPT, prompt_tokens, args, rt, generator):
    """Print one sample as it is generated; return its new tokens."""
    idx = torch.tensor([prompt_tokens], device=rt.device)
    with rt.autocast():
        stream = model.generate_stream(idx, args.max_new_tokens, stop_token=EOT_TOKEN,
                                       **sampling_kwargs(args, generator))
        return print_tokens(until_endoftext(stream))


class Chat:
    """A conversation with the model in the chat template (tokenizer.py), its tokens in one KVCache from turn to turn:
    each turn feeds the model only what the cache lacks (the user's turn, and the end of the last reply), so the
    tenth turn costs about what the first does. keep_cache=False feeds the whole conversation every turn instead
    (the same replies, for bench.py --chat to compare).

    The tokens kept are the ones generated (a reply cut by max_new_tokens ends with an <|endoftext|> added), not the
    reply's text tokenized again: the two may differ, and the cache holds the first."""

    def __init__(self, model: GPT, system=None, keep_cache=True):
        self.model, self.keep_cache = model, keep_cache
        self.system = [{"role": "system", "content": system}] if system else []
        self.exchanges = []  # (user's text, reply tokens ending in <|endoftext|>) of the turns still in the context
        self.tokens = []  # the conversation's tokens; the cache holds the first cache.length of them
        self.cache = KVCache(model.config)
        self.fed = 0  # tokens the last turn fed the model before its first new token

    def turn_tokens(self, text, first):
        """The tokens a user's turn adds, up to the assistant's header that asks for the reply: those of chat_tokens
        for the conversation so far plus this turn, past the conversation so far. The first turn comes with the
        conversation's start and the system message, tokenized together (the blank line ending the system message is
        one token at the end of a text, two before "User:"); after a reply's <|endoftext|>, text is tokenized apart
        anyway."""
        user = [{"role": "user", "content": text}]
        if first:
            return chat_tokens(self.system + user, add_generation_prompt=True)[0]
        return chat_tokens(user, add_generation_prompt=True)[0][1:]  # less the <|endoftext|> starting a conversation

    def kept_tokens(self):
        """The tokens of the system message and the exchanges kept, as the conversation's start."""
        return [t for k, (text, reply) in enumerate(self.exchanges) for t in self.turn_tokens(text, k == 0) + reply]

    def reply(self, text, max_new_tokens, **sampling):
        """Yield the model's reply to the user's text, token ids as they come (the <|endoftext|> ending it left
        out): at most max_new_tokens, fewer where a long message leaves less room in the context. A message with
        no room at all for a reply is a UserError, and the conversation stays as it was."""
        context = self.model.config.block_size
        alone = len(self.turn_tokens(text, first=True))  # with the system message only
        if alone >= context:
            raise UserError(f"this message takes {alone} tokens in the chat template (system message included) of "
                            f"the model's context of {context}: no room for a reply; not answered")
        turn = self.turn_tokens(text, first=not self.exchanges)
        dropped = 0
        while self.exchanges and len(self.tokens) + len(turn) + max_new_tokens > context:
            self.exchanges.pop(0)
            dropped += 1
            self.tokens = self.kept_tokens()
            turn = self.turn_tokens(text, first=not self.exchanges)
        if dropped:
            self.cache = KVCache(self.model.config)  # filled again below, from the kept conversation
            kept = f"kept {len(self.exchanges)}" + (" and the system message" if self.system else "")
            print(f"note: the conversation outgrew the model's context ({context} tokens): dropped the oldest "
                  f"{dropped} exchange(s), {kept}", file=sys.stderr)
        if not self.keep_cache:
            self.cache = KVCache(self.model.config)
        new = self.tokens[self.cache.length :] + turn  # the tokens the cache lacks
        self.fed = len(new)
        if len(self.tokens) + len(turn) + max_new_tokens > context:  # even alone, the message leaves less room
            max_new_tokens = context - len(self.tokens) - len(turn)
            print(f"note: this message leaves room for a reply of {max_new_tokens} tokens in the model's context of "
                  f"{context}", file=sys.stderr)
        stream = self.model.generate_stream(torch.tensor([new], device=self.model.lm_head.weight.device),
                                            max_new_tokens, stop_token=EOT_TOKEN, cache=self.cache, **sampling)
        reply = []
        for token in until_endoftext(stream):
            reply.append(token)
            yield token
        # the last token yielded (this <|endoftext|>, or the last of a cut reply) is not in the cache yet: it is the
        # start of what the next turn feeds
        self.exchanges.append((text, reply + [EOT_TOKEN]))
        self.tokens += turn + reply + [EOT_TOKEN]


def read_turns():
    """The user's turns: each line of stdin that is not blank, until the input ends. In a terminal, after a "> "
    on stderr; from a pipe, nothing but the replies is printed. A line that is not UTF-8 is a UserError raised in
    its place (read as bytes, so the lines after it are read as usual)."""
    stdin = getattr(sys.stdin, "buffer", None)  # (a test's StringIO has none)
    while True:
        if sys.stdin.isatty():
            print("> ", end="", file=sys.stderr, flush=True)
        if stdin is not None:
            raw = stdin.readline()
            try:
                line = utf8(lambda: raw.decode("utf-8"), "this line")
            except UserError as e:
                yield e
                continue
        else:
            line = sys.stdin.readline()
        if not line:
            if sys.stdin.isatty():  # Ctrl-D: the shell's prompt on a line of its own
                print(file=sys.stderr)
            return
        if line.strip():
            yield line


def print_samples(model: GPT, prompt, args, rt, generator):
    """--num_samples samples of the prompt, each printed as it comes."""
    prompt_tokens = get_tokenizer().encode_ordinary(prompt) or [EOT_TOKEN]
    if len(prompt_tokens) > model.config.block_size:
        print(f"note: the prompt's {len(prompt_tokens)} tokens exceed the model's context; the model sees the last "
              f"{model.config.block_size}", file=sys.stderr)
    for i in range(args.num_samples):
        if i > 0:
            print("\n" + "-" * 80)
        if args.instruction is None:
            sys.stdout.write(prompt)
        stream_sample(model, prompt_tokens, args, rt, generator)
    print()


def chat(model: GPT, args, rt, generator):
    """--chat: answer each turn from stdin, the reply printed as it comes, then a newline."""
    conversation = Chat(model, args.system)
    room = model.config.block_size - len(conversation.turn_tokens("", first=True))
    if room < 2:  # no room for a user's word and a reply's first token
        raise UserError(f"--system takes {model.config.block_size - room} tokens in the chat template, with the "
                        f"headers of a user's turn and the reply, of the model's context of "
                        f"{model.config.block_size}: no room for a conversation; shorten it")
    try:
        for text in read_turns():
            try:
                if isinstance(text, UserError):
                    raise text
                with rt.autocast():
                    print_tokens(conversation.reply(text, args.max_new_tokens, **sampling_kwargs(args, generator)))
            except UserError as e:  # the message does not fit: an empty reply, so that replies and lines still pair
                print_error(e)
            print(flush=True)
    except KeyboardInterrupt:  # Ctrl-C ends a conversation as end of input does
        print(file=sys.stderr)


# What the flags that apply a template expect the model to have been fine-tuned on (train.py --dataset_type)
TEMPLATES = {"chat": ("chat", "conversations"), "instruction": ("alpaca", "Alpaca records")}


def main(argv=None):
    args = build_parser().parse_args(argv)
    try:
        check_args(args)
        if args.chat:
            prompt = None
        elif args.instruction is not None:
            prompt = alpaca_prompt(read_prompt(args.instruction), read_prompt(args.input))
        else:
            prompt = read_prompt("\n" if args.prompt is None else args.prompt)
        rt = setup_runtime(args.device, args.dtype)
        model = load_model(args.init_from).to(rt.device).eval()
        warn_of_an_untrained_template(args)
        generator = torch.Generator(device=rt.device).manual_seed(args.seed)
        if args.chat:
            chat(model, args, rt, generator)
        else:
            print_samples(model, prompt, args, rt, generator)
    except UserError as e:
        print_error(e)
        sys.exit(2)
    except KeyboardInterrupt:  # Ctrl-C, while loading or sampling: stop, without a traceback
        print(file=sys.stderr)
        sys.exit(130)
    except BrokenPipeError:  # the reader went away (`| head`): stop quietly, as command-line tools do
        sys.stdout = open(os.devnull, "w")


def warn_of_an_untrained_template(args):
    """--chat or --instruction on weights that were not fine-tuned on that template run, but answer with whatever
    the text goes on with; a model trained on them given neither them nor a --prompt continues a newline, outside the
    template it learned, and often ends at once with nothing printed: a note says why, and what to give it."""
    flag = "chat" if args.chat else "instruction" if args.instruction is not None else None
    if flag is None:
        trained = trained_on(args.init_from) if args.prompt is None else None
        if trained in ("alpaca", "chat"):
            how = '--instruction "..."' if trained == "alpaca" else "--chat"
            print(f"note: {args.init_from} was trained on --dataset_type {trained} data: without its template it "
                  f"continues a newline, which it may end at once; sample it with {how}", file=sys.stderr)
        return
    dataset_type, what = TEMPLATES[flag]
    trained = trained_on(args.init_from)
    if trained not in (None, dataset_type):
        print(f"note: {args.init_from} was trained on --dataset_type {trained} data, not {what}: its answers will "
              f"not follow the template; fine-tune it with --dataset_type {dataset_type} first (README.md)",
              file=sys.stderr)


if __name__ == "__main__":
    main()

"""
Data: a text file or Alpaca records -> GPT-2 tokens -> (x, y) batches. Knows nothing of models.

Batches are a pure function of (seed, step, micro_step, rank): the loop asks for "the rows of step s that micro-step
m on rank r trains on", never for "the next batch". That is what makes resuming exact (only the step is needed) and
what makes the global batch the same however it is split into processes and micro-steps.
"""

import base64
import functools
import hashlib
import json
import os

import numpy as np
import torch

HERE = os.path.dirname(os.path.abspath(__file__))
TOKENIZER_FILE = os.path.join(HERE, "gpt2.tiktoken")  # GPT-2's 50,256 BPE ranks, shipped so no download is needed
EOT_TOKEN = 50256  # <|endoftext|>
VAL_FRACTION = 0.1


class DataError(Exception):
    """A problem with the user's data: reported as one line, without a traceback."""


@functools.lru_cache(maxsize=None)
def get_tokenizer():
    """GPT-2's tokenizer, built offline from the file in the repo; its ids are those of tiktoken's "gpt2"."""
    import tiktoken
    from tiktoken_ext.openai_public import r50k_pat_str  # GPT-2's pre-tokenization regex, as tiktoken spells it

    with open(TOKENIZER_FILE, "rb") as f:
        ranks = {base64.b64decode(token): int(rank) for token, rank in (line.split() for line in f if line.strip())}
    return tiktoken.Encoding(
        name="gpt2",
        pat_str=r50k_pat_str,
        mergeable_ranks=ranks,
        special_tokens={"<|endoftext|>": EOT_TOKEN},
        explicit_n_vocab=EOT_TOKEN + 1,
    )


def read_text(path, kind="text file"):
    """The file's text; a missing, empty or non-UTF-8 file is a DataError naming the fix (a `kind` of file)."""
    try:
        with open(path, "rb") as f:
            raw = f.read()
    except FileNotFoundError:
        raise DataError(f"dataset file {path} does not exist: pass an existing {kind} with --dataset_path")
    except IsADirectoryError:
        raise DataError(f"dataset path {path} is a directory: pass a {kind} with --dataset_path")
    except OSError as e:
        raise DataError(f"cannot read dataset file {path}: {e.strerror}")
    if not raw.strip():
        raise DataError(f"dataset file {path} is empty: it needs some text to train on")
    try:
        return raw, raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise DataError(f"dataset file {path} is not UTF-8 text (bad byte at offset {e.start}): convert it to UTF-8")


def load_text_tokens(path):
    """All of the file's tokens, as uint16 (GPT-2's ids fit). Tokenizing is the slow part, so the result is cached
    beside the file in PATH.tokens.npz, keyed by the text's SHA-256: an edited file is tokenized anew. The cache is
    written to a temporary file and renamed into place, so a run killed mid-write never leaves half a cache."""
    raw, text = read_text(path)
    if looks_like_alpaca(text):
        raise DataError(f"{path} holds Alpaca instruction records (JSON with an \"instruction\" key), not plain text: "
                        f"use --dataset_type alpaca")
    digest = hashlib.sha256(raw).hexdigest()
    cache_path = path + ".tokens.npz"
    try:
        with np.load(cache_path) as cache:
            if str(cache["sha256"]) == digest:
                return cache["tokens"]
    except Exception:  # no cache yet, or an unreadable one (cut short, not a zip, fields missing): tokenize anew
        pass
    tokens = np.array(get_tokenizer().encode_ordinary(text), dtype=np.uint16)
    tmp_path = f"{cache_path}.{os.getpid()}.tmp"  # one per process: several ranks may write at once
    try:
        with open(tmp_path, "wb") as f:
            np.savez(f, tokens=tokens, sha256=np.array(digest))
        os.replace(tmp_path, cache_path)
    except OSError:
        # a read-only data folder only costs the caching
        if os.path.exists(tmp_path):
            os.remove(tmp_path)
    return tokens


def batch_rows(micro_step, rank, batch_size, world_size):
    """The one rule that splits a step's global batch of rows: micro-step m of rank r takes the batch_size rows
    starting at (m * world_size + r) * batch_size. Every loader indexes its global batch through this, so the
    global batch is the same whatever the split into processes and micro-steps."""
    start = (micro_step * world_size + rank) * batch_size
    return slice(start, start + batch_size)


class TextLoader:
    """Random windows of a tokenized text file: the first 90% of the tokens for training, the last 10% for
    validation. Row i of step s's global batch is the window at a random offset drawn from (seed, split, s)."""

    def __init__(self, path, seq_len, batch_size, accum_steps, rank=0, world_size=1, seed=1337):
        tokens = load_text_tokens(path)
        n_val = int(len(tokens) * VAL_FRACTION)
        self.splits = {"train": tokens[: len(tokens) - n_val], "val": tokens[len(tokens) - n_val :]}
        for split, split_tokens in self.splits.items():
            if len(split_tokens) < seq_len + 1:
                raise DataError(
                    f"{path} has {len(tokens)} tokens, so its {split} split ({len(split_tokens)} tokens) is shorter "
                    f"than one sequence of --seq_len + 1 = {seq_len + 1} tokens: use a longer text or a smaller "
                    f"--seq_len"
                )
        self.seq_len, self.batch_size, self.seed = seq_len, batch_size, seed
        self.rank, self.world_size = rank, world_size
        self.global_rows = batch_size * world_size * accum_steps

    def get_batch(self, split, step, micro_step):
        """(x, y) int64 tensors of shape (batch_size, seq_len), y being x shifted one token left."""
        tokens = self.splits[split]
        rng = np.random.default_rng([self.seed, 0 if split == "train" else 1, step])
        offsets = rng.integers(0, len(tokens) - self.seq_len, size=self.global_rows)
        offsets = offsets[batch_rows(micro_step, self.rank, self.batch_size, self.world_size)]
        window = tokens[offsets[:, None] + np.arange(self.seq_len + 1)].astype(np.int64)
        window = torch.from_numpy(window)
        return window[:, :-1].contiguous(), window[:, 1:].contiguous()

    def targets_in_step(self, split, step):
        """Supervised tokens in step's whole global batch (see AlpacaLoader.targets_in_step): here, all of them."""
        return self.global_rows * self.seq_len


# ----------------------------------------------------------------------------------------------------------------
# Alpaca instruction data: {"instruction", "input", "output"} records, trained on the response only.

IGNORE_INDEX = -100  # the label F.cross_entropy skips (its default ignore_index): prompt tokens and padding
ALPACA_VAL_FRACTION = 0.05
# The train/val split is drawn from this, not from --seed: trying another seed must not move examples between them.
ALPACA_SPLIT_SEED = 0

# Stanford Alpaca's PROMPT_DICT (tatsu-lab/stanford_alpaca, train.py), word for word.
ALPACA_PROMPT_INPUT = (
    "Below is an instruction that describes a task, paired with an input that provides further context. "
    "Write a response that appropriately completes the request.\n\n"
    "### Instruction:\n{instruction}\n\n### Input:\n{input}\n\n### Response:"
)
ALPACA_PROMPT_NO_INPUT = (
    "Below is an instruction that describes a task. Write a response that appropriately completes the request.\n\n"
    "### Instruction:\n{instruction}\n\n### Response:"
)


def alpaca_prompt(instruction, input=""):
    """The text the model is conditioned on, in training and in sampling alike: Stanford's template, then "\n".
    Stanford ends the prompt at "### Response:" and lets the output follow directly; ending it with the newline
    instead means the response always starts after the same "\n" token, and sampling never has to guess one."""
    template = ALPACA_PROMPT_INPUT if input else ALPACA_PROMPT_NO_INPUT
    return template.format(instruction=instruction, input=input) + "\n"


def first_json_record(text):
    """The first record of a JSON list or JSONL text (None when there is none), or a JSONDecodeError."""
    try:
        records = json.loads(text)
    except json.JSONDecodeError:
        records = json.loads(text.lstrip().split("\n", 1)[0])  # JSONL: one record per line
    return records[0] if isinstance(records, list) and records else records


def looks_like_alpaca(text):
    """Whether a would-be text file is Alpaca data. Plain text rarely starts with [ or {, so it costs nothing."""
    if text.lstrip()[:1] not in ("[", "{"):
        return False
    try:
        record = first_json_record(text)
    except json.JSONDecodeError:
        return False
    return isinstance(record, dict) and "instruction" in record


def read_alpaca_records(path):
    """The file's records, checked: a JSON list of objects, or JSONL (one object per line, blank lines allowed)."""
    _, text = read_text(path, "JSON or JSONL file of Alpaca records")
    try:
        records = json.loads(text)
        records = [records] if isinstance(records, dict) else records  # JSONL with a single line
    except json.JSONDecodeError as e:
        if text.lstrip().startswith("["):  # a JSON list with a mistake in it: point at the mistake
            raise DataError(f"{path} is not valid JSON ({e.msg} at line {e.lineno}, column {e.colno}): fix the file")
        records = []
        for lineno, line in enumerate(text.split("\n"), 1):  # not splitlines(): JSON strings may hold U+2028
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as e:
                if records or line.lstrip().startswith("{"):
                    raise DataError(f"{path} line {lineno} is not valid JSON ({e.msg}): fix or remove that line")
                record = None
            if not records and not isinstance(record, dict):
                raise DataError(f"{path} is neither JSON nor JSONL: Alpaca data is a JSON list of records or one "
                                f"JSON record per line; if it is plain text, use --dataset_type text")
            records.append(record)
    if not isinstance(records, list) or not records:
        raise DataError(f"{path} holds no list of records: Alpaca data is a non-empty JSON list of objects like "
                        f'{{"instruction": "...", "input": "...", "output": "..."}}')
    for i, record in enumerate(records):
        if not isinstance(record, dict):
            raise DataError(f'record {i} of {path} is not an object: each record is {{"instruction": "...", '
                            f'"input": "...", "output": "..."}}')
        for key in ("instruction", "input", "output"):
            if key not in record and key != "input":
                raise DataError(f'record {i} of {path} has no "{key}": every record needs "instruction" and '
                                f'"output" strings ("input" is optional)')
            if key in record and not isinstance(record[key], str):
                raise DataError(f'record {i} of {path}: "{key}" is {json.dumps(record[key])[:40]}, not a string: '
                                f"make it a string")
    return records


class AlpacaLoader:
    """Instruction fine-tuning on Alpaca records. Each example is the tokens of alpaca_prompt(...) then the output's
    then <|endoftext|>; the labels are -100 on the prompt, so only the response (and where it ends) is learned.
    Prompt and output are tokenized apart, so the boundary between them is exact.

    Like TextLoader's, batches are a function of (seed, split, step, micro_step, rank): global row g = step *
    global_rows + i of the training split is example perm_e[g % n] of epoch e = g // n, perm_e drawn from (seed, e),
    so each epoch visits every example once in a fresh order. Validation is 5% of the usable examples (drawn with
    ALPACA_SPLIT_SEED, so a --seq_len that drops examples changes it), read in file order, wrapping. A micro-batch is
    padded to its longest example only: short instructions cost little."""

    def __init__(self, path, seq_len, batch_size, accum_steps, rank=0, world_size=1, seed=1337):
        records = read_alpaca_records(path)
        tokenizer = get_tokenizer()
        examples, n_prompt = [], []
        self.n_records, self.n_truncated, self.n_dropped = len(records), 0, 0
        for record in records:
            prompt = tokenizer.encode_ordinary(alpaca_prompt(record["instruction"], record.get("input", "")))
            if len(prompt) > seq_len:  # x holds seq_len tokens: with a longer prompt no response token is in y
                self.n_dropped += 1
                continue
            response = tokenizer.encode_ordinary(record["output"]) + [EOT_TOKEN]
            if len(prompt) + len(response) > seq_len + 1:  # keep the whole prompt, cut the response
                response = response[: seq_len + 1 - len(prompt)]
                self.n_truncated += 1
            examples.append(np.array(prompt + response, dtype=np.uint16))  # GPT-2's ids fit, as in TextLoader
            n_prompt.append(len(prompt))
        n = len(examples)
        if n == 0:
            raise DataError(f"all {len(records)} records of {path} have prompts longer than --seq_len {seq_len} "
                            f"tokens, leaving no room for a response: use a larger --seq_len")
        if n == 1:
            raise DataError(f"{path} has 1 usable example ({self.n_dropped} dropped as longer than --seq_len): "
                            f"at least 2 are needed, one to train on and one to validate on")
        self.examples, self.n_prompt = examples, np.array(n_prompt)
        # supervised tokens per example: y covers tokens 1.., so every token after the prompt is one target
        self.n_targets = np.array([len(t) for t in examples]) - self.n_prompt
        order = np.random.default_rng(ALPACA_SPLIT_SEED).permutation(n)
        n_val = max(1, int(n * ALPACA_VAL_FRACTION))
        self.splits = {"train": np.sort(order[n_val:]), "val": np.sort(order[:n_val])}  # example indices
        self.seq_len, self.batch_size, self.seed = seq_len, batch_size, seed
        self.rank, self.world_size = rank, world_size
        self.global_rows = batch_size * world_size * accum_steps

    def global_batch(self, split, step):
        """The example indices of step's whole global batch, row by row."""
        ids = self.splits[split]
        n = len(ids)
        g = step * self.global_rows + np.arange(self.global_rows)
        if split == "val":
            return ids[g % n]
        rows = np.empty_like(g)
        for epoch in np.unique(g // n):
            in_epoch = g // n == epoch
            rows[in_epoch] = np.random.default_rng([self.seed, int(epoch)]).permutation(n)[g[in_epoch] % n]
        return ids[rows]

    def get_batch(self, split, step, micro_step):
        """(x, y) int64 tensors of shape (batch_size, longest example - 1): y is x shifted one token left, -100 where
        it is a prompt token or padding. x is padded at the end, where causal attention keeps the padding from the real
        tokens, with <|endoftext|> (any id would do: its labels are ignored)."""
        ids = self.global_batch(split, step)[batch_rows(micro_step, self.rank, self.batch_size, self.world_size)]
        width = max(len(self.examples[i]) for i in ids) - 1
        x = np.full((len(ids), width), EOT_TOKEN, dtype=np.int64)
        y = np.full((len(ids), width), IGNORE_INDEX, dtype=np.int64)
        for row, i in enumerate(ids):
            tokens = self.examples[i]
            x[row, : len(tokens) - 1] = tokens[:-1]
            y[row, self.n_prompt[i] - 1 : len(tokens) - 1] = tokens[self.n_prompt[i] :]  # y[j] is token j + 1
        return torch.from_numpy(x), torch.from_numpy(y)

    def targets_in_step(self, split, step):
        """Supervised tokens (y != -100) in step's whole global batch, all micro-steps and ranks: a function of the
        step, so each rank knows it without communicating. Dividing the summed loss by it weights every response
        token alike, however the tokens fall into micro-batches."""
        return int(self.n_targets[self.global_batch(split, step)].sum())

"""
Data: text -> GPT-2 tokens -> (x, y) batches. Knows nothing of models.

Batches are a pure function of (seed, step, micro_step, rank): the loop asks for "the rows of step s that micro-step
m on rank r trains on", never for "the next batch". That is what makes resuming exact (only the step is needed) and
what makes the global batch the same however it is split into processes and micro-steps.
"""

import base64
import functools
import hashlib
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


def read_text(path):
    """The file's text; a missing, empty or non-UTF-8 file is a DataError naming the fix."""
    try:
        with open(path, "rb") as f:
            raw = f.read()
    except FileNotFoundError:
        raise DataError(f"dataset file {path} does not exist: pass an existing text file with --dataset_path")
    except IsADirectoryError:
        raise DataError(f"dataset path {path} is a directory: pass a text file with --dataset_path")
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

"""
Data: a text file, Alpaca or chat records, or token shards -> GPT-2 tokens -> (x, y) batches. Knows nothing of models.
Batches are a pure function of (seed, step, micro_step, rank): the loop asks for "the rows of step s that micro-step
m on rank r trains on", never for "the next batch". That is what makes resuming exact (only the step is needed) and
the global batch the same however it is split into processes and micro-steps.
"""

import hashlib
import json
import os
import re

import numpy as np
import torch

from files import DataError, WriteError, read_text, write_atomically
from measure import check_text_fits_in_memory
from records import conversation, json_records_type, read_alpaca_records, read_json_records
from tokenizer import EOT_TOKEN, IGNORE_INDEX, alpaca_prompt, chat_tokens, get_tokenizer

VAL_FRACTION = 0.1


def load_text_tokens(path):
    """All of the file's tokens, as uint16 (GPT-2's ids fit). Tokenizing is the slow part, so the result is cached
    beside the file in PATH.tokens.npz, keyed by the text's SHA-256: an edited file is tokenized anew. The cache is
    written to a temporary file and renamed into place, so a run killed mid-write never leaves half a cache."""
    check_text_fits_in_memory(path)
    raw, text = read_text(path)
    kind = json_records_type(text)
    if kind:
        raise DataError(f"{path} holds {kind} records (JSON), not plain text: use --dataset_type {kind}")
    digest = hashlib.sha256(raw).hexdigest()
    cache_path = path + ".tokens.npz"
    try:
        with np.load(cache_path) as cache:
            if str(cache["sha256"]) == digest:
                return cache["tokens"]
    except Exception:  # no cache yet, or an unreadable one (cut short, not a zip, fields missing): tokenize anew
        pass
    tokens = np.array(get_tokenizer().encode_ordinary(text), dtype=np.uint16)
    try:  # (several ranks may write it at once: each to a temporary of its own)
        write_atomically(cache_path, lambda f: np.savez(f, tokens=tokens, sha256=np.array(digest)))
    except WriteError:
        pass  # a read-only or full data folder only costs the caching
    return tokens


def batch_rows(micro_step, rank, batch_size, world_size):
    """The one rule that splits a step's global batch of rows: micro-step m of rank r takes the batch_size rows
    starting at (m * world_size + r) * batch_size. Every loader indexes its global batch through this, so the
    global batch is the same whatever the split into processes and micro-steps."""
    start = (micro_step * world_size + rank) * batch_size
    return slice(start, start + batch_size)


def accumulation_steps(total_batch_size, batch_size, seq_len, world_size):
    """Micro-steps per optimizer step: a global batch of total_batch_size tokens made of micro-batches of
    batch_size sequences of seq_len tokens on each of world_size processes."""
    tokens_per_micro_step = batch_size * seq_len * world_size
    if total_batch_size % tokens_per_micro_step != 0:
        raise DataError(f"--total_batch_size {total_batch_size} is not a multiple of batch_size * seq_len * "
                        f"processes = {batch_size} * {seq_len} * {world_size} = {tokens_per_micro_step}")
    return total_batch_size // tokens_per_micro_step


class Loader:
    """What every loader shares. A step's global batch holds global_rows = batch_size * world_size * accum_steps
    rows; get_batch(split, step, micro_step) returns this rank's (x, y, positions) of one micro-step: int64 tensors
    (rows, length), y IGNORE_INDEX where there is nothing to learn, positions None, or for packed rows (packing:
    ExampleLoader.pack) each token's position in its example. A loader says what the rows of a global batch are
    (global_batch) and how rows become tensors (make_batch); the split into micro-steps and ranks is batch_rows'."""

    def __init__(self, seq_len, batch_size, accum_steps, rank, world_size, seed, packing):
        self.seq_len, self.batch_size, self.seed, self.packing = seq_len, batch_size, seed, packing
        self.rank, self.world_size = rank, world_size
        self.global_rows = batch_size * world_size * accum_steps

    def get_batch(self, split, step, micro_step):
        rows = self.global_batch(split, step)[batch_rows(micro_step, self.rank, self.batch_size, self.world_size)]
        return self.make_batch(split, rows)

    def eval_batches(self, split, batch_size, max_tokens=None):
        """The split as (x, y, positions) batches, each target once (eval.py): consecutive windows of seq_len here."""
        return windows(self.splits[split], self.seq_len, batch_size, max_tokens)

    def summary(self):  # the line train.py prints about the data read: none for text, the examples kept for examples
        return None

    def sample_prompt(self):  # what train.py's end-of-run sample continues, and whether greedily
        return get_tokenizer().encode_ordinary("\n"), False

    def tokens_in_step(self, split, step):
        """Tokens of data, not padding, in step's whole global batch (as targets_in_step): all for windows of text."""
        return self.global_rows * self.seq_len

    def targets_in_step(self, split, step):
        """Labels (y != IGNORE_INDEX) in step's whole global batch, all micro-steps and ranks: a function of the
        step, so each rank knows it without communicating (train_step divides the summed loss by it)."""
        return self.global_rows * self.seq_len

    def epoch_order(self, split, step, n):
        """Item numbers (of n items) of step's global batch, row by row, for the loaders that visit items (examples,
        windows) epoch by epoch. Validation row g is item g % n: from the start, in order, wrapping. Training row g
        is item self.shuffle(g % n, n, epoch g // n), shuffle being the loader's permutation of range(n) for that
        epoch, drawn from (seed, epoch): each epoch visits every item once, in an order of its own."""
        g = step * self.global_rows + np.arange(self.global_rows)
        if split == "val":
            return g % n
        items = np.empty_like(g)
        for epoch in np.unique(g // n):  # a step may straddle two epochs (or more, with a tiny split)
            in_epoch = g // n == epoch
            items[in_epoch] = self.shuffle(g[in_epoch] % n, n, int(epoch))
        return items


class TextLoader(Loader):
    """Random windows of a tokenized text file: the first 90% of the tokens for training, the last 10% for
    validation. Row i of step s's global batch is the window at a random offset drawn from (seed, split, s)."""

    def __init__(self, path, seq_len, batch_size, accum_steps, rank=0, world_size=1, seed=1337, packing=False):
        super().__init__(seq_len, batch_size, accum_steps, rank, world_size, seed, packing)
        tokens = load_text_tokens(path)
        n_val = int(len(tokens) * VAL_FRACTION)
        self.splits = {"train": tokens[: len(tokens) - n_val], "val": tokens[len(tokens) - n_val :]}
        for split, split_tokens in self.splits.items():
            if len(split_tokens) < seq_len + 1:
                raise DataError(f"{path} has {len(tokens)} tokens, so its {split} split ({len(split_tokens)} tokens) "
                                f"is shorter than one sequence of --seq_len + 1 = {seq_len + 1} tokens: use a longer "
                                f"text or a smaller --seq_len")

    def global_batch(self, split, step):
        """The offsets of step's global batch's windows in the split."""
        rng = np.random.default_rng([self.seed, 0 if split == "train" else 1, step])
        return rng.integers(0, len(self.splits[split]) - self.seq_len, size=self.global_rows)

    def make_batch(self, split, offsets):
        return shifted(self.splits[split][offsets[:, None] + np.arange(self.seq_len + 1)])


def shifted(rows):
    """(x, y, None) of rows of seq_len + 1 tokens: x their first seq_len, y the seq_len after (x shifted left)."""
    window = torch.from_numpy(rows.astype(np.int64))
    return window[:, :-1].contiguous(), window[:, 1:].contiguous(), None


def windows(tokens, seq_len, batch_size, max_tokens):
    """(x, y, None) batches of consecutive windows over a token array (or TokenStream), every token but the first
    predicted once (eval.py's split, the harness's rolling loglikelihood), until about max_tokens are."""
    n_windows = -(-(len(tokens) - 1) // seq_len)  # the last window may be shorter
    if max_tokens:
        n_windows = min(n_windows, -(-max_tokens // seq_len))
    for first in range(0, n_windows, batch_size):
        rows = [np.asarray(tokens[w * seq_len : (w + 1) * seq_len + 1], dtype=np.int64)
                for w in range(first, min(first + batch_size, n_windows))]
        x = np.zeros((len(rows), max(map(len, rows)) - 1), dtype=np.int64)
        y = np.full_like(x, IGNORE_INDEX)
        for i, row in enumerate(rows):
            x[i, : len(row) - 1], y[i, : len(row) - 1] = row[:-1], row[1:]
        yield torch.from_numpy(x), torch.from_numpy(y), None


# ----------------------------------------------------------------------------------------------------------------
# Fine-tuning examples: Alpaca records and chat conversations, trained on their responses only.

ALPACA_VAL_FRACTION = 0.05
# The train/val split is drawn from this, not from --seed: trying another seed must not move examples between them.
ALPACA_SPLIT_SEED = 0


class ExampleLoader(Loader):
    """Fine-tuning on examples (Alpaca records, chat conversations): token sequences of which only some tokens are
    learned, the others (prompts, the template's own text) being context. A subclass's read_examples(path) yields
    each record's (tokens, labelled: whether token j is a target, turn_ends: where it may be cut, see
    fitting_length); the examples kept are self.examples (uint16) and self.labelled (bool). The training order is
    Loader.epoch_order's, each epoch a permutation drawn from (seed, epoch). Validation is 5% of the usable
    examples (drawn with ALPACA_SPLIT_SEED: a --seq_len that drops examples changes it), in file order, wrapping.
    A micro-batch is packed (see pack), or one row per example padded to the longest (collate)."""

    def __init__(self, path, seq_len, batch_size, accum_steps, rank=0, world_size=1, seed=1337, packing=False):
        super().__init__(seq_len, batch_size, accum_steps, rank, world_size, seed, packing)
        self.path, self.examples, self.labelled = path, [], []
        self.n_truncated = self.n_dropped = 0
        for tokens, labelled, turn_ends in self.read_examples(path):
            end = fitting_length(labelled, turn_ends, seq_len)
            if end is None:
                self.n_dropped += 1
                continue
            self.n_truncated += end < len(tokens)
            self.examples.append(np.array(tokens[:end], dtype=np.uint16))  # GPT-2's ids fit, as in TextLoader
            self.labelled.append(np.array(labelled[:end], dtype=bool))
        n = len(self.examples)
        if n == 0:
            raise DataError(f"all {self.n_dropped} records of {path} have prompts longer than --seq_len {seq_len} "
                            f"tokens, leaving no room for a response: use a larger --seq_len")
        if n == 1:
            raise DataError(f"{path} has 1 usable example ({self.n_dropped} dropped as longer than --seq_len): "
                            f"at least 2 are needed, one to train on and one to validate on")
        # tokens fed (x: all but the last) and supervised tokens (y covers tokens 1..; token 0 is never a target)
        self.n_tokens = np.array([len(example) - 1 for example in self.examples])
        self.n_targets = np.array([labelled[1:].sum() for labelled in self.labelled])
        order = np.random.default_rng(ALPACA_SPLIT_SEED).permutation(n)
        n_val = max(1, int(n * ALPACA_VAL_FRACTION))
        self.splits = {"train": np.sort(order[n_val:]), "val": np.sort(order[:n_val])}  # example indices

    def global_batch(self, split, step):
        """The example indices of step's whole global batch, row by row."""
        return self.splits[split][self.epoch_order(split, step, len(self.splits[split]))]

    def shuffle(self, positions, n, epoch):
        return np.random.default_rng([self.seed, epoch]).permutation(n)[positions]

    def make_batch(self, split, ids):
        return self.pack(ids) if self.packing else self.collate(ids)

    def example_xy(self, i):
        """Example i as (x, y): its tokens but the last, and the next token wherever that is a target, IGNORE_INDEX
        elsewhere."""
        tokens = self.examples[i].astype(np.int64)
        return tokens[:-1], np.where(self.labelled[i][1:], tokens[1:], IGNORE_INDEX)

    def collate(self, ids):
        """(x, y, None): int64 (len(ids), longest example - 1), one example a row, padded at the end (where causal
        attention keeps it from the real tokens) with <|endoftext|>, whose labels are IGNORE_INDEX."""
        width = max(len(self.examples[i]) for i in ids) - 1
        x = np.full((len(ids), width), EOT_TOKEN, dtype=np.int64)
        y = np.full((len(ids), width), IGNORE_INDEX, dtype=np.int64)
        for row, i in enumerate(ids):
            xi, yi = self.example_xy(i)
            x[row, : len(xi)], y[row, : len(yi)] = xi, yi
        return torch.from_numpy(x), torch.from_numpy(y), None

    def pack(self, ids):
        """(x, y, positions): collate(ids)'s examples back to back in rows of at most seq_len tokens, positions
        restarting at 0 where each starts: the model confines attention to each example and gives its tokens the
        positions they would have alone (GPT.forward). A row's unused end is padding, with positions of its own.
        The rows are first-fit-decreasing's at the width (seq_len, or a multiple of 16 below) that leaves the least
        padding: on GSM8K at 16 a micro-batch, 5% of the tokens instead of collate's 38%, in about a millisecond."""
        lengths = {i: len(self.examples[i]) - 1 for i in ids}
        longest_first = sorted(ids, key=lambda i: -lengths[i])  # (stable: ties keep the batch's order)
        shortest = -(-lengths[longest_first[0]] // 16) * 16
        widths = [*range(shortest, self.seq_len, 16), self.seq_len]
        rows, width = min((first_fit_decreasing(longest_first, lengths, w) for w in widths),
                          key=lambda rows_fill: len(rows_fill[0]) * rows_fill[1])
        x = np.full((len(rows), width), EOT_TOKEN, dtype=np.int64)
        y = np.full((len(rows), width), IGNORE_INDEX, dtype=np.int64)
        positions = np.zeros((len(rows), width), dtype=np.int64)
        for r, row in enumerate(rows):
            start = 0
            for i in row:
                xi, yi = self.example_xy(i)
                end = start + len(xi)
                x[r, start:end], y[r, start:end], positions[r, start:end] = xi, yi, np.arange(len(xi))
                start = end
            positions[r, start:] = np.arange(width - start)
        return torch.from_numpy(x), torch.from_numpy(y), torch.from_numpy(positions)

    def tokens_in_step(self, split, step):
        return int(self.n_tokens[self.global_batch(split, step)].sum())

    def targets_in_step(self, split, step):
        """Supervised tokens in step's whole global batch (see Loader.targets_in_step): dividing the summed loss by
        it weights every target token alike, however the tokens fall into micro-batches."""
        return int(self.n_targets[self.global_batch(split, step)].sum())

    def prompt(self, i):
        """Example i's tokens before its first target: what a model is given to produce the first reply."""
        return self.examples[i][: int(np.argmax(self.labelled[i]))].tolist()

    def sample_prompt(self):
        """The first validation example's prompt, answered greedily (as an answer is judged)."""
        return self.prompt(self.splits["val"][0]), True

    def eval_batches(self, split, batch_size, max_tokens=None):
        """The split's examples in order, batch_size at a time (packed with packing)."""
        ids, predicted = self.splits[split], 0
        for first in range(0, len(ids), batch_size):
            x, y, positions = self.make_batch(split, ids[first : first + batch_size])
            yield x, y, positions
            predicted += int((y != IGNORE_INDEX).sum())
            if max_tokens and predicted >= max_tokens:
                return


def first_fit_decreasing(longest_first, lengths, width):
    """Ids (longest first) put into rows of `width` tokens, each into the first row with room for it: (the rows, as
    lists of ids; the tokens in the fullest row)."""
    rows, room = [], []
    for i in longest_first:
        row = next((r for r, free in enumerate(room) if free >= lengths[i]), None)
        if row is None:
            rows.append([]), room.append(width)
            row = len(rows) - 1
        rows[row].append(i)
        room[row] -= lengths[i]
    return rows, width - min(room)


def fitting_length(labelled, turn_ends, seq_len):
    """The length an example of len(labelled) tokens is cut to so that it fits in a row (x holds seq_len tokens, y
    the seq_len after them: seq_len + 1 in all): whole, else at the last turn end that fits, else within the first
    reply, if that starts in time for a target; None (dropped) if no target fits."""
    if len(labelled) <= seq_len + 1:
        return len(labelled)
    ends = [end for end in turn_ends if end <= seq_len + 1]
    if ends:
        return max(ends)
    return seq_len + 1 if any(labelled[1 : seq_len + 1]) else None  # (token 0 is never a target)


class AlpacaLoader(ExampleLoader):
    """Instruction fine-tuning on Alpaca records. Each example is the tokens of alpaca_prompt(...) then the output's
    then <|endoftext|>; only the output and its <|endoftext|> are targets, so only the response (and where it ends)
    is learned. Prompt and output are tokenized apart, so the boundary between them is exact. A prompt longer than
    --seq_len drops the example; a response too long for it is cut."""

    def read_examples(self, path):
        records = read_alpaca_records(path)
        self.n_records = len(records)
        tokenizer = get_tokenizer()
        for record in records:
            prompt = tokenizer.encode_ordinary(alpaca_prompt(record["instruction"], record.get("input", "")))
            response = tokenizer.encode_ordinary(record["output"]) + [EOT_TOKEN]
            yield prompt + response, [False] * len(prompt) + [True] * len(response), [len(prompt) + len(response)]

    def summary(self):
        return (f"{self.path}: {self.n_records} records -> {len(self.splits['train'])} train, "
                f"{len(self.splits['val'])} val examples; {self.n_truncated} responses cut to --seq_len "
                f"{self.seq_len}, {self.n_dropped} dropped (prompt longer than --seq_len)")


class ChatLoader(ExampleLoader):
    """Chat fine-tuning on conversations (records.conversation's formats): chat_tokens' tokens, every assistant
    reply (and the <|endoftext|> ending it) a target, the rest context. One too long for --seq_len is cut after the
    last reply that fits, else within its first reply; one whose first reply starts beyond --seq_len is dropped."""

    def read_examples(self, path):
        records, places = read_json_records(path, "chat")
        self.n_records = len(records)
        for record, place in zip(records, places):
            yield chat_tokens(conversation(record, place))

    def summary(self):
        return (f"{self.path}: {self.n_records} conversations -> {len(self.splits['train'])} train, "
                f"{len(self.splits['val'])} val; {self.n_truncated} cut to --seq_len {self.seq_len} (after the last "
                f"reply that fits, where one does), {self.n_dropped} dropped (first reply beyond --seq_len)")


# ----------------------------------------------------------------------------------------------------------------
# Token shards: a corpus too big for memory, tokenized ahead by prepare.py and read through memory maps.

SHARD_MAGIC, SHARD_VERSION = 20240520, 1  # llm.c's header for GPT-2 tokens stored as uint16: its shards read here
SHARD_HEADER_BYTES = 256 * 4  # 256 int32: magic, version, token count, then zeros; the uint16 tokens follow
SHARD_NAME = re.compile(r"(?:^|_)(train|val)_(\d+)\.bin$")  # train_000000.bin, and llm.c's fineweb_val_000000.bin


def shard_tokens(path):
    """A shard's tokens as a read-only np.memmap of uint16, after checking its header and its size."""
    with open(path, "rb") as f:
        header = np.frombuffer(f.read(SHARD_HEADER_BYTES).ljust(SHARD_HEADER_BYTES, b"\0"), dtype="<i4")
    if header[0] != SHARD_MAGIC or header[1] != SHARD_VERSION:
        raise DataError(f"{path} is not a shard of GPT-2 tokens as uint16 (header magic {header[0]}, version "
                        f"{header[1]}, not {SHARD_MAGIC}, {SHARD_VERSION}): it holds another tokenizer's or dtype's "
                        f"tokens, or none; make shards with prepare.py")
    count, size = int(header[2]), os.path.getsize(path)
    if size != SHARD_HEADER_BYTES + 2 * count:
        raise DataError(f"{path} is truncated or damaged ({size} bytes, but its header says {count} tokens, so "
                        f"{SHARD_HEADER_BYTES + 2 * count}): rerun the prepare.py command that made it")
    if count == 0:  # np.memmap cannot map zero bytes
        return np.zeros(0, dtype=np.uint16)
    return np.memmap(path, dtype="<u2", mode="r", offset=SHARD_HEADER_BYTES, shape=(count,))


class TokenStream:
    """One split's shards as one 1-D sequence of tokens, read lazily: len(stream), stream[i], and stream[a:b] (step
    1), which copies those tokens, across shard boundaries, into a np.uint16 array. ShardLoader.splits holds these,
    where TextLoader's holds arrays: code that takes len() and slices reads either."""

    def __init__(self, shards, names=None):
        kept = [(s, name) for s, name in zip(shards, names or [None] * len(shards)) if len(s)]
        self.shards, self.names = [s for s, _ in kept], [name for _, name in kept]
        self.starts = np.cumsum([0] + [len(s) for s in self.shards])  # starts[k]: position of shards[k]'s first token

    def locate(self, i):
        """(the shard's name, the token's offset in it) of token i of the stream."""
        k = int(np.searchsorted(self.starts, i, side="right")) - 1
        return self.names[k], int(i - self.starts[k])

    def __len__(self):
        return int(self.starts[-1])

    def __getitem__(self, index):
        if not isinstance(index, slice):
            i = int(index) + (len(self) if int(index) < 0 else 0)
            if not 0 <= i < len(self):
                raise IndexError(f"token {index} of a stream of {len(self)}")
            return self[i : i + 1][0]
        start, stop, step = index.indices(len(self))
        if step != 1:
            raise ValueError("a TokenStream is sliced into consecutive tokens only (step 1)")
        parts, k = [], int(np.searchsorted(self.starts, start, side="right")) - 1
        while start < stop:  # one part per shard the slice touches
            end = min(stop, int(self.starts[k + 1]))
            parts.append(np.array(self.shards[k][start - self.starts[k] : end - self.starts[k]]))
            start, k = end, k + 1
        return np.concatenate(parts) if parts else np.zeros(0, dtype=np.uint16)


def _mix(x):
    """splitmix64's finaliser: a cheap hash of uint64s whose every output bit depends on every input bit."""
    x = (x ^ (x >> 30)) * np.uint64(0xBF58476D1CE4E5B9)
    x = (x ^ (x >> 27)) * np.uint64(0x94D049BB133111EB)
    return x ^ (x >> 31)


def shuffled_index(i, n, seed, epoch):
    """perm[i] for positions i (an array) of perm, a pseudo-random permutation of range(n) drawn from (seed, epoch),
    in memory and time proportional to len(i), however large n is (10B tokens are 10M windows, too many to
    shuffle as an array every epoch). A 4-round Feistel network is a bijection of the numbers of 2k bits (4^k >= n);
    values it sends to n or beyond are sent through it again until they land below n ("cycle walking": the walk
    follows i's cycle of the bijection, which comes back into range(n), so the result is a bijection of range(n))."""
    half = max(1, ((n - 1).bit_length() + 1) // 2)
    mask = np.uint64((1 << half) - 1)
    keys = np.random.default_rng([seed, epoch]).integers(0, 2**63, size=4, dtype=np.uint64)
    x = np.array(i, dtype=np.uint64).reshape(-1)
    todo = np.ones(len(x), dtype=bool)
    while todo.any():
        y = x[todo]
        for key in keys:  # (left, right) -> (right, left ^ hash(right, key)): invertible whatever the hash
            y = ((y & mask) << half) | ((y >> half) ^ (_mix((y & mask) ^ key) & mask))
        x[todo] = y
        todo = x >= n
    return x.astype(np.int64)


class ShardLoader(Loader):
    """Windows of a folder of token shards made by prepare.py (or llm.c): val_*.bin and train_*.bin, each split's
    shards in the order of their numbers, memory-mapped, so the corpus may be far bigger than memory. A split of
    N tokens has n = (N - 1) // seq_len windows: window w is tokens [w * seq_len, (w + 1) * seq_len + 1), x and its
    targets y, and may run from one shard into the next.

    The training order is Loader.epoch_order's with shuffled_index as each epoch's permutation (no table, however
    many windows), so the corpus's order (one source after another) never shows as a period in the loss;
    validation reads the windows in order from the start of the split."""

    def __init__(self, path, seq_len, batch_size, accum_steps, rank=0, world_size=1, seed=1337, packing=False):
        super().__init__(seq_len, batch_size, accum_steps, rank, world_size, seed, packing)
        if not os.path.isdir(path):
            raise DataError(f"{path} is not a folder of token shards: pass the --out_dir of prepare.py")
        try:
            with open(os.path.join(path, "manifest.json"), encoding="utf-8") as f:
                finished = json.load(f).get("done")
        except FileNotFoundError:  # llm.c's folders have none
            finished = True
        except (OSError, ValueError, AttributeError, RecursionError):  # (a manifest damaged)
            finished = False
        if not finished:
            raise DataError(f"prepare.py has not finished writing {path}: rerun the prepare.py command that made it")
        found = {"train": [], "val": []}
        for name in os.listdir(path):
            if match := SHARD_NAME.search(name):
                found[match[1]].append((int(match[2]), name))
        if not found["train"] and not found["val"]:
            raise DataError(f"{path} holds no token shards (train_*.bin, val_*.bin): make them with "
                            f"python prepare.py INPUT... --out_dir {path}")
        self.splits = {split: TokenStream([shard_tokens(os.path.join(path, name)) for _, name in sorted(shards)],
                                          [os.path.join(path, name) for _, name in sorted(shards)])
                       for split, shards in found.items()}
        for split, tokens in self.splits.items():
            if len(tokens) < seq_len + 1:
                fix = "a larger --val_tokens" if split == "val" else "more text, or a smaller --val_tokens,"
                raise DataError(f"the {split} split of {path} has {len(tokens)} tokens, fewer than one sequence of "
                                f"--seq_len + 1 = {seq_len + 1}: rerun prepare.py with {fix} or use a smaller "
                                f"--seq_len")
        self.n_windows = {split: (len(tokens) - 1) // seq_len for split, tokens in self.splits.items()}

    def global_batch(self, split, step):
        """The window numbers of step's whole global batch, row by row."""
        return self.epoch_order(split, step, self.n_windows[split])

    def shuffle(self, positions, n, epoch):
        return shuffled_index(positions, n, self.seed, epoch)

    def make_batch(self, split, windows):
        tokens, L = self.splits[split], self.seq_len
        rows = np.stack([tokens[w * L : (w + 1) * L + 1] for w in windows])
        if rows.max() > EOT_TOKEN:
            # a damaged shard (or one of another tokenizer) would crash the step far from the cause (on a GPU, as a
            # device-side assert): checked here, cheaply next to the step, and named
            row, column = np.argwhere(rows > EOT_TOKEN)[0]
            name, offset = tokens.locate(int(windows[row]) * L + int(column))
            raise DataError(f"{name} holds token id {rows[row, column]} at token {offset}, beyond GPT-2's vocabulary "
                            f"(0 to {EOT_TOKEN}): the shard is damaged or of another tokenizer; rerun prepare.py")
        return shifted(rows)


# --dataset_type: its loader
LOADERS = {"text": TextLoader, "alpaca": AlpacaLoader, "chat": ChatLoader, "shards": ShardLoader}

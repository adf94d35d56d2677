"""
Tokenize a corpus too big for memory into shards of GPT-2 tokens, for train.py --dataset_type shards.

    python prepare.py corpus/ --out_dir shards                  # a folder of .txt, .md, .jsonl and .parquet files
    python prepare.py a.jsonl b.jsonl --out_dir shards --text_field content --val_tokens 1_000_000
    python prepare.py --hf_dataset HuggingFaceFW/fineweb-edu --hf_config sample-10BT --out_dir fineweb10B  # online

Each document becomes <|endoftext|> then its tokens (GPT-2's and llm.c's convention), so that token separates
documents. The stream of tokens is cut into shards of exactly --shard_tokens tokens (a document may straddle two; a
split's last shard may be shorter): the first --val_tokens tokens are the validation split (val_000000.bin, ...), the
rest the training split (train_000000.bin, ...). A shard is in llm.c's format, 256 int32 (magic 20240520, version 1,
token count, zeros) then the tokens as uint16: llm.c reads these shards, and data.ShardLoader reads llm.c's.

Memory stays flat: documents are streamed, tokenized by --workers processes, written in order (the same shards
whatever the number of workers), each shard to a temporary file synced to the disk and renamed into place when full.
OUT_DIR/manifest.json records what each complete shard took from the input stream. It is written as a run's first
new shard starts and at the run's end; in between, each complete shard is a line appended to OUT_DIR/journal.jsonl,
so that a shard costs the same however many came before (rewriting the manifest after each would cost them all).
Rerunning the command (after a crash, Ctrl-C or a damaged shard) removes the temporaries a killed run left, checks
the complete shards, skips their documents untokenized and carries on from the first missing or damaged one.
"""

import argparse
import contextlib
import hashlib
import importlib
import itertools
import json
import logging
import os
import re
import signal
import socket
import sys
import time
import urllib.parse
from collections import deque
from concurrent.futures import ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool

import numpy as np

from cli import HelpFormatter, OneLineParser
from data import SHARD_HEADER_BYTES, SHARD_MAGIC, SHARD_NAME, SHARD_VERSION, shard_tokens
from files import DataError, parse_json
from tokenizer import EOT_TOKEN, get_tokenizer

TEXT_SUFFIXES = (".txt", ".md")  # a document per file; in a folder, other files (README, images, .json) are skipped
SUFFIXES = TEXT_SUFFIXES + (".jsonl", ".parquet")
TEXT_PIECE = 1 << 20  # characters: a longer text file is read, and tokenized, in pieces of about this many
# A piece ends just before a "\n" followed by a non-space. GPT-2's pre-tokenizer makes such a "\n" a token of its
# own and ends the previous token before it, so the pieces' tokens are exactly those of the whole text.
PIECE_END = re.compile(r"\n(?=\S)")
TASK_CHARS = 1 << 20  # characters of text sent to a worker at a time
MANIFEST = "manifest.json"
JOURNAL = "journal.jsonl"  # a line per shard completed since manifest.json was last written
MIN_SHARD_TOKENS = 1000  # smaller shards would split a corpus into absurdly many files
MAX_SHARD_TOKENS = 2**31 - 1  # a shard's header counts its tokens in an int32
BYTES_PER_TOKEN = 4  # about what a GPT-2 token takes of English text: the default --val_tokens estimates with it
MAX_VAL_TOKENS = 10_000_000  # the default --val_tokens at most, and for a Hugging Face dataset (its size unknown)
NOT_UTF8_NUL = ("is not UTF-8 text (UTF-16, or binary: it has NUL bytes): convert it to UTF-8, e.g. iconv -f UTF-16 "
                "-t UTF-8")  # as files.read_text says it of train.py's text files


def bounded_int(low, high=None, why=""):
    """An argparse type: an integer from low to high, so that a senseless value is refused before any work."""
    def parse(text):
        value = int(text)  # not an integer: argparse says "invalid int value"
        if value < low or (high is not None and value > high):
            bounds = f"from {low:,} to {high:,}" if high is not None else f"at least {low:,}"
            raise argparse.ArgumentTypeError(f"{value:,} is not {bounds}{why}")
        return value

    parse.__name__ = "int"
    return parse


def build_parser():
    p = OneLineParser(description="Tokenize a corpus into shards of GPT-2 tokens.",
                      formatter_class=HelpFormatter)
    a = p.add_argument
    a("inputs", nargs="*", metavar="INPUT", help="text files (.txt, .md: one document each), JSONL files (.jsonl: "
      "a document a line, in --text_field), Parquet files (.parquet: a document a row, column --text_field; needs "
      "pyarrow), or folders of these (searched recursively, in path order; hidden and other files skipped)")
    a("--out_dir", required=True, help="where the shards and manifest.json go")
    a("--text_field", default="text", help="the JSONL field or Parquet column (or Hugging Face column) of the text")
    a("--shard_tokens", type=bounded_int(MIN_SHARD_TOKENS, MAX_SHARD_TOKENS, ": smaller shards would split a corpus "
      "into absurdly many files, and a shard's header counts its tokens in an int32"), default=100_000_000,
      help="tokens per shard, 2 bytes each")
    a("--val_tokens", type=bounded_int(0, why=" (0: no validation split)"),
      help=f"the first this many tokens are the validation split; if not given, a tenth of the corpus, estimated at "
      f"{BYTES_PER_TOKEN} bytes a token from the input files' sizes (Parquet's are compressed: a smaller split), at "
      f"most {MAX_VAL_TOKENS:,} ({MAX_VAL_TOKENS:,} for --hf_dataset)")
    a("--workers", type=bounded_int(1), default=os.cpu_count() or 1, help="tokenizing processes")
    a("--overwrite", action="store_true", help="delete the shards and manifest in --out_dir and start afresh")
    a("--hf_dataset", help="instead of INPUTs, stream this Hugging Face dataset (needs `pip install datasets`)")
    a("--hf_config", help="the dataset's configuration, e.g. sample-10BT")
    a("--hf_split", default="train", help="the dataset's split")
    return p


def input_files(paths):
    """The files to read, in order: each path given, or a folder's files with a known suffix, sorted by path."""
    files = []
    for path in paths:
        if os.path.isdir(path):
            found = []
            for root, dirs, names in os.walk(path):
                dirs[:] = [d for d in dirs if not d.startswith(".")]  # .git and the like
                found += [os.path.join(root, n) for n in names if n.endswith(SUFFIXES) and not n.startswith(".")]
            files += sorted(found)
            if not found:
                raise DataError(f"folder {path} holds no {', '.join(SUFFIXES)} files")
        elif not os.path.exists(path):
            raise DataError(f"input {path} does not exist")
        elif not path.endswith(SUFFIXES):
            raise DataError(f"input {path} is not {', '.join(SUFFIXES)}: prepare.py reads text files, JSONL and "
                            f"Parquet by their suffix (rename a plain text file to .txt)")
        else:
            files.append(path)
    if any(f.endswith(".parquet") for f in files):
        require("pyarrow", "reading .parquet files")
    return files


def require(module, what):
    try:
        return importlib.import_module(module)
    except ImportError:
        raise DataError(f"{what} needs {module}: pip install {module}")


def pieces(files, field):
    """The input stream: (text, starts_a_document) for each document, or piece of a long text file, in order."""
    for path in files:
        try:
            if path.endswith(".jsonl"):
                with open(path, "rb") as f:  # binary: only b"\n" ends a line (text mode also splits at "\r")
                    for lineno, line in enumerate(f, 1):
                        if lineno == 1:  # a UTF-8 byte-order mark (Notepad, PowerShell) is not text: dropped
                            line = line.removeprefix(b"\xef\xbb\xbf")
                        if line.strip():
                            yield jsonl_text(line, field, f"{path} line {lineno}"), True
            elif path.endswith(".parquet"):
                import pyarrow.parquet as pq

                table, row = pq.ParquetFile(path), 0
                if field not in table.schema_arrow.names:
                    raise DataError(f"{path} has no column {field!r} (it has {', '.join(table.schema_arrow.names)}): "
                                    f"pass the text's column as --text_field")
                for batch in table.iter_batches(batch_size=1024, columns=[field]):  # a batch at a time: flat memory
                    for text in batch.column(0).to_pylist():
                        row += 1
                        if not isinstance(text, str):
                            raise DataError(f"{path} row {row}: column {field!r} is {text!r:.40}, not text")
                        yield text, True
            else:
                # utf-8-sig: a byte-order mark (Notepad, PowerShell) is not text, and train.py drops it too;
                # newline="": the text as it is, \r\n and all
                with open(path, encoding="utf-8-sig", newline="") as f:
                    text, first = "", True  # (a file without line breaks is read whole)
                    while chunk := f.read(TEXT_PIECE):
                        # UTF-16 (Windows' "Unicode") without a byte-order mark decodes as UTF-8 when it is ASCII
                        # text, with a NUL after each character: it would train, on noise. Text has no NULs; a few
                        # percent of them is another encoding. Checked as each piece is read: a UTF-16 file is
                        # refused before any of it is tokenized.
                        if chunk.count("\0") > len(chunk) // 100:
                            raise DataError(f"{path} {NOT_UTF8_NUL}")
                        start = max(TEXT_PIECE, len(text) - 1)  # where an end may be: not in what was searched
                        text += chunk
                        while (end := PIECE_END.search(text, start)) is not None:
                            yield text[: end.start()], first
                            text, first, start = text[end.start() :], False, TEXT_PIECE
                    yield text, first
        except UnicodeDecodeError:
            raise DataError(f"{path} is not UTF-8 text: convert it to UTF-8")
        except (OSError, ValueError) as e:  # pyarrow's errors are among these (ArrowInvalid is a ValueError)
            raise DataError(f"cannot read {path}: {e}")


def jsonl_text(line, field, where):
    if b"\0" in line:  # no JSON has a NUL byte: UTF-16 (NUL after each ASCII character), or not text at all
        raise DataError(f"{where} {NOT_UTF8_NUL}")
    try:
        record = parse_json(line.decode("utf-8"))  # nested too deeply ([[[[...]]]]) is a JSONDecodeError too
    except ValueError as e:  # a JSONDecodeError, or a UnicodeDecodeError
        raise DataError(f"{where} is not valid JSON ({getattr(e, 'msg', 'not UTF-8')}): fix or remove that line")
    if not isinstance(record, dict) or not isinstance(record.get(field), str):
        raise DataError(f"{where} has no text in field {field!r}: every line needs one (or pass --text_field)")
    return record[field]


def check_hub_reachable(name):
    """Offline, huggingface_hub retries each request for half a minute before datasets fails: resolving the hub's host
    name first says so at once. Skipped when HF_HUB_OFFLINE or HF_DATASETS_OFFLINE is set: a cached dataset is read
    then, without the network."""
    offline = [os.environ.get(v, "").upper() for v in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE")]
    if any(value in ("1", "ON", "YES", "TRUE") for value in offline):  # the libraries' own reading of them
        return
    host = urllib.parse.urlsplit(os.environ.get("HF_ENDPOINT") or "https://huggingface.co").hostname
    try:
        if host:  # (an HF_ENDPOINT without a scheme has none: the hub library says what is wrong with it)
            socket.getaddrinfo(host, None)
    except (OSError, UnicodeError) as e:  # socket.gaierror is an OSError; UnicodeError: a host name that is no name
        raise DataError(f"cannot stream {name} from the Hugging Face hub (is this machine online?): cannot resolve "
                        f"{host}: {getattr(e, 'strerror', None) or e}")


def quiet_hub():
    """The hub libraries log each retry of a failing request as a warning, ~10 lines before their error: only
    errors are logged, so that the one line of hf_pieces() is what shows. (After the import: it sets their level.)"""
    for library in ("huggingface_hub", "datasets"):
        logging.getLogger(library).setLevel(logging.ERROR)


def hf_pieces(args):
    """The documents of a Hugging Face dataset, streamed: nothing is downloaded ahead or held."""
    try:
        import datasets

        rows = datasets.load_dataset(args.hf_dataset, args.hf_config, split=args.hf_split, streaming=True)
        for i, row in enumerate(rows):
            if not isinstance(row.get(args.text_field), str):
                raise DataError(f"row {i} of {args.hf_dataset} has no text in column {args.text_field!r}")
            yield row[args.text_field], True
    except DataError:
        raise
    except Exception as e:  # no network, an unknown name or config: the hub's own words, on one line
        message = " ".join(str(e).split())[:300]
        raise DataError(f"cannot stream {args.hf_dataset} from the Hugging Face hub (is this machine online?): "
                        f"{message}")


def encode(task):
    """In a worker: a task's pieces -> (their tokens, concatenated, as uint16; each piece's token count)."""
    tokenizer = get_tokenizer()
    parts = [([EOT_TOKEN] if starts else []) + tokenizer.encode_ordinary(text) for text, starts in task]
    return np.array(list(itertools.chain.from_iterable(parts)), dtype=np.uint16), np.array([len(p) for p in parts])


def encoded(stream, workers):
    """encode() of the pieces, a task of about TASK_CHARS characters at a time, by `workers` processes, in order.
    Not Pool.imap: its feeder thread reads the input as fast as it can, so memory would grow with the corpus; here at
    most two tasks per worker are in flight. Not Pool either: a worker killed (by the OOM killer, say) leaves its
    result waited for forever, where ProcessPoolExecutor raises BrokenProcessPool; and its shutdown on an error is
    an orderly one (queued tasks dropped, running ones finished), not Pool.terminate's race with its own threads."""
    def tasks():
        task, chars = [], 0
        for piece in stream:
            task.append(piece)
            chars += len(piece[0])
            if chars >= TASK_CHARS:
                yield task
                task, chars = [], 0
        if task:
            yield task

    if workers == 1:
        yield from map(encode, tasks())
        return
    get_tokenizer()  # built once here: workers forked from this process (Linux) inherit it
    # Ctrl-C goes to the whole process group: the workers leave it to this process, which stops them
    pool = ProcessPoolExecutor(workers, initializer=signal.signal, initargs=(signal.SIGINT, signal.SIG_IGN))
    try:
        in_flight = deque()
        for task in tasks():
            in_flight.append(pool.submit(encode, task))
            if len(in_flight) >= 2 * workers:
                yield in_flight.popleft().result()
        while in_flight:
            yield in_flight.popleft().result()
    except BrokenProcessPool:
        raise DataError(f"a tokenizing worker died (out of memory?): rerun with fewer than --workers {workers}; the "
                        f"same command keeps the complete shards") from None
    finally:  # also when the caller stops early (an error writing a shard, Ctrl-C): it closes this generator
        pool.shutdown(cancel_futures=True)


def write_error(path, e):
    """An OSError while writing (a read-only folder, no permission, a full disk) as the one line the user sees."""
    return DataError(f"cannot write {path}: {e.strerror or e} (make room on the disk or pass an --out_dir you can "
                     f"write to, then rerun: the same command keeps the complete shards)")


def remove(path):
    try:
        os.remove(path)
    except FileNotFoundError:
        pass
    except OSError as e:
        raise write_error(path, e)


def remove_quietly(path):
    with contextlib.suppress(OSError):  # gone already, or a write failed first: that error is the one to report
        os.remove(path)


def synced(file):
    """Flush file's bytes to the disk: a file renamed into place, or a journal line, then survives a power cut."""
    file.flush()
    os.fsync(file.fileno())


class Shard:
    """A shard being written: a temporary file beside its final name, renamed into place once complete."""

    def __init__(self, out_dir, name, capacity):
        self.name, self.path, self.capacity, self.count = name, os.path.join(out_dir, name), capacity, 0
        self.file = None
        with self.failing_cleanly():
            self.file = open(self.path + ".tmp", "wb")
            self.file.write(bytes(SHARD_HEADER_BYTES))  # written properly by close(), once the count is known

    def write(self, tokens):
        with self.failing_cleanly():
            self.file.write(tokens.astype("<u2", copy=False).tobytes())
        self.count += len(tokens)

    def close(self):
        with self.failing_cleanly():
            self.file.seek(0)
            self.file.write(np.array([SHARD_MAGIC, SHARD_VERSION, self.count], dtype="<i4").tobytes())
            synced(self.file)
            self.file.close()
            os.replace(self.path + ".tmp", self.path)
        return {"file": self.name, "tokens": self.count, "bytes": SHARD_HEADER_BYTES + 2 * self.count}

    def abort(self):
        if self.file is not None:
            with contextlib.suppress(OSError):  # its buffer may not fit on a full disk: the file closes anyway
                self.file.close()
        remove_quietly(self.path + ".tmp")

    @contextlib.contextmanager
    def failing_cleanly(self):
        try:
            yield
        except OSError as e:
            self.abort()
            raise write_error(self.path, e)


def shard_name_and_size(k, args):
    """Shard k of the stream: the validation shards first, then the training ones."""
    n_val = -(-args.val_tokens // args.shard_tokens)
    if k < n_val:
        return f"val_{k:06d}.bin", min(args.shard_tokens, args.val_tokens - k * args.shard_tokens)
    return f"train_{k - n_val:06d}.bin", args.shard_tokens


def write_json(path, obj):
    try:
        with open(path + ".tmp", "w", encoding="utf-8") as f:
            json.dump(obj, f, indent=1)
            synced(f)
        os.replace(path + ".tmp", path)
    except OSError as e:
        remove_quietly(path + ".tmp")
        raise write_error(path, e)


class Journal:
    """What the complete shards took from the input stream, kept on the disk at a constant cost per shard: each is a
    line appended to journal.jsonl and synced, where rewriting manifest.json would cost all the shards before it.
    The manifest is written twice a run: as the first new shard starts, and whole at the end."""

    def __init__(self, out_dir, config, shards):
        self.path, self.manifest_path, self.file = os.path.join(out_dir, JOURNAL), os.path.join(out_dir, MANIFEST), None
        self.manifest = {"config": config, "shards": shards, "done": False}

    def open(self):
        """Before each new shard. The first time, manifest.json with the shards so far and "done": false, then an
        empty journal: no shard is renamed into place unless a manifest says what it was made from."""
        if self.file is None:
            write_json(self.manifest_path, self.manifest)
            try:
                self.file = open(self.path, "w", encoding="utf-8")
            except OSError as e:
                raise write_error(self.path, e)

    def append(self, shard):
        try:
            self.file.write(json.dumps(shard) + "\n")
            synced(self.file)
        except OSError as e:
            raise write_error(self.path, e)
        self.manifest["shards"].append(shard)

    def finish(self):
        self.manifest["done"] = True
        write_json(self.manifest_path, self.manifest)
        self.close()
        remove(self.path)  # all in the manifest now

    def close(self):
        if self.file is not None:
            with contextlib.suppress(OSError):  # each line was synced: nothing is lost
                self.file.close()


def journaled(manifest, path, args):
    """The manifest's shards, then those journal.jsonl adds. A journal line is taken only if it is the next shard
    in the stream: a line cut short by a crash ends the journal (that shard is redone), and a line for a shard the
    manifest already holds (a crash between writing the manifest and emptying the journal) is the same record."""
    shards = list(manifest["shards"])
    try:
        with open(path, "rb") as f:  # binary: only b"\n" ends a line
            for line in f:
                record = json.loads(line)
                if isinstance(record, dict) and record.get("file") == shard_name_and_size(len(shards), args)[0]:
                    shards.append(record)
    except (OSError, ValueError):  # no journal, or the rest of it cut short
        pass
    return shards


def is_ours(name):
    """A shard, the manifest, the journal, or the temporary of one of them."""
    name = name.removesuffix(".tmp")
    return bool(SHARD_NAME.search(name)) or name in (MANIFEST, JOURNAL)


def complete_shards(args, config):
    """The manifest's shards that are still whole (all of them, or up to the first missing or damaged one), and
    whether the manifest says the stream ended. Refuses a folder of other inputs or options."""
    try:
        names = os.listdir(args.out_dir) if os.path.isdir(args.out_dir) else []
    except OSError as e:
        raise DataError(f"cannot read {args.out_dir}: {e.strerror}: pass a folder you can read and write as --out_dir")
    if args.overwrite or not any(SHARD_NAME.search(name) for name in names):
        for name in filter(is_ours, names):  # all of them, or what a run that completed no shard left: none to keep
            remove(os.path.join(args.out_dir, name))
        return [], False
    path = os.path.join(args.out_dir, MANIFEST)
    try:
        with open(path, encoding="utf-8") as f:
            manifest = json.load(f)
    except (OSError, ValueError):
        manifest = {}
    if manifest.get("config") != config:
        changed = [k for k in config if manifest.get("config", {}).get(k) != config[k]]
        changed = sorted({"inputs (or inputs edited since)" if k.startswith("inputs") else f"--{k}" for k in changed})
        why = f"made with other {', '.join(changed)}" if manifest else f"but no readable {MANIFEST}"
        raise DataError(f"{args.out_dir} holds shards {why}: use a fresh --out_dir, or --overwrite to replace them")
    for name in names:  # temporaries a killed run left (this command, with these inputs and options)
        if name.endswith(".tmp") and is_ours(name):
            remove(os.path.join(args.out_dir, name))
    manifest["shards"] = journaled(manifest, os.path.join(args.out_dir, JOURNAL), args)
    done = []
    for shard in manifest["shards"]:
        try:
            whole = len(shard_tokens(os.path.join(args.out_dir, shard["file"]))) == shard["tokens"]
        except (DataError, OSError):
            whole = False
        if not whole:
            break
        done.append(shard)
    return done, manifest.get("done", False) and len(done) == len(manifest["shards"])


def estimated_val_tokens(n_bytes):
    """The default --val_tokens: a tenth of the corpus, estimated from its bytes, at most MAX_VAL_TOKENS. A function of
    the input files' sizes, which the manifest fingerprints: a rerun resolves it to the same number."""
    return min(MAX_VAL_TOKENS, n_bytes // (BYTES_PER_TOKEN * 10))


def resolve_val_tokens(args, files):
    """--val_tokens, or its default for these files. A value the inputs cannot fill is refused before any work: it
    would leave no training tokens, found only once the whole corpus was tokenized."""
    n_bytes = sum(os.path.getsize(f) for f in files)
    if args.val_tokens is None:
        return estimated_val_tokens(n_bytes)
    # Each token is at least a byte of text, and a text file's <|endoftext|> (its only token if it is empty) takes
    # none; a JSONL line's <|endoftext|> is paid for by its braces and quotes. Parquet's bytes are compressed: no bound.
    most = n_bytes + sum(f.endswith(TEXT_SUFFIXES) for f in files)
    if args.val_tokens and most <= args.val_tokens and not any(f.endswith(".parquet") for f in files):
        raise DataError(f"--val_tokens {args.val_tokens:,} leaves no training tokens: the inputs hold at most {most:,} "
                        f"({n_bytes:,} bytes, a token at least one of them): pass a smaller --val_tokens, or none "
                        f"for a tenth of the corpus")
    return args.val_tokens


def missing_folders(path):
    """The folders of path that do not exist yet, deepest first: those os.makedirs(path) creates."""
    missing, path = [], os.path.abspath(path)
    while not os.path.exists(path):
        missing.append(path)
        path = os.path.dirname(path)
    return missing


def prepare(args):
    if not args.inputs and not args.hf_dataset:
        raise DataError("no inputs: pass text, JSONL or Parquet files or folders of them, or --hf_dataset NAME")
    if args.inputs and args.hf_dataset:
        raise DataError("pass INPUT files or --hf_dataset, not both")
    if args.hf_dataset:
        require("datasets", "--hf_dataset")
        quiet_hub()
        check_hub_reachable(args.hf_dataset)
        args.val_tokens = MAX_VAL_TOKENS if args.val_tokens is None else args.val_tokens
        inputs, stream = [args.hf_dataset, args.hf_config, args.hf_split], hf_pieces(args)
    else:
        files = input_files(args.inputs)
        args.val_tokens = resolve_val_tokens(args, files)
        inputs, stream = [os.path.abspath(p) for p in args.inputs], pieces(files, args.text_field)
    config = {"tokenizer": "gpt2", "dtype": "uint16", "text_field": args.text_field, "shard_tokens": args.shard_tokens,
              "val_tokens": args.val_tokens, "text_piece": TEXT_PIECE, "inputs": inputs}
    if not args.hf_dataset:
        listing = [(os.path.abspath(f), os.stat(f).st_size, os.stat(f).st_mtime_ns) for f in files]
        # the files as they are now: an edited input no longer matches the shards made from it
        config["inputs_sha256"] = hashlib.sha256(json.dumps(listing).encode()).hexdigest()
    shards, finished = complete_shards(args, config)
    if finished:
        remove(os.path.join(args.out_dir, JOURNAL))  # all in the manifest: a kill at the very end left it
        print(f"{args.out_dir}: all {len(shards)} shards are already complete", file=sys.stderr)
        return
    created = missing_folders(args.out_dir)
    try:
        try:
            os.makedirs(args.out_dir, exist_ok=True)
        except OSError as e:
            raise write_error(args.out_dir, e)
        write_shards(args, config, shards, stream)
    except BaseException:  # a failure, or Ctrl-C: the folders this run made go too, if it left them empty
        for folder in created:
            try:
                os.rmdir(folder)  # only ever removes an empty folder
            except OSError:
                break
        raise


def write_shards(args, config, shards, stream):
    """Tokenize the stream into shards in args.out_dir, after the complete `shards` (those of an earlier run)."""
    started_empty = not shards
    # Extends shards as each completes. A shard's entry: file, tokens, bytes, and where the stream stands after it:
    # "pieces" it and the shards before hold whole, "skip_tokens" they hold of the next one (a straddling document).
    journal = Journal(args.out_dir, config, shards)
    # Resume: skip the pieces the complete shards hold whole, then the tokens they hold of the next one.
    n_pieces, discard = (shards[-1]["pieces"], shards[-1]["skip_tokens"]) if shards else (0, 0)
    if shards:
        print(f"{args.out_dir}: {len(shards)} shards complete, resuming after them", file=sys.stderr)
    shard, n_docs, n_tokens, t0, shown = None, 0, 0, time.time(), 0.0

    def show_progress():
        nonlocal shown
        shown = time.time()
        print(f"\r{n_docs:,} documents, {n_tokens:,} tokens, {n_tokens / max(shown - t0, 1e-6):,.0f} tokens/s",
              end="", file=sys.stderr, flush=True)

    tokenized = encoded(itertools.islice(stream, n_pieces, None), args.workers)
    try:
        for tokens, lengths in tokenized:
            ends, used = np.cumsum(lengths), min(discard, len(tokens))  # used: tokens of this task consumed
            discard -= used
            while used < len(tokens):
                if shard is None:
                    journal.open()
                    shard = Shard(args.out_dir, *shard_name_and_size(len(shards), args))
                take = min(len(tokens) - used, shard.capacity - shard.count)
                shard.write(tokens[used : used + take])
                used += take
                if shard.count == shard.capacity:  # record the pieces it holds whole, and its part of the next
                    whole = int(np.searchsorted(ends, used, side="right"))
                    skip = used - int(ends[whole - 1]) if whole else used
                    record = {**shard.close(), "pieces": n_pieces + whole, "skip_tokens": skip}
                    shard = None
                    journal.append(record)
            n_pieces += len(lengths)
            n_docs += int((tokens == EOT_TOKEN).sum())  # encode_ordinary never makes it: one per document
            n_tokens += len(tokens)
            if time.time() - shown >= 1:  # at most once a second
                show_progress()
        if n_tokens:
            show_progress()  # the final figures: the last line shown may be up to a second old
        if shard is not None:  # the stream's last, shorter shard
            shards.append({**shard.close(), "pieces": n_pieces, "skip_tokens": 0})
            shard = None
    finally:
        tokenized.close()  # on an error above, the workers stop now, not whenever the generator is collected
        if shard is not None:
            shard.abort()
        journal.close()
        if shown:
            print(file=sys.stderr)
    n_val = sum(s["tokens"] for s in shards if s["file"].startswith("val"))
    n_train = sum(s["tokens"] for s in shards) - n_val
    if not shards:
        raise DataError("the inputs hold no documents")
    if n_train == 0:
        why = (f"the inputs hold {n_val:,} tokens, all of them taken by the validation split (--val_tokens "
               f"{args.val_tokens:,})")
        if not started_empty:  # shards of an earlier run of this command: not this run's to delete
            raise DataError(f"{why}: rerun with a smaller --val_tokens and --overwrite")
        # All of them this run's: removed, so that the rerun with a smaller --val_tokens needs no --overwrite
        for name in [s["file"] for s in shards] + [MANIFEST, JOURNAL]:
            remove(os.path.join(args.out_dir, name))
        raise DataError(f"{why}: rerun with a smaller --val_tokens (the shards this run wrote are removed)")
    journal.finish()
    print(f"{args.out_dir}: {len(shards)} shards, {n_val:,} validation and {n_train:,} training tokens",
          file=sys.stderr)


def main(argv=None):
    args = build_parser().parse_args(argv)
    try:
        prepare(args)
    except DataError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    except KeyboardInterrupt:
        print("interrupted: the same command carries on after the last complete shard", file=sys.stderr)
        sys.exit(130)


if __name__ == "__main__":
    main()

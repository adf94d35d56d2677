import errno
import json
import logging
import os
import re
import socket
import sys

import numpy as np
import pytest
import torch

import data
import files
import prepare
from conftest import REPO
from data import ShardLoader, batch_rows, shuffled_index
from files import DataError
from tokenizer import EOT_TOKEN, get_tokenizer

OPTIONS = ["--shard_tokens", "1000", "--val_tokens", "1500"]  # about 10,000 tokens: 2 val shards, 9 train shards


@pytest.fixture(autouse=True)
def small_tasks(monkeypatch):
    """Tasks of ~2,000 characters instead of 1M, so 2 workers share even a small corpus, and shards end mid-task."""
    monkeypatch.setattr(prepare, "TASK_CHARS", 2000)


@pytest.fixture(autouse=True)
def hub_host(monkeypatch):
    """No test touches the network: a host name resolves (to no address: nothing connects to it), as if online. The
    hub libraries' log levels, which --hf_dataset raises, are put back afterwards."""
    monkeypatch.setattr(socket, "getaddrinfo", lambda *args, **kwargs: [])
    for name in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE", "HF_ENDPOINT"):
        monkeypatch.delenv(name, raising=False)
    loggers = [logging.getLogger(name) for name in ("huggingface_hub", "datasets")]
    levels = [logger.level for logger in loggers]
    yield
    for logger, level in zip(loggers, levels):
        logger.setLevel(level)


def documents(n=300):
    rng = np.random.default_rng(0)
    words = "the of and a to in is was he for it with as his on be at by I you".split()
    docs = [" ".join(rng.choice(words, rng.integers(3, 60))) + "\n" * (i % 3) for i in range(n)]
    docs[5] = "Special text is text: <|endoftext|>. naïve café 東京 🙂\r\nA line\n\n  and more  \n"
    docs[9] = ""  # an empty document is its <|endoftext|> alone
    return docs


def expected_tokens(docs):
    return np.array([t for doc in docs for t in [EOT_TOKEN] + get_tokenizer().encode_ordinary(doc)])


def write_jsonl(path, docs):
    path.write_text("".join(json.dumps({"id": i, "text": doc}) + "\n" for i, doc in enumerate(docs)), "utf-8")
    return str(path)


def run(out, *inputs, workers=2, options=OPTIONS):
    prepare.main([*map(str, inputs), "--out_dir", str(out), "--workers", str(workers), *options])


def shard_names(out):
    return sorted(name for name in os.listdir(out) if name.endswith(".bin"))


def split_tokens(out, split):
    return np.concatenate([data.shard_tokens(os.path.join(out, name)) for name in shard_names(out)
                           if name.startswith(split)])


def shard_bytes(out):
    return {name: open(os.path.join(out, name), "rb").read() for name in shard_names(out)}


@pytest.fixture
def corpus(tmp_path):
    return write_jsonl(tmp_path / "docs.jsonl", documents())


def test_shards_hold_each_document_as_eot_then_its_tokens_in_order_validation_first(tmp_path, corpus):
    run(tmp_path / "out", corpus)
    val, train = split_tokens(tmp_path / "out", "val"), split_tokens(tmp_path / "out", "train")
    assert len(val) == 1500
    np.testing.assert_array_equal(np.concatenate([val, train]), expected_tokens(documents()))


def test_every_shard_but_the_last_holds_exactly_shard_tokens_in_llm_c_format(tmp_path, corpus):
    run(tmp_path / "out", corpus)
    counts = {}
    for name in shard_names(tmp_path / "out"):
        path = tmp_path / "out" / name
        header = np.fromfile(path, dtype="<i4", count=256)
        assert list(header[:2]) == [20240520, 1] and not header[3:].any()  # llm.c's GPT-2 magic and version
        assert os.path.getsize(path) == 1024 + 2 * header[2]
        counts[name] = int(header[2])
    assert [counts.pop("val_000000.bin"), counts.pop("val_000001.bin")] == [1000, 500]
    train = [counts[name] for name in sorted(counts)]
    assert len(train) == 9 and set(train[:-1]) == {1000} and 0 < train[-1] <= 1000
    manifest = json.loads((tmp_path / "out" / "manifest.json").read_text())
    assert manifest["done"] and (manifest["config"]["tokenizer"], manifest["config"]["dtype"]) == ("gpt2", "uint16")
    assert [s["file"] for s in manifest["shards"]] == ["val_000000.bin", "val_000001.bin"] + sorted(counts)


def test_one_and_two_workers_write_identical_shards(tmp_path, corpus):
    run(tmp_path / "one", corpus, workers=1)
    run(tmp_path / "two", corpus, workers=2)
    assert shard_bytes(tmp_path / "one") == shard_bytes(tmp_path / "two")


def test_text_files_a_folder_of_them_and_jsonl_give_the_same_shards(tmp_path):
    docs = documents()
    folder = tmp_path / "corpus"
    (folder / "sub").mkdir(parents=True)  # sorted by path: corpus/doc_000.txt ... then corpus/sub/doc_150.txt ...
    paths = [folder / ("sub" if i >= 150 else "") / f"doc_{i:03d}.txt" for i in range(len(docs))]
    for path, doc in zip(paths, docs):
        path.write_bytes(doc.encode("utf-8"))  # bytes: \r\n stays \r\n
    (folder / "README").write_text("not a document")  # skipped: no known suffix
    (folder / ".hidden.txt").write_text("skipped too")
    run(tmp_path / "files", *paths)
    run(tmp_path / "folder", folder)
    run(tmp_path / "jsonl", write_jsonl(tmp_path / "a.jsonl", docs[:100]),
        write_jsonl(tmp_path / "b.jsonl", docs[100:]))
    assert shard_bytes(tmp_path / "files") == shard_bytes(tmp_path / "folder") == shard_bytes(tmp_path / "jsonl")


def test_parquet_gives_the_same_shards_as_jsonl(tmp_path, corpus):
    pa, pq = pytest.importorskip("pyarrow"), pytest.importorskip("pyarrow.parquet")
    pq.write_table(pa.table({"id": range(300), "text": documents()}), tmp_path / "docs.parquet", row_group_size=64)
    run(tmp_path / "parquet", tmp_path / "docs.parquet")
    run(tmp_path / "jsonl", corpus)
    assert shard_bytes(tmp_path / "parquet") == shard_bytes(tmp_path / "jsonl")


def test_a_long_text_file_tokenized_in_pieces_gives_the_tokens_of_the_whole(tmp_path, monkeypatch):
    monkeypatch.setattr(prepare, "TEXT_PIECE", 200)  # cut Shakespeare into ~100 pieces
    with open(os.path.join(REPO, "input.txt"), encoding="utf-8") as f:
        text = f.read(20_000) + "\n\n\nZ\r\nY\n  X \n\tW\n"
    (tmp_path / "play.txt").write_text(text, encoding="utf-8", newline="")
    run(tmp_path / "out", tmp_path / "play.txt")
    tokens = np.concatenate([split_tokens(tmp_path / "out", "val"), split_tokens(tmp_path / "out", "train")])
    np.testing.assert_array_equal(tokens, [EOT_TOKEN] + get_tokenizer().encode_ordinary(text))
    assert json.loads((tmp_path / "out" / "manifest.json").read_text())["shards"][-1]["pieces"] > 50


@pytest.mark.parametrize("damage", ["truncated", "missing", "zeroed header"])
def test_a_rerun_skips_complete_shards_and_redoes_a_damaged_one_and_those_after(tmp_path, corpus, monkeypatch, damage):
    encoded = []  # pieces tokenized, counted in this process: --workers 1
    encode = prepare.encode
    monkeypatch.setattr(prepare, "encode", lambda task: encoded.extend(task) or encode(task))
    out = tmp_path / "out"
    run(out, corpus, workers=1)
    first = shard_bytes(out)
    files = [shard["file"] for shard in json.loads((out / "manifest.json").read_text())["shards"]]  # stream order
    assert len(encoded) == 300
    def identities():  # a rewritten shard is a new file, renamed into place
        return {name: (os.stat(out / name).st_ino, os.stat(out / name).st_mtime_ns) for name in files}

    before = identities()
    encoded.clear()
    run(out, corpus, workers=1)  # all complete: nothing tokenized, nothing rewritten
    assert encoded == [] and identities() == before
    damaged = out / "train_000004.bin"
    if damage == "truncated":
        damaged.write_bytes(damaged.read_bytes()[:-100])
    elif damage == "missing":
        damaged.unlink()
    else:
        damaged.write_bytes(bytes(1024) + damaged.read_bytes()[1024:])
    run(out, corpus, workers=1)
    assert shard_bytes(out) == first
    after = identities()
    redone = [name for name in files if after[name] != before[name]]
    assert redone == files[files.index("train_000004.bin") :]  # the earlier ones were checked and kept
    assert 0 < len(encoded) < 200  # fast-forwarded past the pieces of the 6 complete shards


def test_a_rerun_with_other_options_or_edited_inputs_is_refused_unless_overwrite(tmp_path, corpus, capsys):
    run(tmp_path / "out", corpus)
    with pytest.raises(SystemExit) as exit:
        run(tmp_path / "out", corpus, options=["--shard_tokens", "2000", "--val_tokens", "1500"])
    err = capsys.readouterr().err
    assert exit.value.code == 2 and "other --shard_tokens: use a fresh --out_dir, or --overwrite" in err
    with open(corpus, "a") as f:
        f.write(json.dumps({"text": "one more"}) + "\n")
    with pytest.raises(SystemExit):
        run(tmp_path / "out", corpus)
    assert "other inputs" in capsys.readouterr().err
    run(tmp_path / "out", corpus, options=["--shard_tokens", "2000", "--val_tokens", "1500", "--overwrite"])
    assert set(data.shard_tokens(tmp_path / "out" / "train_000000.bin").shape) == {2000}


def written_to_manifest(monkeypatch):
    """Characters prepare.py writes to files other than shards (manifest.json, its journal, their temporaries)."""
    written = []
    real_open = open

    def counting_open(path, mode="r", *args, **kwargs):
        f = real_open(path, mode, *args, **kwargs)
        if ".bin" not in os.path.basename(path) and "r" not in mode:
            write = f.write
            f.write = lambda data: written.append(len(data)) or write(data)
        return f

    monkeypatch.setattr(prepare, "open", counting_open, raising=False)
    return written


def test_the_manifest_costs_the_same_per_shard_however_many_shards_came_before(tmp_path, monkeypatch):
    per_shard = []
    for n_docs in (300, 1200):  # 11 shards, then about 4 times as many
        written = written_to_manifest(monkeypatch)
        out = tmp_path / f"out{n_docs}"
        run(out, write_jsonl(tmp_path / f"docs{n_docs}.jsonl", documents(n_docs)), workers=1)
        per_shard.append(sum(written) / len(shard_names(out)))
    assert len(shard_names(tmp_path / "out1200")) >= 40
    # rewriting the whole manifest after each shard would make this 4 times more, not less
    assert per_shard[1] <= per_shard[0]


@pytest.mark.parametrize("option, value, message", [
    ("--shard_tokens", "999", "999 is not from 1,000 to 2,147,483,647: smaller shards would split a corpus"),
    ("--shard_tokens", "0", "0 is not from 1,000"),
    ("--shard_tokens", "3_000_000_000", "3,000,000,000 is not from 1,000 to 2,147,483,647"),
    ("--shard_tokens", "1e6", "invalid int value: '1e6'"),
    ("--val_tokens", "-1", "-1 is not at least 0"),
    ("--workers", "0", "0 is not at least 1"),
])
def test_senseless_shard_sizes_and_worker_counts_are_refused_in_one_line_before_any_work(tmp_path, corpus, capsys,
                                                                                         option, value, message):
    options = {"--shard_tokens": "1000", "--val_tokens": "1000", "--workers": "1", option: value}
    with pytest.raises(SystemExit) as exit:
        prepare.main([corpus, "--out_dir", str(tmp_path / "out"), *[x for kv in options.items() for x in kv]])
    err = capsys.readouterr().err
    assert exit.value.code == 2 and err.count("\n") == 1 and f"error: argument {option}: {message}" in err, err
    assert not os.path.exists(tmp_path / "out")


def test_a_rerun_after_a_kill_removes_its_temporaries_and_writes_byte_identical_output(tmp_path, corpus,
                                                                                      monkeypatch):
    out, encode, tasks = tmp_path / "out", prepare.encode, []
    monkeypatch.setattr(prepare, "encode", lambda task: tasks.append(task) or encode(task))
    run(tmp_path / "clean", corpus, workers=1)
    all_tasks = len(tasks)
    tasks.clear()

    def killed_at_task_8(task):  # a kill runs no cleanup: the shard being written stays a .tmp
        tasks.append(task)
        if len(tasks) == 8:
            raise KeyboardInterrupt
        return encode(task)

    with monkeypatch.context() as m:
        m.setattr(prepare, "encode", killed_at_task_8)
        m.setattr(prepare.Shard, "abort", lambda shard: None)
        with pytest.raises(SystemExit):
            run(out, corpus, workers=1)
    with open(out / "journal.jsonl", "a") as f:
        f.write('{"file": "train_0')  # and killed while appending the next shard's line
    (out / "manifest.json.tmp").write_text('{"config": ')  # or while rewriting the manifest
    (out / "train_000042.bin.tmp").write_bytes(bytes(1024))  # or by an earlier run, past where this one stops
    left = sorted(name for name in os.listdir(out) if name.endswith(".tmp"))
    assert len(left) == 3 and 0 < len(shard_names(out)) < len(shard_names(tmp_path / "clean"))
    tasks.clear()
    run(out, corpus, workers=1)
    assert 0 < len(tasks) < all_tasks  # resumed after the shards the killed run completed
    assert sorted(os.listdir(out)) == sorted(os.listdir(tmp_path / "clean"))  # no .tmp, no journal left
    assert shard_bytes(out) == shard_bytes(tmp_path / "clean")
    assert (out / "manifest.json").read_bytes() == (tmp_path / "clean" / "manifest.json").read_bytes()


def fail_writing(monkeypatch, name, error):
    """Writes to OUT/name (or its temporary) fail with error, as on a full disk or a read-only file system."""
    real_open = open

    def failing_open(path, mode="r", *args, **kwargs):
        f = real_open(path, mode, *args, **kwargs)
        if os.path.basename(path).removesuffix(".tmp") == name and "r" not in mode:
            def write(data):
                raise error
            f.write = write
        return f

    monkeypatch.setattr(prepare, "open", failing_open, raising=False)


def fail_renaming(monkeypatch, name, error):
    real_replace = os.replace

    def failing_replace(source, target):
        if os.path.basename(target) == name:
            raise error
        return real_replace(source, target)

    monkeypatch.setattr(prepare.os, "replace", failing_replace)


def messages(capsys):
    """The lines on stderr, less the progress line (rewritten in place with "\\r")."""
    return [line for line in capsys.readouterr().err.split("\n") if line and not line.startswith("\r")]


@pytest.mark.parametrize("fail, name, error, cause", [
    (fail_writing, "train_000002.bin", OSError(errno.ENOSPC, "No space left on device"), "No space left on device"),
    (fail_writing, "journal.jsonl", OSError(errno.EROFS, "Read-only file system"), "Read-only file system"),
    (fail_writing, "manifest.json", OSError(errno.ENOSPC, "No space left on device"), "No space left on device"),
    (fail_renaming, "val_000001.bin", PermissionError(errno.EACCES, "Permission denied"), "Permission denied"),
    (fail_renaming, "manifest.json", PermissionError(errno.EACCES, "Permission denied"), "Permission denied"),
])
def test_a_failed_write_is_one_line_naming_the_file_and_its_cause_and_leaves_no_temporary(
        tmp_path, corpus, capsys, monkeypatch, fail, name, error, cause):
    with monkeypatch.context() as m, pytest.raises(SystemExit) as exit:
        fail(m, name, error)
        run(tmp_path / "out", corpus)
    err = messages(capsys)
    assert exit.value.code == 2 and len(err) == 1, err
    assert err[0].startswith(f"error: cannot write {tmp_path / 'out' / name}: {cause} (make room on the disk or pass")
    left = os.listdir(tmp_path / "out") if os.path.exists(tmp_path / "out") else []  # (removed if left empty)
    assert not [name for name in left if name.endswith(".tmp")]
    run(tmp_path / "out", corpus)  # the disk has room again: the same command finishes the job
    run(tmp_path / "clean", corpus)
    assert shard_bytes(tmp_path / "out") == shard_bytes(tmp_path / "clean")


class DyingTokenizer:
    """The real tokenizer in this process; in a worker, the death of an OOM-killed process at its third task."""

    def __init__(self, parent):
        self.real, self.parent, self.calls = get_tokenizer(), parent, 0

    def encode_ordinary(self, text):
        self.calls += 1
        if os.getpid() != self.parent and self.calls > 2:
            os._exit(137)
        return self.real.encode_ordinary(text)


def test_a_killed_worker_is_one_line_not_a_hang_and_the_rerun_finishes_the_job(tmp_path, corpus, capsys, monkeypatch):
    with monkeypatch.context() as m, pytest.raises(SystemExit) as exit:
        dying = DyingTokenizer(os.getpid())
        m.setattr(prepare, "get_tokenizer", lambda: dying)  # the workers are forked with it
        run(tmp_path / "out", corpus)
    err = messages(capsys)
    assert exit.value.code == 2 and err == ["error: a tokenizing worker died (out of memory?): rerun with fewer than "
                                            "--workers 2; the same command keeps the complete shards"], err
    run(tmp_path / "out", corpus)
    run(tmp_path / "clean", corpus)
    assert shard_bytes(tmp_path / "out") == shard_bytes(tmp_path / "clean")


@pytest.mark.skipif(os.name != "posix" or os.geteuid() == 0, reason="root writes to a read-only folder regardless")
def test_a_read_only_out_dir_is_refused_in_one_line(tmp_path, corpus, capsys):
    (tmp_path / "out").mkdir(mode=0o555)
    with pytest.raises(SystemExit) as exit:
        run(tmp_path / "out", corpus)
    err = messages(capsys)
    assert exit.value.code == 2 and len(err) == 1 and "cannot write" in err[0] and "Permission denied" in err[0]


GOOD = json.dumps({"text": "fine"})


@pytest.mark.parametrize(
    "name, content, message",
    [
        (None, None, "no inputs: pass text, JSONL or Parquet files"),
        ("nope.txt", None, "input .*nope.txt does not exist"),
        ("data.csv", "a,b\n", "data.csv is not .txt, .md, .jsonl, .parquet"),
        ("empty", "", "folder .*empty holds no .txt"),
        ("data.jsonl", f"{GOOD}\n\n{{text: 1}}\n{GOOD}\n", "data.jsonl line 3 is not valid JSON"),
        ("data.jsonl", f'{GOOD}\n{{"content": "x"}}\n', "data.jsonl line 2 has no text in field 'text'"),
        ("data.jsonl", f'{GOOD}\n{{"text": 5}}\n', "data.jsonl line 2 has no text in field 'text'"),
        ("latin1.txt", b"caf\xe9", "latin1.txt is not UTF-8"),
    ],
)
def test_bad_input_gets_one_line_and_no_shard(tmp_path, capsys, name, content, message):
    path = tmp_path / (name or "unused")
    if name == "empty":
        path.mkdir()
    elif content is not None:
        path.write_bytes(content if isinstance(content, bytes) else content.encode())
    with pytest.raises(SystemExit) as exit:  # the default --val_tokens: 1,500 would be refused first, up front
        run(tmp_path / "out", *([path] if name else []), options=["--shard_tokens", "1000"])
    err = capsys.readouterr().err
    assert exit.value.code == 2 and err.count("\n") == 1 and err.startswith("error: ")
    assert re.search(message, err), err
    assert not os.path.exists(tmp_path / "out") or os.listdir(tmp_path / "out") == []


def one_line_error(capsys):
    """The error line of a run that failed, after checking it is the only line but the progress line."""
    err = messages(capsys)
    assert len(err) == 1 and err[0].startswith("error: "), err
    return err[0]


@pytest.mark.parametrize("name", ["windows.txt", "windows.jsonl"])
def test_utf16_without_a_byte_order_mark_is_refused_in_one_line_before_any_shard_or_folder(tmp_path, capsys, name):
    # ASCII text as UTF-16 without its byte-order mark: valid UTF-8, with a NUL after each character
    text = "".join(json.dumps({"text": doc}) + "\r\n" for doc in documents(100))
    (tmp_path / name).write_bytes(text.encode("utf-16-le"))
    with pytest.raises(SystemExit) as exit:
        run(tmp_path / "out", tmp_path / name)
    where = f"{name} line 1" if name.endswith(".jsonl") else name
    assert exit.value.code == 2 and f"{where} is not UTF-8 text (UTF-16, or binary: it has NUL bytes): convert it " \
        f"to UTF-8, e.g. iconv -f UTF-16 -t UTF-8" in one_line_error(capsys)
    assert not os.path.exists(tmp_path / "out")  # nothing written, not even the folder


def test_a_stray_nul_in_a_text_file_is_text_as_in_train_py(tmp_path):
    text = "".join(documents(100))
    (tmp_path / "stray.txt").write_text(text[:1000] + "\0" + text[1000:], encoding="utf-8")  # under 1% NULs
    run(tmp_path / "out", tmp_path / "stray.txt")
    assert json.loads((tmp_path / "out" / "manifest.json").read_text())["done"]


def test_a_utf8_byte_order_mark_is_dropped_from_text_files_and_jsonl_as_train_py_drops_it(tmp_path, corpus):
    docs, folder = documents(), tmp_path / "corpus"
    folder.mkdir()
    for i, doc in enumerate(docs):  # Notepad's and PowerShell's UTF-8 starts with a byte-order mark
        (folder / f"doc_{i:03d}.txt").write_bytes(b"\xef\xbb\xbf" + doc.encode("utf-8"))
    (tmp_path / "bom.jsonl").write_bytes(b"\xef\xbb\xbf" + open(corpus, "rb").read())
    run(tmp_path / "text", folder)
    run(tmp_path / "bom_jsonl", tmp_path / "bom.jsonl")
    run(tmp_path / "clean", corpus)
    assert shard_bytes(tmp_path / "text") == shard_bytes(tmp_path / "bom_jsonl") == shard_bytes(tmp_path / "clean")
    assert files.read_text(str(folder / "doc_000.txt"))[1] == docs[0]  # what train.py reads of such a file


def test_jsonl_nested_too_deeply_is_the_one_line_invalid_json_error_not_a_recursion_traceback(tmp_path, capsys):
    (tmp_path / "deep.jsonl").write_text(f"{GOOD}\n" + "[" * 100_000 + "]" * 100_000 + "\n")
    with pytest.raises(SystemExit) as exit:
        run(tmp_path / "out", tmp_path / "deep.jsonl", options=[])
    assert exit.value.code == 2
    assert "deep.jsonl line 2 is not valid JSON (nested too deeply): fix or remove that line" in one_line_error(capsys)


def test_the_default_val_tokens_is_a_tenth_of_the_corpus_at_4_bytes_a_token_at_most_10m(tmp_path, corpus, capsys):
    run(tmp_path / "out", corpus, options=["--shard_tokens", "1000"])  # was 10M: more than the corpus, refused
    val_tokens = os.path.getsize(corpus) // 40
    assert json.loads((tmp_path / "out" / "manifest.json").read_text())["config"]["val_tokens"] == val_tokens
    assert len(split_tokens(tmp_path / "out", "val")) == val_tokens and len(split_tokens(tmp_path / "out", "train"))
    capsys.readouterr()
    run(tmp_path / "out", corpus, options=["--shard_tokens", "1000"])  # the rerun resolves it alike
    assert f"all {len(shard_names(tmp_path / 'out'))} shards are already complete" in capsys.readouterr().err
    assert prepare.estimated_val_tokens(10**12) == 10_000_000
    assert "if not given, a tenth of the corpus, estimated at 4 bytes a token" in " ".join(
        prepare.build_parser().format_help().split())


def test_a_val_tokens_the_inputs_cannot_fill_is_refused_up_front_and_nothing_is_written_or_removed(
        tmp_path, corpus, capsys, monkeypatch):
    run(tmp_path / "out", corpus)
    before = shard_bytes(tmp_path / "out")
    capsys.readouterr()
    monkeypatch.setattr(prepare, "encode", lambda task: pytest.fail("tokenized"))
    size = os.path.getsize(corpus)
    for out in ("out", "fresh"):
        with pytest.raises(SystemExit) as exit:  # --overwrite would delete the shards first
            run(tmp_path / out, corpus, options=["--shard_tokens", "1000", "--val_tokens", str(size), "--overwrite"])
        assert exit.value.code == 2 and (f"error: --val_tokens {size:,} leaves no training tokens: the inputs hold at "
                                         f"most {size:,}") in one_line_error(capsys)
    assert shard_bytes(tmp_path / "out") == before and not os.path.exists(tmp_path / "fresh")


def test_empty_text_files_are_a_token_each_in_the_bound_on_val_tokens(tmp_path):
    for i in range(3):
        (tmp_path / f"empty_{i}.txt").write_bytes(b"")  # 0 bytes: 3 tokens, an <|endoftext|> each
    run(tmp_path / "out", tmp_path, options=["--shard_tokens", "1000", "--val_tokens", "2"], workers=1)
    assert list(split_tokens(tmp_path / "out", "val")) == [EOT_TOKEN] * 2
    assert list(split_tokens(tmp_path / "out", "train")) == [EOT_TOKEN]


def test_a_run_left_with_no_training_tokens_removes_what_it_wrote_so_a_smaller_val_tokens_reruns_without_overwrite(
        tmp_path, corpus, capsys):
    n_tokens = len(expected_tokens(documents()))  # ~10,000: under the file's bytes, so not refused up front
    (tmp_path / "kept").mkdir()
    (tmp_path / "kept" / "notes.txt").write_text("not ours")
    for out in ("kept", "fresh"):
        with pytest.raises(SystemExit) as exit:
            run(tmp_path / out, corpus, options=["--shard_tokens", "1000", "--val_tokens", str(n_tokens + 100)])
        assert exit.value.code == 2 and one_line_error(capsys) == (
            f"error: the inputs hold {n_tokens:,} tokens, all of them taken by the validation split (--val_tokens "
            f"{n_tokens + 100:,}): rerun with a smaller --val_tokens (the shards this run wrote are removed)")
    assert os.listdir(tmp_path / "kept") == ["notes.txt"] and not os.path.exists(tmp_path / "fresh")
    run(tmp_path / "kept", corpus)  # a smaller --val_tokens, no --overwrite
    assert len(split_tokens(tmp_path / "kept", "train")) == n_tokens - 1500


def test_a_resumed_run_left_with_no_training_tokens_keeps_the_shards_an_earlier_run_completed(tmp_path, corpus,
                                                                                            capsys, monkeypatch):
    options = ["--shard_tokens", "1000", "--val_tokens", str(len(expected_tokens(documents())) + 100)]
    encode, tasks = prepare.encode, []

    def killed_at_task_8(task):
        tasks.append(task)
        if len(tasks) == 8:
            raise KeyboardInterrupt
        return encode(task)

    with monkeypatch.context() as m, pytest.raises(SystemExit):
        m.setattr(prepare, "encode", killed_at_task_8)
        run(tmp_path / "out", corpus, workers=1, options=options)
    earlier = shard_bytes(tmp_path / "out")
    assert earlier and all(name.startswith("val") for name in earlier)
    capsys.readouterr()
    with pytest.raises(SystemExit):
        run(tmp_path / "out", corpus, workers=1, options=options)
    assert messages(capsys)[-1].endswith("rerun with a smaller --val_tokens and --overwrite")
    assert earlier.items() <= shard_bytes(tmp_path / "out").items()


def test_the_progress_line_ends_with_the_final_document_and_token_counts(tmp_path, corpus, capsys):
    run(tmp_path / "out", corpus)  # in well under a second: the line was shown once, after the first task
    progress = [line for line in capsys.readouterr().err.split("\n") if "documents" in line]
    assert len(progress) == 1
    final = progress[0].split("\r")[-1]
    assert final.startswith(f"300 documents, {len(expected_tokens(documents())):,} tokens, "), progress


@pytest.mark.parametrize("module, argv, message", [
    ("pyarrow", ["docs.parquet"], "reading .parquet files needs pyarrow: pip install pyarrow"),
    ("datasets", ["--hf_dataset", "HuggingFaceFW/fineweb-edu"], "--hf_dataset needs datasets: pip install datasets"),
])
def test_a_missing_optional_library_is_named_with_its_install_command(tmp_path, capsys, monkeypatch, module, argv,
                                                                      message):
    monkeypatch.setitem(sys.modules, module, None)  # import fails, as if not installed
    monkeypatch.setitem(sys.modules, module + ".parquet", None)
    (tmp_path / "docs.parquet").write_bytes(b"")
    monkeypatch.chdir(tmp_path)
    with pytest.raises(SystemExit):
        prepare.main([*argv, "--out_dir", "out"])
    assert message in capsys.readouterr().err and not os.path.exists(tmp_path / "out")


class FakeDatasets:
    """The one call prepare.py makes of the datasets library, without the network."""

    def __init__(self, rows=None, error=None):
        self.rows, self.error, self.calls = rows, error, []

    def load_dataset(self, name, config, split, streaming):
        self.calls.append((name, config, split, streaming))
        if self.error:
            raise self.error
        return iter(self.rows)


def test_a_hugging_face_dataset_is_streamed_into_the_same_shards_as_a_local_file(tmp_path, corpus, monkeypatch):
    fake = FakeDatasets(rows=[{"id": i, "text": doc} for i, doc in enumerate(documents())])
    monkeypatch.setitem(sys.modules, "datasets", fake)
    run(tmp_path / "hf", "--hf_dataset", "HuggingFaceFW/fineweb-edu", "--hf_config", "sample-10BT")
    run(tmp_path / "jsonl", corpus)
    assert fake.calls == [("HuggingFaceFW/fineweb-edu", "sample-10BT", "train", True)]
    assert shard_bytes(tmp_path / "hf") == shard_bytes(tmp_path / "jsonl")


def test_a_hugging_face_dataset_offline_gets_one_line(tmp_path, capsys, monkeypatch):
    error = ConnectionError("Couldn't reach 'HuggingFaceFW/fineweb-edu' on the Hub\n(LocalEntryNotFoundError)")
    monkeypatch.setitem(sys.modules, "datasets", FakeDatasets(error=error))
    with pytest.raises(SystemExit):
        run(tmp_path / "out", "--hf_dataset", "HuggingFaceFW/fineweb-edu")
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "is this machine online?): Couldn't reach" in err
    assert not os.path.exists(tmp_path / "out")  # no shard, nor the empty folder this run made


def test_an_offline_machine_is_told_at_once_by_resolving_the_hub_before_any_folder(tmp_path, capsys, monkeypatch):
    fake, asked = FakeDatasets(rows=[{"text": doc} for doc in documents()]), []

    def unresolved(host, *args, **kwargs):
        asked.append(host)
        raise socket.gaierror(socket.EAI_NONAME, "Name or service not known")

    monkeypatch.setitem(sys.modules, "datasets", fake)
    monkeypatch.setattr(socket, "getaddrinfo", unresolved)
    for endpoint, host in [(None, "huggingface.co"), ("https://hf-mirror.example:8443", "hf-mirror.example")]:
        if endpoint:
            monkeypatch.setenv("HF_ENDPOINT", endpoint)
        with pytest.raises(SystemExit) as exit:
            run(tmp_path / "out", "--hf_dataset", "HuggingFaceFW/fineweb-edu")
        assert exit.value.code == 2 and one_line_error(capsys) == (
            f"error: cannot stream HuggingFaceFW/fineweb-edu from the Hugging Face hub (is this machine online?): "
            f"cannot resolve {host}: Name or service not known")
        assert asked[-1] == host and fake.calls == [] and not os.path.exists(tmp_path / "out")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")  # a cached dataset is read without the network: not checked
    run(tmp_path / "out", "--hf_dataset", "HuggingFaceFW/fineweb-edu")
    assert len(asked) == 2 and len(fake.calls) == 1 and shard_names(tmp_path / "out")


def test_the_hub_libraries_retry_warnings_are_silenced_so_our_one_line_is_all_that_shows(tmp_path, capsys,
                                                                                        monkeypatch, caplog):
    class Retrying(FakeDatasets):
        def load_dataset(self, *args, **kwargs):  # as huggingface_hub's http_backoff and datasets log, offline
            for name in ("huggingface_hub.utils._http", "datasets.load"):
                logging.getLogger(name).warning("'[Errno 111] Connection refused' thrown; Retrying in 1s [Retry 1/5].")
            return super().load_dataset(*args, **kwargs)

    monkeypatch.setitem(sys.modules, "datasets", Retrying(error=ConnectionError("Couldn't reach it on the Hub")))
    with pytest.raises(SystemExit):
        run(tmp_path / "out", "--hf_dataset", "HuggingFaceFW/fineweb-edu")
    assert "Couldn't reach it on the Hub" in one_line_error(capsys)
    assert not [record for record in caplog.records if "Retry" in record.getMessage()]


def test_a_hugging_face_dataset_defaults_to_10m_validation_tokens_and_a_small_one_leaves_nothing(tmp_path, capsys,
                                                                                               monkeypatch):
    monkeypatch.setitem(sys.modules, "datasets", FakeDatasets(rows=[{"text": doc} for doc in documents()]))
    with pytest.raises(SystemExit):
        run(tmp_path / "out", "--hf_dataset", "HuggingFaceFW/fineweb-edu", options=["--shard_tokens", "1000"])
    assert "(--val_tokens 10,000,000): rerun with a smaller --val_tokens (the shards this run wrote are removed)" \
        in one_line_error(capsys)
    assert not os.path.exists(tmp_path / "out")


# ----------------------------------------------------------------------------------------------------------------
# ShardLoader: shards whose every token is its position (plus 1000 in train), so a row shows where it came from.


def write_shard(path, tokens, magic=20240520, version=1):
    header = np.zeros(256, dtype="<i4")
    header[:3] = magic, version, len(tokens)
    with open(path, "wb") as f:
        f.write(header.tobytes() + np.asarray(tokens, dtype="<u2").tobytes())


@pytest.fixture
def counting(tmp_path):
    """val: tokens 0..599 in 3 shards; train: 1000..3999 in 3 shards, named as llm.c names fineweb's."""
    for k in range(3):
        write_shard(tmp_path / f"val_{k:06d}.bin", range(200 * k, 200 * (k + 1)))
        write_shard(tmp_path / f"fineweb_train_{k:06d}.bin", range(1000 + 1000 * k, 2000 + 1000 * k))
    return str(tmp_path)


def windows(x):
    return ((x[:, 0] - 1000) // 16).tolist()  # the window number of each row (train, seq_len 16)


def test_a_window_crossing_a_shard_boundary_holds_consecutive_tokens(counting):
    loader = ShardLoader(counting, seq_len=16, batch_size=8, accum_steps=1)
    train = loader.splits["train"]
    assert (len(train), len(loader.splits["val"]), loader.n_windows["train"]) == (3000, 600, 187)
    np.testing.assert_array_equal(train[990:2010], np.arange(1990, 3010))  # across all three shards
    assert train[999] == 1999 and train[-1] == 3999 and len(train[2990:5000]) == 10
    seen = []
    for step in range(24):  # 192 rows: every one of the 187 windows at least once
        x, y, _ = loader.get_batch("train", step, 0)
        assert x.dtype == y.dtype == torch.int64 and x.shape == y.shape == (8, 16)
        torch.testing.assert_close(x, x[:, :1] + torch.arange(16))  # consecutive tokens, across boundaries too
        torch.testing.assert_close(y, x + 1)
        assert ((x[:, 0] - 1000) % 16 == 0).all()
        seen += windows(x)
    assert {62, 124} <= set(seen)  # windows 62 (1992..2008) and 124 (2984..3000) cross into the next shard


@pytest.mark.parametrize("split", ["train", "val"])
def test_two_ranks_read_disjoint_rows_whose_union_is_the_single_process_global_batch(counting, split):
    whole = ShardLoader(counting, 16, batch_size=8, accum_steps=1).get_batch(split, 3, 0)[0]
    parts = {}
    for rank in range(2):
        loader = ShardLoader(counting, 16, batch_size=2, accum_steps=2, rank=rank, world_size=2)
        for micro_step in range(2):
            parts[batch_rows(micro_step, rank, 2, 2).start] = loader.get_batch(split, 3, micro_step)[0]
    torch.testing.assert_close(torch.cat([parts[start] for start in sorted(parts)]), whole)
    rank0, rank1 = (set(torch.cat([parts[a], parts[b]])[:, 0].tolist()) for a, b in [(0, 4), (2, 6)])
    assert not rank0 & rank1


def test_batches_are_a_function_of_seed_split_step_and_micro_step_so_a_resumed_run_repeats_them(counting):
    run = ShardLoader(counting, 16, batch_size=4, accum_steps=2, seed=1)
    resumed = ShardLoader(counting, 16, batch_size=4, accum_steps=2, seed=1)  # a fresh process at step 30
    for split in ("train", "val"):
        for step in range(30, 60, 7):
            for m in range(2):
                torch.testing.assert_close(run.get_batch(split, step, m), resumed.get_batch(split, step, m))
    assert not torch.equal(run.get_batch("train", 7, 1)[0], run.get_batch("train", 8, 1)[0])
    assert not torch.equal(run.get_batch("train", 7, 0)[0], run.get_batch("train", 7, 1)[0])
    other_seed = ShardLoader(counting, 16, batch_size=4, accum_steps=2, seed=2)
    assert not torch.equal(run.get_batch("train", 7, 1)[0], other_seed.get_batch("train", 7, 1)[0])
    assert run.targets_in_step("train", 7) == 4 * 2 * 16


def test_each_epoch_visits_every_training_window_once_in_a_fresh_shuffled_order(counting):
    loader = ShardLoader(counting, 16, batch_size=4, accum_steps=2)
    n = loader.n_windows["train"]  # 187: epochs end mid-step
    rows = [w for step in range(71) for m in range(2) for w in windows(loader.get_batch("train", step, m)[0])]
    epochs = [rows[e * n : (e + 1) * n] for e in range(3)]
    for epoch in epochs:
        assert sorted(epoch) == list(range(n))
    assert epochs[0] != epochs[1] != epochs[2] != epochs[0] and epochs[0] != sorted(epochs[0])


def test_validation_reads_windows_in_order_from_the_start_wrapping(counting):
    loader = ShardLoader(counting, 16, batch_size=4, accum_steps=2)
    rows = [int(x0) // 16 for step in range(6) for m in range(2) for x0 in loader.get_batch("val", step, m)[0][:, 0]]
    assert rows == list(range(37)) + list(range(11))  # 37 windows in 599 tokens


@pytest.mark.parametrize("n", [1, 2, 3, 5, 16, 17, 1000])
def test_shuffled_index_is_a_permutation_of_range_n(n):
    for epoch in range(3):
        assert sorted(shuffled_index(np.arange(n), n, seed=7, epoch=epoch)) == list(range(n))


def test_shuffled_index_needs_no_memory_for_n_when_n_is_huge():
    n = 10**10  # 10M windows of 1,024 tokens in 10B tokens; 10^10 to be sure
    rows = shuffled_index(np.arange(n - 500, n), n, seed=7, epoch=0)
    assert len(set(rows.tolist())) == 500 and rows.min() >= 0 and rows.max() < n


@pytest.mark.parametrize(
    "make, message",
    [
        (lambda d: None, "holds no token shards .*make them with python prepare.py"),
        (lambda d: os.rmdir(d), "is not a folder of token shards"),
        (lambda d: write_shard(d / "val_000000.bin", range(100), magic=20240801, version=7),
         "not a shard of GPT-2 tokens as uint16 .*magic 20240801"),
        (lambda d: (d / "train_000000.bin").write_bytes(b"too short for a header"), "not a shard of GPT-2 tokens"),
        (lambda d: (write_shard(d / "val_000000.bin", range(100)),
                    (d / "val_000000.bin").write_bytes((d / "val_000000.bin").read_bytes()[:-10])),
         "truncated or damaged .*header says 100 tokens"),
        (lambda d: (write_shard(d / "val_000000.bin", range(10)), write_shard(d / "train_000000.bin", range(100))),
         "val split .* has 10 tokens, fewer than one sequence of --seq_len \\+ 1 = 17: rerun prepare.py with a larger"),
        (lambda d: write_shard(d / "val_000000.bin", range(100)), "train split .* has 0 tokens"),
        (lambda d: (write_shard(d / "val_000000.bin", range(100)), write_shard(d / "train_000000.bin", range(100)),
                    (d / "manifest.json").write_text('{"done": false}')), "prepare.py has not finished writing"),
    ],
)
def test_unusable_shard_folders_are_named_with_their_fix(tmp_path, make, message):
    folder = tmp_path / "shards"
    folder.mkdir()
    make(folder)
    with pytest.raises(DataError, match=message):
        ShardLoader(str(folder), seq_len=16, batch_size=2, accum_steps=1)


def test_shards_written_by_prepare_load_into_shard_loader(tmp_path, corpus):
    run(tmp_path / "out", corpus)
    loader = ShardLoader(str(tmp_path / "out"), seq_len=32, batch_size=4, accum_steps=1)
    tokens = expected_tokens(documents())
    np.testing.assert_array_equal(loader.splits["val"][:], tokens[:1500])
    np.testing.assert_array_equal(loader.splits["train"][:], tokens[1500:])
    x, y, _ = loader.get_batch("train", 0, 0)
    for row, w in zip(x.numpy(), loader.global_batch("train", 0)):
        np.testing.assert_array_equal(row, tokens[1500 + 32 * w : 1500 + 32 * w + 32])


def test_a_token_id_beyond_the_vocabulary_is_named_by_shard_and_offset_as_its_batch_is_drawn(counting):
    damaged = list(range(200, 400))
    damaged[7] = 60000  # token 207 of the val split: in step 1's batch (windows 8 to 15, tokens 128 to 256)
    write_shard(os.path.join(counting, "val_000001.bin"), damaged)
    loader = ShardLoader(counting, seq_len=16, batch_size=8, accum_steps=1)
    loader.get_batch("val", 0, 0)  # the batches before it are fine
    with pytest.raises(DataError, match=r"val_000001\.bin holds token id 60000 at token 7, beyond GPT-2's vocab"):
        loader.get_batch("val", 1, 0)

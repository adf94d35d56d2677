import os

import numpy as np
import pytest
import torch

import data
from conftest import REPO, SHARED
from data import DataError, TextLoader, batch_rows, get_tokenizer, load_text_tokens

TIKTOKEN_CACHE = os.path.join(SHARED, "tiktoken_cache")


def test_tokenizer_works_offline_with_gpt2_ids():
    tokenizer = get_tokenizer()
    assert tokenizer.n_vocab == 50257
    assert tokenizer.encode_ordinary("Hello world") == [15496, 995]
    assert tokenizer.encode("<|endoftext|>", allowed_special="all") == [data.EOT_TOKEN]


@pytest.mark.skipif(not os.path.isdir(TIKTOKEN_CACHE), reason="needs tiktoken's own GPT-2 files in ../shared")
def test_tokenizer_ids_equal_tiktokens_gpt2_encoding(monkeypatch):
    import tiktoken

    monkeypatch.setenv("TIKTOKEN_CACHE_DIR", TIKTOKEN_CACHE)
    reference = tiktoken.get_encoding("gpt2")
    with open(os.path.join(REPO, "input.txt"), encoding="utf-8") as f:
        text = f.read(200_000)
    text += " naïve café 東京 🙂 'll 've\n\n\t  trailing   \r\n 12345 $%^&"
    assert get_tokenizer().encode_ordinary(text) == reference.encode_ordinary(text)
    assert get_tokenizer().decode(reference.encode_ordinary(text)) == text


def test_token_cache_is_reused_then_rebuilt_when_the_file_changes(small_text, monkeypatch):
    tokens = load_text_tokens(small_text)
    assert os.path.exists(small_text + ".tokens.npz")
    calls = []
    real_tokenizer = get_tokenizer()

    class CountingTokenizer:
        def encode_ordinary(self, text):
            calls.append(text)
            return real_tokenizer.encode_ordinary(text)

    monkeypatch.setattr(data, "get_tokenizer", lambda: CountingTokenizer())
    np.testing.assert_array_equal(load_text_tokens(small_text), tokens)
    assert calls == []  # served from the cache
    with open(small_text, "a", encoding="utf-8") as f:
        f.write("\nA new line at the end.")
    changed = load_text_tokens(small_text)
    assert len(calls) == 1
    np.testing.assert_array_equal(changed, real_tokenizer.encode_ordinary(open(small_text, encoding="utf-8").read()))


def test_a_damaged_cache_is_rebuilt(small_text):
    tokens = load_text_tokens(small_text)
    with open(small_text + ".tokens.npz", "r+b") as f:
        f.truncate(100)  # as if a copy was cut short
    np.testing.assert_array_equal(load_text_tokens(small_text), tokens)


def test_a_cache_write_killed_midway_leaves_the_old_cache_intact(small_text, monkeypatch):
    load_text_tokens(small_text)
    cache = small_text + ".tokens.npz"
    before = open(cache, "rb").read()
    with open(small_text, "a", encoding="utf-8") as f:
        f.write("\nchanged")

    def savez_then_die(file, **arrays):
        file.write(b"half a cache")
        raise KeyboardInterrupt

    monkeypatch.setattr(np, "savez", savez_then_die)
    with pytest.raises(KeyboardInterrupt):
        load_text_tokens(small_text)
    assert open(cache, "rb").read() == before


def test_validation_is_the_last_tenth_of_the_tokens(small_text):
    tokens = load_text_tokens(small_text)
    loader = TextLoader(small_text, seq_len=32, batch_size=4, accum_steps=1)
    n_val = len(tokens) // 10
    np.testing.assert_array_equal(loader.splits["val"], tokens[-n_val:])
    np.testing.assert_array_equal(loader.splits["train"], tokens[:-n_val])


def test_targets_are_the_inputs_shifted_by_one_token(small_text):
    tokens = load_text_tokens(small_text).astype(np.int64)
    x, y = TextLoader(small_text, seq_len=32, batch_size=4, accum_steps=1).get_batch("train", 0, 0)
    assert x.shape == y.shape == (4, 32) and x.dtype == torch.int64
    windows = np.lib.stride_tricks.sliding_window_view(tokens, 33)
    for row_x, row_y in zip(x.numpy(), y.numpy()):
        window = np.concatenate([row_x, row_y[-1:]])
        assert (windows == window).all(axis=1).any()  # x then y's last token: 33 consecutive tokens of the text
        np.testing.assert_array_equal(row_x[1:], row_y[:-1])


def test_batches_are_a_function_of_seed_and_step(small_text):
    a = TextLoader(small_text, seq_len=32, batch_size=4, accum_steps=2, seed=1)
    b = TextLoader(small_text, seq_len=32, batch_size=4, accum_steps=2, seed=1)
    torch.testing.assert_close(a.get_batch("train", 7, 1), b.get_batch("train", 7, 1))
    assert not torch.equal(a.get_batch("train", 7, 1)[0], a.get_batch("train", 8, 1)[0])
    assert not torch.equal(a.get_batch("train", 7, 0)[0], a.get_batch("train", 7, 1)[0])
    other_seed = TextLoader(small_text, seq_len=32, batch_size=4, accum_steps=2, seed=2)
    assert not torch.equal(a.get_batch("train", 7, 1)[0], other_seed.get_batch("train", 7, 1)[0])


@pytest.mark.parametrize("split", ["train", "val"])
def test_the_global_batch_is_the_same_however_it_is_split(small_text, split):
    whole = TextLoader(small_text, seq_len=16, batch_size=8, accum_steps=1).get_batch(split, 3, 0)[0]
    # 2 processes x 2 micro-steps x 2 rows: each (micro-step, rank) gets its own rows of the same 8
    parts = {}
    for rank in range(2):
        loader = TextLoader(small_text, seq_len=16, batch_size=2, accum_steps=2, rank=rank, world_size=2)
        for micro_step in range(2):
            parts[batch_rows(micro_step, rank, 2, 2).start] = loader.get_batch(split, 3, micro_step)[0]
    torch.testing.assert_close(torch.cat([parts[start] for start in sorted(parts)]), whole)


def test_batch_rows_partition_the_global_batch():
    rows = [r for m in range(3) for rank in range(4) for r in range(*batch_rows(m, rank, 5, 4).indices(60))]
    assert sorted(rows) == list(range(60))


@pytest.mark.parametrize(
    "content, message",
    [(None, "does not exist"), (b"", "is empty"), (b"  \n", "is empty"), (b"caf\xe9 latin-1", "not UTF-8")],
)
def test_unusable_dataset_files_are_named(tmp_path, content, message):
    path = tmp_path / "data.txt"
    if content is not None:
        path.write_bytes(content)
    with pytest.raises(DataError, match=message):
        load_text_tokens(str(path))


def test_a_text_shorter_than_one_sequence_is_rejected(tmp_path):
    path = tmp_path / "short.txt"
    path.write_text("To be, or not to be, that is the question. " * 5)
    with pytest.raises(DataError, match="shorter than one sequence"):
        TextLoader(str(path), seq_len=64, batch_size=1, accum_steps=1)

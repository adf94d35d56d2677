import json
import os

import numpy as np
import pytest
import torch

import data
import measure
from conftest import SHARED
from data import AlpacaLoader, TextLoader, batch_rows, fitting_length, load_text_tokens
from files import DataError
from tokenizer import EOT_TOKEN, alpaca_prompt, chat_tokens, get_tokenizer


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
    x, y, positions = TextLoader(small_text, seq_len=32, batch_size=4, accum_steps=1).get_batch("train", 0, 0)
    assert positions is None  # each row one window from position 0
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


def test_a_text_shorter_than_one_sequence_is_rejected(tmp_path):
    path = tmp_path / "short.txt"
    path.write_text("To be, or not to be, that is the question. " * 5)
    with pytest.raises(DataError, match="shorter than one sequence"):
        TextLoader(str(path), seq_len=64, batch_size=1, accum_steps=1)



# ----------------------------------------------------------------------------------------------------------------
# Alpaca instruction data

GSM8K = os.path.join(SHARED, "data", "gsm8k_alpaca.json")


def records(n):
    """n small records with distinct outputs (so a row can be told by its response), every third with an input."""
    return [{"instruction": f"Add {i} and {i + 1}.", "input": "Show the sum." if i % 3 == 0 else "",
             "output": f"{i} + {i + 1} = {2 * i + 1}"} for i in range(n)]


def write_json(tmp_path, recs, name="data.json"):
    path = tmp_path / name
    path.write_text(json.dumps(recs, indent=2), encoding="utf-8")
    return str(path)


def responses(x, y, positions=None):
    """Each row's supervised tokens, decoded: the response the row trains on."""
    return [get_tokenizer().decode(row_y[row_y != -100].tolist()) for row_y in y.numpy()]


def global_responses(path, split, step, world_size=1, accum_steps=1, batch_size=4, **kw):
    """The rows of step's global batch in batch_rows order, gathered from every rank and micro-step."""
    rows = {}
    for rank in range(world_size):
        loader = AlpacaLoader(path, 128, batch_size, accum_steps, rank=rank, world_size=world_size, **kw)
        for m in range(accum_steps):
            rows[batch_rows(m, rank, batch_size, world_size).start] = responses(*loader.get_batch(split, step, m))
    return [r for start in sorted(rows) for r in rows[start]]


def test_labels_ignore_prompt_and_padding_and_supervise_response_and_eot(tmp_path):
    recs = records(6)
    recs[2]["output"] = "A much longer answer, so that the other rows of its micro-batch are padded. " * 3
    path = write_json(tmp_path, recs)
    loader = AlpacaLoader(path, 256, batch_size=5, accum_steps=1)
    tokenizer = get_tokenizer()
    x, y, _ = loader.get_batch("train", 0, 0)
    assert x.dtype == y.dtype == torch.int64 and x.shape == y.shape
    assert x.shape[1] == max(len(t) for t in loader.examples) - 1  # padded to the longest row, not to seq_len
    for row_x, row_y, i in zip(x.numpy(), y.numpy(), loader.global_batch("train", 0)):
        prompt = tokenizer.encode_ordinary(alpaca_prompt(recs[i]["instruction"], recs[i]["input"]))
        response = tokenizer.encode_ordinary(recs[i]["output"]) + [EOT_TOKEN]
        n = len(prompt) + len(response)
        np.testing.assert_array_equal(row_x[: n - 1], (prompt + response)[:-1])
        assert (row_x[n - 1 :] == EOT_TOKEN).all()
        assert (row_y[: len(prompt) - 1] == -100).all() and (row_y[n - 1 :] == -100).all()
        np.testing.assert_array_equal(row_y[len(prompt) - 1 : n - 1], response)
        assert tokenizer.decode(row_y[row_y != -100].tolist()) == recs[i]["output"] + "<|endoftext|>"


def test_long_responses_are_cut_after_the_whole_prompt_and_prompts_too_long_dropped(tmp_path):
    recs = records(4)
    recs[1]["output"] = "word " * 200
    recs[2]["instruction"] = "Repeat this: " + "word " * 100
    path = write_json(tmp_path, recs)
    tokenizer = get_tokenizer()
    long_prompt = len(tokenizer.encode_ordinary(alpaca_prompt(recs[2]["instruction"])))
    # a prompt of exactly seq_len tokens leaves room for one supervised token: kept, and cut
    loader = AlpacaLoader(path, long_prompt, batch_size=1, accum_steps=1)
    assert (loader.n_truncated, loader.n_dropped) == (2, 0) and len(loader.examples) == 4
    assert loader.n_targets[2] == 1
    # one token shorter, it leaves none: dropped
    loader = AlpacaLoader(path, long_prompt - 1, batch_size=1, accum_steps=1)
    assert (loader.n_truncated, loader.n_dropped) == (1, 1) and len(loader.examples) == 3
    cut = loader.examples[1]
    prompt = tokenizer.encode_ordinary(alpaca_prompt(recs[1]["instruction"]))
    assert len(cut) == long_prompt  # seq_len + 1
    np.testing.assert_array_equal(cut[: len(prompt)], prompt)
    assert "word word" in tokenizer.decode(cut[len(prompt) :].tolist())
    for split in ("train", "val"):
        for step in range(3):
            assert loader.get_batch(split, step, 0)[0].shape[1] <= long_prompt - 1


def test_json_and_jsonl_give_the_same_examples(tmp_path):
    recs = records(12)
    recs[3]["note"] = "other keys are ignored"
    del recs[4]["input"]  # input is optional
    as_json = AlpacaLoader(write_json(tmp_path, recs), 128, 2, 1)
    jsonl = tmp_path / "data.jsonl"
    jsonl.write_text("\n".join(json.dumps(r) for r in recs[:5]) + "\n\n" + "\n".join(json.dumps(r) for r in recs[5:]))
    as_jsonl = AlpacaLoader(str(jsonl), 128, 2, 1)
    for a, b in zip(as_json.examples, as_jsonl.examples, strict=True):
        np.testing.assert_array_equal(a, b)
    torch.testing.assert_close(as_json.get_batch("train", 3, 0), as_jsonl.get_batch("train", 3, 0))


@pytest.mark.parametrize("split", ["train", "val"])
def test_ranks_get_disjoint_examples_whose_union_is_the_single_process_global_batch(tmp_path, split):
    path = write_json(tmp_path, records(100))  # 95 train, 5 val examples
    whole = global_responses(path, split, 2, batch_size=8)
    assert global_responses(path, split, 2, world_size=2, accum_steps=2, batch_size=2) == whole
    if split == "train":  # (validation's 5 examples wrap around a global batch of 8: repeats are expected there)
        rows = global_responses(path, split, 2, world_size=2, batch_size=4)  # rank 0's 4 rows, then rank 1's
        by_rank = [set(rows[:4]), set(rows[4:])]
        assert not by_rank[0] & by_rank[1] and len(by_rank[0] | by_rank[1]) == 8


def test_batches_are_a_function_of_seed_split_step_and_micro_step(tmp_path):
    path = write_json(tmp_path, records(40))
    a, b = AlpacaLoader(path, 128, 4, 2, seed=1), AlpacaLoader(path, 128, 4, 2, seed=1)
    torch.testing.assert_close(a.get_batch("train", 7, 1), b.get_batch("train", 7, 1))
    torch.testing.assert_close(a.get_batch("val", 7, 1), b.get_batch("val", 7, 1))
    assert responses(*a.get_batch("train", 7, 1)) != responses(*a.get_batch("train", 8, 1))
    assert responses(*a.get_batch("train", 7, 0)) != responses(*a.get_batch("train", 7, 1))
    other_seed = AlpacaLoader(path, 128, 4, 2, seed=2)
    assert responses(*a.get_batch("train", 7, 1)) != responses(*other_seed.get_batch("train", 7, 1))


def test_each_epoch_visits_every_training_example_once_in_a_fresh_order(tmp_path):
    path = write_json(tmp_path, records(20))  # 19 train, 1 val: epochs straddle steps of 4 rows
    loader = AlpacaLoader(path, 128, 4, 1)
    n = len(loader.splits["train"])
    rows = [r for step in range(15) for r in responses(*loader.get_batch("train", step, 0))]  # 60 rows: 3 epochs
    train_outputs = [records(20)[i]["output"] + "<|endoftext|>" for i in loader.splits["train"]]
    epochs = [rows[e * n : (e + 1) * n] for e in range(3)]
    for epoch in epochs:
        assert sorted(epoch) == sorted(train_outputs)
    assert epochs[0] != epochs[1] != epochs[2]


def test_validation_is_a_fixed_5_percent_whatever_the_seed_read_in_order(tmp_path):
    path = write_json(tmp_path, records(60))
    a, b = AlpacaLoader(path, 128, 2, 1, seed=1), AlpacaLoader(path, 128, 2, 1, seed=2)
    assert len(a.splits["val"]) == 3 and len(a.splits["train"]) == 57
    assert not set(a.splits["val"]) & set(a.splits["train"])
    np.testing.assert_array_equal(a.splits["val"], b.splits["val"])
    val = [r for step in range(3) for r in responses(*a.get_batch("val", step, 0))]
    in_file_order = [records(60)[i]["output"] + "<|endoftext|>" for i in sorted(a.splits["val"])]
    assert val == in_file_order * 2  # sequential windows, wrapping


def supervised(loader, split, step, micro_step):
    return int((loader.get_batch(split, step, micro_step)[1] != -100).sum())


def test_targets_in_step_counts_the_supervised_tokens_of_the_whole_global_batch(tmp_path, small_text):
    recs = records(30)
    recs[5]["output"] = "word " * 300  # cut: its supervised tokens stop at seq_len
    path = write_json(tmp_path, recs)
    loaders = [AlpacaLoader(path, 128, 3, 2, rank=rank, world_size=2) for rank in range(2)]
    for split in ("train", "val"):
        for step in range(4):
            counted = sum(supervised(loader, split, step, m) for loader in loaders for m in range(2))
            assert loaders[0].targets_in_step(split, step) == loaders[1].targets_in_step(split, step) == counted
    text = TextLoader(small_text, seq_len=16, batch_size=2, accum_steps=3)
    assert text.targets_in_step("train", 0) == sum(supervised(text, "train", 0, m) for m in range(3))


def test_tokens_in_step_counts_the_examples_tokens_of_the_whole_global_batch_padding_not(tmp_path, small_text):
    recs = records(30)
    for i, record in enumerate(recs):
        record["output"] = " ".join([record["output"]] * (1 + i % 5))  # rows of many lengths: padding
    path = write_json(tmp_path, recs)
    padded = [AlpacaLoader(path, 128, 3, 2, rank=rank, world_size=2) for rank in range(2)]
    packed = [AlpacaLoader(path, 128, 3, 2, rank=rank, world_size=2, packing=True) for rank in range(2)]
    for step in range(3):
        batches = [loader.get_batch("train", step, m)[1] for loader in padded for m in range(2)]
        # a padded row is one example, which ends with its last label
        counted = sum(max(j for j, label in enumerate(row) if label != -100) + 1 for y in batches for row in y.tolist())
        assert counted < sum(y.numel() for y in batches)
        assert {loader.tokens_in_step("train", step) for loader in padded + packed} == {counted}
    text = TextLoader(small_text, seq_len=16, batch_size=2, accum_steps=3)
    assert text.tokens_in_step("train", 0) == 2 * 3 * 16


@pytest.mark.parametrize(
    "content, message",
    [('[{"instruction": "a", "output": "b"}]', "1 usable example .* at least 2 are needed"),
     (json.dumps([{"instruction": "word " * 100, "output": "b"}] * 2), "no room for a response: use a larger")],
)
def test_alpaca_data_with_too_few_usable_examples_is_named_with_its_fix(tmp_path, content, message):
    # (the records' own problems are records.py's: tests/test_records.py)
    path = tmp_path / "data.json"
    path.write_text(content, encoding="utf-8")
    with pytest.raises(DataError, match=message):
        AlpacaLoader(str(path), 64, 1, 1)


@pytest.mark.parametrize("jsonl", [False, True])
def test_alpaca_data_given_as_text_says_use_dataset_type_alpaca(tmp_path, jsonl):
    path = tmp_path / "data.json"
    recs = records(3)
    path.write_text("\n".join(map(json.dumps, recs)) if jsonl else json.dumps(recs, indent=2), encoding="utf-8")
    with pytest.raises(DataError, match="use --dataset_type alpaca"):
        TextLoader(str(path), seq_len=16, batch_size=1, accum_steps=1)


def test_text_starting_with_a_bracket_is_still_text(tmp_path):
    path = tmp_path / "code.txt"
    path.write_text('{"name": "not alpaca"}\n' + "[a list of words] " * 200, encoding="utf-8")
    assert TextLoader(str(path), seq_len=16, batch_size=1, accum_steps=1).get_batch("train", 0, 0)[0].shape == (1, 16)


@pytest.mark.skipif(not os.path.exists(GSM8K), reason="needs ../shared/data/gsm8k_alpaca.json")
def test_gsm8k_in_alpaca_format_loads_and_batches():
    loader = AlpacaLoader(GSM8K, 256, batch_size=8, accum_steps=2)
    n = len(loader.examples)
    assert loader.n_records == 7473 and n + loader.n_dropped == 7473
    assert len(loader.splits["val"]) == int(n * 0.05) and len(loader.splits["train"]) + len(loader.splits["val"]) == n
    x, y, _ = loader.get_batch("train", 0, 1)
    assert x.shape[0] == 8 and x.shape[1] <= 256 and (y != -100).sum() > 0


def test_a_text_too_big_for_memory_in_every_process_points_to_prepare_py(small_text, monkeypatch):
    size = os.path.getsize(small_text)
    # a machine with the memory for one process's tokenizing, but not for eight
    monkeypatch.setattr(measure, "physical_memory_bytes", lambda: size * measure.TOKENIZING_BYTES_PER_TEXT_BYTE * 8)
    assert len(load_text_tokens(small_text)) > 0
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "8")
    with pytest.raises(DataError, match=r"too big for text mode.*8 process.*prepare\.py .* --dataset_type shards"):
        load_text_tokens(small_text)


# ----------------------------------------------------------------------------------------------------------------
# Chat conversations, and packed batches.

def conversations(n, exchanges=2, system=True):
    """n conversations in OpenAI's format, each reply telling which conversation and exchange it is."""
    out = []
    for i in range(n):
        messages = [{"role": "system", "content": f"You are assistant {i}."}] if system else []
        for k in range(exchanges):
            messages += [{"role": "user", "content": f"Question {k} of chat {i}: what is {i} + {k}?"},
                         {"role": "assistant", "content": f"Chat {i}, answer {k}: {i + k}."}]
        out.append({"messages": messages})
    return out


def as_sharegpt(record):
    names = {"system": "system", "user": "human", "assistant": "gpt"}
    return {"conversations": [{"from": names[m["role"]], "value": m["content"]} for m in record["messages"]]}


def replies(record):
    return [m["content"] + "<|endoftext|>" for m in record["messages"] if m["role"] == "assistant"]


def labelled_runs(x, y):
    """The decoded runs of consecutive labels in each row: one per reply, as the loss sees them."""
    runs = []
    for row_y in y.numpy():
        labelled = np.flatnonzero(row_y != -100)
        for run in np.split(labelled, np.flatnonzero(np.diff(labelled) > 1) + 1):
            if len(run):
                runs.append(get_tokenizer().decode(row_y[run].tolist()))
    return runs


@pytest.mark.parametrize("exchanges", [1, 3])
def test_chat_labels_are_exactly_the_assistant_replies_with_their_end_markers(tmp_path, exchanges):
    recs = conversations(8, exchanges)
    loader = data.ChatLoader(write_json(tmp_path, recs), 256, batch_size=4, accum_steps=1)
    x, y, _ = loader.get_batch("train", 0, 0)
    ids = loader.global_batch("train", 0)[:4]
    # every reply, whole, ends at its <|endoftext|>; nothing of the system, user or template text is a label
    assert labelled_runs(x, y) == [reply for i in ids for reply in replies(recs[i])]
    assert loader.targets_in_step("train", 0) == int((y != -100).sum())


def test_openai_and_sharegpt_conversations_give_the_same_tokens(tmp_path):
    recs = conversations(6)
    openai = data.ChatLoader(write_json(tmp_path, recs, "a.json"), 256, batch_size=2, accum_steps=1)
    jsonl = tmp_path / "b.jsonl"
    jsonl.write_text("\n".join(json.dumps(as_sharegpt(r)) for r in recs) + "\n", encoding="utf-8")
    sharegpt = data.ChatLoader(str(jsonl), 256, batch_size=2, accum_steps=1)
    for a, b, la, lb in zip(openai.examples, sharegpt.examples, openai.labelled, sharegpt.labelled, strict=True):
        np.testing.assert_array_equal(a, b)
        np.testing.assert_array_equal(la, lb)


def test_fitting_length_keeps_an_example_whole_else_cuts_at_a_turn_end_else_within_the_first_reply():
    labelled = [False] * 4 + [True] * 3 + [False] * 3 + [True] * 3  # 13 tokens: two exchanges
    turn_ends = [7, 13]
    assert fitting_length(labelled, turn_ends, 12) == 13  # whole: x and y of a row span seq_len + 1 tokens
    assert fitting_length(labelled, turn_ends, 11) == 7  # after the last reply that fits
    assert fitting_length(labelled, turn_ends, 5) == 6  # within the first reply, which starts in time
    assert fitting_length(labelled, turn_ends, 3) is None  # no target fits: dropped


def test_a_conversation_too_long_is_cut_after_the_last_reply_that_fits(tmp_path):
    recs = conversations(4, exchanges=4)
    tokens, labelled, ends = chat_tokens(recs[0]["messages"])
    seq_len = ends[1] + 5  # two exchanges and a bit of the third fit
    loader = data.ChatLoader(write_json(tmp_path, recs), seq_len, batch_size=1, accum_steps=1)
    assert loader.n_truncated == 4 and loader.n_dropped == 0
    assert loader.examples[0].tolist() == tokens[: ends[1]]  # whole exchanges only
    # when not even the first reply ends in time, it is cut within: the prompt is kept whole
    first_reply = labelled.index(True)
    loader = data.ChatLoader(write_json(tmp_path, recs), first_reply + 2, batch_size=1, accum_steps=1)
    assert loader.examples[0].tolist() == tokens[: first_reply + 3] and loader.n_targets[0] == 3
    with pytest.raises(DataError, match="prompts longer than --seq_len"):  # no reply starts in time: all dropped
        data.ChatLoader(write_json(tmp_path, recs), first_reply - 1, batch_size=1, accum_steps=1)


@pytest.mark.parametrize(
    "content, message",
    [("", "is empty"),
     ('[{"messages": [{"role": "robot", "content": "x"}]}]', r'record 0 of \S+, messages\[0\] has "role" "robot"')],
)
def test_bad_chat_data_stops_the_chat_loader_in_one_line_with_nothing_written(tmp_path, content, message):
    path = tmp_path / "chat.json"
    path.write_text(content, encoding="utf-8")
    before = sorted(os.listdir(tmp_path))
    with pytest.raises(DataError, match=message) as error:
        data.ChatLoader(str(path), 64, batch_size=1, accum_steps=1)
    assert "\n" not in str(error.value)
    assert sorted(os.listdir(tmp_path)) == before  # no token cache or anything else


def test_chat_records_given_as_alpaca_or_text_name_the_dataset_type_they_need(tmp_path):
    path = write_json(tmp_path, conversations(3))
    with pytest.raises(DataError, match="holds chat records, not alpaca ones .*use --dataset_type chat"):
        AlpacaLoader(path, 64, batch_size=1, accum_steps=1)
    with pytest.raises(DataError, match="holds chat records .*use --dataset_type chat"):
        TextLoader(path, 16, batch_size=1, accum_steps=1)


@pytest.mark.parametrize("kind", ["alpaca", "chat"])
def test_a_packed_batch_holds_the_same_examples_back_to_back_with_positions_restarting(tmp_path, kind):
    recs = records(40) if kind == "alpaca" else conversations(40, exchanges=2)
    for i, record in enumerate(recs):  # examples of many lengths, as in real data
        if kind == "alpaca":
            record["output"] = " ".join([record["output"]] * (1 + i % 7))
        else:
            record["messages"] = record["messages"][: 3 + 2 * (i % 2)]
            record["messages"][-1]["content"] *= 1 + i % 7
    path = write_json(tmp_path, recs)
    padded = data.LOADERS[kind](path, 256, batch_size=8, accum_steps=2)
    packed = data.LOADERS[kind](path, 256, batch_size=8, accum_steps=2, packing=True)
    for step, micro_step in [(0, 0), (3, 1)]:
        x, y, none = padded.get_batch("train", step, micro_step)
        px, py, positions = packed.get_batch("train", step, micro_step)
        assert none is None and positions.shape == px.shape == py.shape and px.shape[1] <= 256
        assert px.numel() < x.numel() and px.shape[0] < x.shape[0]  # fewer rows, less padding
        # cut the packed rows at the examples' starts: the padded batch's examples, each with its labels
        found = []
        for row_x, row_y, row_positions in zip(px.tolist(), py.tolist(), positions.tolist()):
            starts = [j for j, p in enumerate(row_positions) if p == 0] + [len(row_x)]
            found += [(row_x[a:b], row_y[a:b]) for a, b in zip(starts, starts[1:])]
        for row_x, row_y in zip(x.tolist(), y.tolist()):
            n = max(j for j, label in enumerate(row_y) if label != -100) + 1  # an example ends with a label
            assert (row_x[:n], row_y[:n]) in found
        assert len(found) - len(x) <= len(px)  # the examples, and at most a padding segment a row
        assert int((py != -100).sum()) == int((y != -100).sum())

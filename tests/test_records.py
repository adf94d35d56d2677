import json
import os

import pytest

from files import DataError
from records import conversation, json_records_type, read_alpaca_records, read_json_records


def read_conversations(path):
    """The file's conversations, checked, as ChatLoader reads them."""
    return [conversation(record, place) for record, place in zip(*read_json_records(path, "chat"))]


GOOD = '{"instruction": "a", "output": "b"}'


@pytest.mark.parametrize(
    "content, message",
    [
        (None, "does not exist: pass an existing JSON or JSONL file"),
        ("To be, or not to be.\n{that is the question}\n", "neither JSON nor JSONL.*use --dataset_type text"),
        (f"[{GOOD},\n {GOOD}\n {GOOD}]", "not valid JSON .*line 3"),
        (f"{GOOD}\n\n{{instruction: c}}\n", "line 3 is not valid JSON"),
        ('{"instruction": "a", "output": "b",}\n' + GOOD, "line 1 is not valid JSON"),
        ("7", "holds no list of records"),
        ("[]", "holds no list of records"),
        (f"[{GOOD}, 7]", "record 1 of .* is not an object"),
        (f'[{GOOD}, {GOOD}, {{"instruction": "c"}}]', 'record 2 of .* has no "output"'),
        (f'{GOOD}\n{{"output": "c"}}', 'line 2 of .* has no "instruction"'),
        ('[{"instruction": "a", "output": 5}]', 'record 0 of .*: "output" is 5, not a string'),
        (f'[{GOOD}, {{"instruction": "a", "input": null, "output": "b"}}]', 'record 1 of .*: "input" is null'),
        ("[" * 100_000 + "]" * 100_000, r"not valid JSON \(nested too deeply"),  # deeper than Python's parser goes
        (f'{GOOD}\n{{"instruction": "a", "output": {"[" * 50_000 + "]" * 50_000}}}',
         r"line 2 is not valid JSON \(nested"),
    ],
)
def test_bad_alpaca_data_is_named_with_its_fix(tmp_path, content, message):
    path = tmp_path / "data.json"
    if content is not None:
        path.write_text(content, encoding="utf-8")
    with pytest.raises(DataError, match=message):
        read_alpaca_records(str(path))


def test_an_alpaca_file_with_a_utf8_byte_order_mark_is_read(tmp_path):
    path = tmp_path / "records.json"  # as Notepad and PowerShell write UTF-8
    path.write_bytes(b"\xef\xbb\xbf" + json.dumps([{"instruction": "Add 2 and 2.", "output": "4"}] * 40).encode())
    assert read_alpaca_records(str(path)) == [{"instruction": "Add 2 and 2.", "output": "4"}] * 40


CHAT = '{"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello."}]}'


@pytest.mark.parametrize(
    "content, message",
    [
        ("", "is empty"),
        (f'[{CHAT}, {{"messages": [{{"role": "robot", "content": "x"}}]}}]',
         r'record 1 of \S+, messages\[0\] has "role" "robot": the roles are system, user, assistant'),
        (f'{CHAT}\n\n{{"messages": [{{"role": "user", "content": "Hi"}}]}}',
         "line 3 of .* has no assistant message"),
        (f'[{CHAT}, {{"messages": [{{"role": "user", "content": ["a", "b"]}}]}}]',
         r'record 1 of .*messages\[0\]: "content" is \["a", "b"\], not text: make it a string'),
        (f'[{CHAT}, {{"conversations": [{{"from": "human", "value": null}}]}}]', '"value" is null, not text'),
        (f'[{CHAT}, {{"messages": [{{"role": "user"}}]}}]', r'record 1 of .*messages\[0\] has no "content"'),
        (f'[{CHAT}, {{"messages": [{{"role": "tool", "content": "42"}}]}}]', r'has "role" "tool": the roles are'),
        (f'[{CHAT}, {{"messages": [{{"role": "user", "content": [{{"type": "image_url", "image_url": "x"}}]}}]}}]',
         r'messages\[0\]: "content" is \[\{"type": "image_url".*not text'),
        ('[{"messages": [{"role": "system", "content": "a"}, {"role": "system", "content": "b"}, '
         '{"role": "user", "content": "c"}, {"role": "assistant", "content": "d"}]}]',
         r"messages\[1\] is a system message after the first"),
        ('[{"messages": [{"role": "user", "content": "a"}, {"role": "system", "content": "b"}, '
         '{"role": "assistant", "content": "d"}]}]', r"messages\[1\] is a system message after the first"),
        ('[{"instruction": "a", "output": "b"}]', "holds alpaca records, not chat ones .*use --dataset_type alpaca"),
        (f'[{CHAT}, {{"instruction": "a", "output": "b"}}]', "record 1 of .* is an Alpaca record.*alpaca"),
        (f'[{CHAT}, {{"text": "a"}}]', 'record 1 of .* has no "messages" list'),
        (f"[{CHAT}, 7]", "record 1 of .* is not an object"),
    ],
)
def test_bad_chat_data_is_one_line_naming_the_record_and_the_fix(tmp_path, content, message):
    path = tmp_path / "chat.json"
    path.write_text(content, encoding="utf-8")
    before = sorted(os.listdir(tmp_path))
    with pytest.raises(DataError, match=message) as error:
        read_conversations(str(path))
    assert "\n" not in str(error.value)
    assert sorted(os.listdir(tmp_path)) == before  # nothing written


def test_openai_and_sharegpt_records_read_as_the_same_conversations(tmp_path):
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"},
                {"role": "assistant", "content": "Hello."}]
    openai = tmp_path / "openai.json"
    openai.write_text(json.dumps([{"messages": messages}]), encoding="utf-8")
    sharegpt = tmp_path / "sharegpt.jsonl"
    names = {"system": "system", "user": "human", "assistant": "gpt"}
    sharegpt.write_text(json.dumps({"conversations": [{"from": names[m["role"]], "value": m["content"]}
                                                      for m in messages]}) + "\n", encoding="utf-8")
    assert read_conversations(str(openai)) == read_conversations(str(sharegpt)) == [messages]


def test_openai_content_as_text_parts_reads_as_the_joined_text(tmp_path):
    parts = [{"type": "text", "text": "Hello, "}, {"type": "text", "text": "world."}]
    record = {"messages": [{"role": "user", "content": parts}, {"role": "assistant", "content": "Hi."}]}
    assert conversation(record, "record 0") == [{"role": "user", "content": "Hello, world."},
                                                {"role": "assistant", "content": "Hi."}]


@pytest.mark.parametrize(
    "text, kind",
    [('[{"instruction": "a", "output": "b"}]', "alpaca"),
     ('{"instruction": "a", "output": "b"}\n{"instruction": "c", "output": "d"}\n', "alpaca"),
     ('  {"messages": [{"role": "user", "content": "Hi"}]}\n{"conversations": []}', "chat"),
     ('[{"conversations": [{"from": "human", "value": "Hi"}]}]', "chat"),
     ('{"name": "not alpaca"}\n[a list of words]', None), ("[a list of words]", None), ("To be, or not", None)],
)
def test_fine_tuning_records_are_told_from_text_by_their_first_record(text, kind):
    assert json_records_type(text) == kind

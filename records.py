"""
Users' records: Alpaca instructions and chat conversations, as a JSON list or JSONL (one record a line), read and
checked before any tokenizing. A problem is a DataError of one line naming the record ("line 12 of PATH", "record
11 of PATH") and the fix; records of the wrong kind name the --dataset_type they need.
"""

import json

from files import DataError, parse_json, read_text
from tokenizer import CHAT_ROLES

def first_json_record(text):
    """The first record of a JSON list or JSONL text (None when there is none), or a JSONDecodeError."""
    try:
        records = parse_json(text)
    except json.JSONDecodeError:
        records = parse_json(text.lstrip().split("\n", 1)[0])  # JSONL: one record per line
    return records[0] if isinstance(records, list) and records else records


def record_type(record):
    """"alpaca" or "chat" for a record of either kind of fine-tuning data, else None."""
    if not isinstance(record, dict):
        return None
    if "instruction" in record:
        return "alpaca"
    return "chat" if isinstance(record.get("messages", record.get("conversations")), list) else None


def json_records_type(text):
    """Whether a would-be text file is fine-tuning data: "alpaca", "chat" or None. Plain text rarely starts with
    [ or {, so asking costs nothing."""
    if text.lstrip()[:1] not in ("[", "{"):
        return None
    try:
        return record_type(first_json_record(text))
    except json.JSONDecodeError:
        return None


def read_json_records(path, kind):
    """The records of a JSON list or JSONL file (one object per line, blank lines allowed) of `kind` ("alpaca" or
    "chat"), and where each one is, for error messages: "line 12 of PATH" (JSONL) or "record 11 of PATH". A file
    whose first record is of the other kind is refused, naming the --dataset_type it needs."""
    example = {"alpaca": '{"instruction": "...", "input": "...", "output": "..."}',
               "chat": '{"messages": [{"role": "user", "content": "..."}, {"role": "assistant", "content": "..."}]}'}
    _, text = read_text(path, f"JSON or JSONL file of {kind} records")
    try:
        records = parse_json(text)
        records = [records] if isinstance(records, dict) else records  # JSONL with a single line
        places = [f"record {i} of {path}" for i in range(len(records))] if isinstance(records, list) else []
    except json.JSONDecodeError as e:
        if text.lstrip().startswith("["):  # a JSON list with a mistake in it: point at the mistake
            raise DataError(f"{path} is not valid JSON ({e.msg} at line {e.lineno}, column {e.colno}): fix the file")
        records, places = [], []
        for lineno, line in enumerate(text.split("\n"), 1):  # not splitlines(): JSON strings may hold U+2028
            if not line.strip():
                continue
            try:
                record = parse_json(line)
            except json.JSONDecodeError as e:
                if records or line.lstrip().startswith("{"):
                    raise DataError(f"{path} line {lineno} is not valid JSON ({e.msg}): fix or remove that line")
                record = None
            if not records and not isinstance(record, dict):
                raise DataError(f"{path} is neither JSON nor JSONL: {kind} data is a JSON list of records or one "
                                f"JSON record per line; if it is plain text, use --dataset_type text")
            records.append(record)
            places.append(f"line {lineno} of {path}")
    if not isinstance(records, list) or not records:
        raise DataError(f"{path} holds no list of records: {kind} data is a non-empty JSON list of objects like "
                        f"{example[kind]}")
    other = record_type(records[0])
    if other not in (None, kind):
        raise DataError(f"{path} holds {other} records, not {kind} ones (its first is {json.dumps(records[0])[:60]}"
                        f"...): use --dataset_type {other}")
    for record, place in zip(records, places):
        if not isinstance(record, dict):
            raise DataError(f"{place} is not an object: each record is {example[kind]}")
    return records, places


def read_alpaca_records(path):
    """The file's Alpaca records, checked."""
    records, places = read_json_records(path, "alpaca")
    for record, place in zip(records, places):
        for key in ("instruction", "input", "output"):
            if key not in record and key != "input":
                raise DataError(f'{place} has no "{key}": every record needs "instruction" and "output" strings '
                                f'("input" is optional)')
            if key in record and not isinstance(record[key], str):
                raise DataError(f'{place}: "{key}" is {json.dumps(record[key])[:40]}, not a string: make it a string')
    return records


CHAT_FORMATS = {"messages": ("role", "content"), "conversations": ("from", "value")}


def message_text(content):
    """A message's text: a string, or OpenAI's list of text parts ([{"type": "text", "text": ...}], joined as the
    exported chat template joins them); None for anything else (an image, null)."""
    if isinstance(content, str):
        return content
    if isinstance(content, list) and all(isinstance(part, dict) and part.get("type") == "text"
                                         and isinstance(part.get("text"), str) for part in content):
        return "".join(part["text"] for part in content)
    return None


def conversation(record, place):
    """A chat record (either format) as [{"role", "content"}], checked: known roles, text contents, at most one
    system message and only first, at least one assistant message."""
    key = next((key for key in CHAT_FORMATS if isinstance(record.get(key), list)), None)
    if key is None:
        if "instruction" in record:
            raise DataError(f"{place} is an Alpaca record, not a conversation: use --dataset_type alpaca")
        raise DataError(f'{place} has no "messages" list (OpenAI\'s format) or "conversations" list (ShareGPT\'s): '
                        f"each record is one of them")
    role_key, content_key = CHAT_FORMATS[key]
    messages = []
    for k, message in enumerate(record[key]):
        where = f'{place}, {key}[{k}]'
        if not isinstance(message, dict):
            raise DataError(f'{where} is not an object: each message is {{"{role_key}": ..., "{content_key}": ...}}')
        role = CHAT_ROLES.get(message.get(role_key))
        if role is None:
            raise DataError(f'{where} has "{role_key}" {json.dumps(message.get(role_key))[:40]}: the roles are '
                            f'{", ".join(CHAT_ROLES)}')
        if content_key not in message:
            raise DataError(f'{where} has no "{content_key}": each message is {{"{role_key}": ..., '
                            f'"{content_key}": ...}}')
        content = message_text(message[content_key])
        if content is None:
            raise DataError(f'{where}: "{content_key}" is {json.dumps(message[content_key])[:40]}, not text: make it a '
                            f'string (or a list of {{"type": "text", "text": ...}} parts)')
        if role == "system" and k > 0:
            raise DataError(f"{where} is a system message after the first message: a conversation has at most one, "
                            f"first")
        messages.append({"role": role, "content": content})
    if not any(message["role"] == "assistant" for message in messages):
        raise DataError(f"{place} has no assistant message: a conversation needs at least one reply to learn from")
    return messages

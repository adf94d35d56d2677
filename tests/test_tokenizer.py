import ast
import os
import sys

import pytest

from conftest import REPO, SHARED
from tokenizer import EOT_TOKEN, alpaca_prompt, chat_tokens, get_tokenizer

TIKTOKEN_CACHE = os.path.join(SHARED, "tiktoken_cache")


def test_tokenizer_works_offline_with_gpt2_ids():
    tokenizer = get_tokenizer()
    assert tokenizer.n_vocab == 50257
    assert tokenizer.encode_ordinary("Hello world") == [15496, 995]
    assert tokenizer.encode("<|endoftext|>", allowed_special="all") == [EOT_TOKEN]


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


def test_the_tokenizer_imports_no_project_module():
    # model.py takes IGNORE_INDEX from here: anything of the project imported here would be imported by the model too
    tree = ast.parse(open(os.path.join(REPO, "tokenizer.py"), encoding="utf-8").read())
    imported = {alias.name for node in ast.walk(tree) if isinstance(node, ast.Import) for alias in node.names}
    imported |= {node.module for node in ast.walk(tree) if isinstance(node, ast.ImportFrom)}
    top_level = {name.split(".")[0] for name in imported}
    assert top_level <= set(sys.stdlib_module_names) | {"numpy", "tiktoken", "tiktoken_ext"}, imported


def test_alpaca_prompt_is_stanfords_template_then_a_newline():
    assert alpaca_prompt("Add 2 and 3.") == (
        "Below is an instruction that describes a task. Write a response that appropriately completes the request."
        "\n\n### Instruction:\nAdd 2 and 3.\n\n### Response:\n"
    )
    assert alpaca_prompt("Translate to French.", "Good {morning}") == (
        "Below is an instruction that describes a task, paired with an input that provides further context. Write a "
        "response that appropriately completes the request.\n\n### Instruction:\nTranslate to French.\n\n### Input:\n"
        "Good {morning}\n\n### Response:\n"
    )


def test_the_tokens_before_a_reply_are_a_prefix_of_the_conversation_with_it():
    # what sample.py --chat feeds the model before a reply is what the model was trained on up to that reply,
    # whatever whitespace or punctuation the messages start and end with
    messages = [{"role": "system", "content": " Be brief.\n"}, {"role": "user", "content": "\n\n  ¿Qué tal? 東京"},
                {"role": "assistant", "content": "\n:) Bien, gracias.  "}, {"role": "user", "content": "::x "},
                {"role": "assistant", "content": "   !!yes"}]
    whole, labelled, _ = chat_tokens(messages)
    for k in (2, 4):
        prompt, prompt_labelled, _ = chat_tokens(messages[:k], add_generation_prompt=True)
        assert whole[: len(prompt)] == prompt and prompt_labelled == labelled[: len(prompt)]
        assert labelled[len(prompt)] and not labelled[len(prompt) - 1]  # the reply starts right after


def test_chat_tokens_label_each_reply_and_its_end_marker_and_a_turn_ends_after_each():
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi!"},
                {"role": "assistant", "content": "Hello."}, {"role": "user", "content": "How are you?"},
                {"role": "assistant", "content": "Fine, thanks."}]
    tokens, labelled, turn_ends = chat_tokens(messages)
    tokenizer = get_tokenizer()
    assert tokenizer.decode(tokens) == ("<|endoftext|>System:\nBe brief.\n\nUser:\nHi!\n\nAssistant:\nHello."
                                        "<|endoftext|>User:\nHow are you?\n\nAssistant:\nFine, thanks.<|endoftext|>")
    starts = [j for j in range(len(tokens)) if labelled[j] and not (j and labelled[j - 1])]
    ends = [j + 1 for j in range(len(tokens)) if labelled[j] and not (j + 1 < len(tokens) and labelled[j + 1])]
    assert [tokenizer.decode(tokens[a:b]) for a, b in zip(starts, ends)] == ["Hello.<|endoftext|>",
                                                                            "Fine, thanks.<|endoftext|>"]
    assert turn_ends == ends


def test_a_message_that_spells_endoftext_is_text_never_the_control_token():
    # in a user's message it would start a conversation; in a reply it would be a trained end in mid-reply
    for role in ("system", "user", "assistant"):
        spelled = [{"role": role, "content": "a <|endoftext|> b"}]
        plain = [{"role": role, "content": "a XYZ b"}]
        tokens, labelled, turn_ends = chat_tokens(spelled)
        assert tokens.count(EOT_TOKEN) == chat_tokens(plain)[0].count(EOT_TOKEN)  # the template's own only
        assert "a <|endoftext|> b" in get_tokenizer().decode(tokens)  # its 13 characters, as text tokens
        assert len(turn_ends) == (role == "assistant")

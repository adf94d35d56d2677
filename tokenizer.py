"""GPT-2's tokenizer, its special ids, and the two prompt templates (Alpaca, chat) rendered alike in training,
sampling, export and the lm-eval harness. Imports no project module: model.py takes IGNORE_INDEX from here."""

import base64
import functools
import json
import os

import numpy as np

# GPT-2's 50,256 BPE ranks, shipped in the repo so that nothing is downloaded at run time
TOKENIZER_FILE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "gpt2.tiktoken")
EOT_TOKEN = 50256  # <|endoftext|>
IGNORE_INDEX = -100  # the label the loss skips (F.cross_entropy's default ignore_index): prompt tokens and padding


@functools.lru_cache(maxsize=None)
def get_tokenizer():
    """GPT-2's tokenizer, built offline from the file in the repo; its ids are those of tiktoken's "gpt2"."""
    import tiktoken
    from tiktoken_ext.openai_public import r50k_pat_str  # GPT-2's pre-tokenization regex, as tiktoken spells it

    with open(TOKENIZER_FILE, "rb") as f:
        ranks = {base64.b64decode(token): int(rank) for token, rank in (line.split() for line in f if line.strip())}
    return tiktoken.Encoding(name="gpt2", pat_str=r50k_pat_str, mergeable_ranks=ranks,
                             special_tokens={"<|endoftext|>": EOT_TOKEN}, explicit_n_vocab=EOT_TOKEN + 1)


# ----------------------------------------------------------------------------------------------------------------
# Alpaca: Stanford Alpaca's PROMPT_DICT (tatsu-lab/stanford_alpaca, train.py), word for word.

ALPACA_PROMPT_INPUT = ("Below is an instruction that describes a task, paired with an input that provides further "
                       "context. Write a response that appropriately completes the request.\n\n"
                       "### Instruction:\n{instruction}\n\n### Input:\n{input}\n\n### Response:")
ALPACA_PROMPT_NO_INPUT = ("Below is an instruction that describes a task. Write a response that appropriately "
                          "completes the request.\n\n### Instruction:\n{instruction}\n\n### Response:")


def alpaca_prompt(instruction, input=""):
    """The text the model is conditioned on, in training and in sampling alike: Stanford's template, then "\n".
    Stanford ends the prompt at "### Response:" and lets the output follow directly; ending it with the newline
    instead means the response always starts after the same "\n" token, and sampling never has to guess one."""
    template = ALPACA_PROMPT_INPUT if input else ALPACA_PROMPT_NO_INPUT
    return template.format(instruction=instruction, input=input) + "\n"


# ----------------------------------------------------------------------------------------------------------------
# Chat: conversations of system, user and assistant messages.
#
# The template is plain text in GPT-2's own vocabulary (no new tokens: OpenAI's weights fine-tune on it as they are,
# and an exported model is a plain GPT-2), each message a header line and its text, <|endoftext|> starting the
# conversation and ending each reply, where generation then stops:
#
#   <|endoftext|>System:\nBe brief.\n\nUser:\nHi!\n\nAssistant:\nHello.<|endoftext|>User:\n...
#
# Each message's text is stripped of the whitespace around it, as most chat templates do: the newline ending a header
# is then always a token of its own, so the tokens of a conversation up to "Assistant:\n" (what sample.py feeds the
# model before a reply) are exactly the first tokens of the conversation with the reply. The one definition:
# chat_pieces renders it, chat_template writes it as Jinja for export.py; a test holds the two to the same tokens.

# A message's text is text: one that spells <|endoftext|> gets the tokens of those 13 characters, never the control
# token, which only the template's own <|endoftext|> are (the start, each reply's end).
CONTROL = CHAT_START = "<|endoftext|>"
CHAT_HEADERS = {"system": "System:\n", "user": "User:\n", "assistant": "Assistant:\n"}
CHAT_ENDS = {"system": "\n\n", "user": "\n\n", "assistant": CONTROL}
# OpenAI's roles and ShareGPT's, as the template names them; others ("tool", "function") are refused, never dropped
CHAT_ROLES = {"system": "system", "user": "user", "assistant": "assistant", "human": "user", "gpt": "assistant"}


def chat_pieces(messages, add_generation_prompt=False):
    """A conversation ([{"role", "content"}] with roles system, user, assistant) as the template's text, in pieces
    (text, is_reply, is_control): is_reply marks each reply's text and the <|endoftext|> ending it (the tokens
    trained on), is_control the template's <|endoftext|>. add_generation_prompt asks for the next reply."""
    pieces = [(CHAT_START, False, True)]
    for message in messages:
        role = message["role"]
        reply = role == "assistant"
        pieces.append((CHAT_HEADERS[role], False, False))
        pieces.append((message["content"].strip(), reply, False))
        pieces.append((CHAT_ENDS[role], reply, CHAT_ENDS[role] == CONTROL))
    if add_generation_prompt:
        pieces.append((CHAT_HEADERS["assistant"], False, False))
    return pieces


def chat_tokens(messages, add_generation_prompt=False):
    """(tokens, labelled, turn_ends) of a conversation: its template text's tokens, whether each is part of a reply,
    and the token counts at which a reply ends (where a conversation may be cut). The text between two control
    tokens is tokenized whole, as a Hugging Face tokenizer splits its input at special tokens and tokenizes the rest."""
    tokenizer = get_tokenizer()
    pieces = chat_pieces(messages, add_generation_prompt)
    tokens, run = [], ""
    for text, _, control in pieces:
        if control:
            tokens += tokenizer.encode_ordinary(run) + [EOT_TOKEN]
            run = ""
        else:
            run += text
    tokens += tokenizer.encode_ordinary(run)
    # the character each token starts at, against the pieces' spans (a spelled <|endoftext|> has the same characters)
    _, starts = tokenizer.decode_with_offsets(tokens)
    bounds = np.cumsum([0] + [len(text) for text, _, _ in pieces])
    piece_of = np.searchsorted(bounds, starts, side="right") - 1
    labelled = np.array([reply for _, reply, _ in pieces])[piece_of]
    turn_ends = [int(np.searchsorted(starts, bounds[k + 1])) for k, (text, reply, _) in enumerate(pieces)
                 if reply and text == CHAT_ENDS["assistant"]]
    return tokens, labelled.tolist(), turn_ends


def chat_template():
    """The template as Jinja, for a Hugging Face tokenizer's chat_template: apply_chat_template(messages) gives the
    tokens chat_tokens gives, for OpenAI's messages and ShareGPT's alike (text given as a list of text parts is
    joined), or raises (raise_exception) where the trainer would refuse the conversation or the tokens would differ:
    an unknown role (tool, function), a system message not first, content that is not text, a message spelling
    <|endoftext|> (transformers' tokenizer would make it the control token). Written from the constants above; every
    literal is a Jinja string expression, so the trim_blocks and lstrip_blocks options transformers sets cannot touch
    its newlines."""
    def literal(text):
        return "{{ " + json.dumps(text) + " }}"

    def fail(why):
        return "{{ raise_exception(" + json.dumps(why) + ") }}"

    roles = ", ".join(CHAT_HEADERS)
    return (
        literal(CHAT_START) + "{% for message in messages %}"
        "{% set role = message['role'] if message['role'] is defined else message['from'] %}"
        "{% set role = " + json.dumps(CHAT_ROLES) + ".get(role, role) %}"
        "{% set content = message['content'] if message['content'] is defined else message['value'] %}"
        "{% if content is string %}{% set text = content %}"
        "{% elif content is iterable and content is not mapping %}{% set ns = namespace(text='') %}"
        "{% for part in content %}{% if part is mapping and part['type'] == 'text' and part['text'] is string %}"
        "{% set ns.text = ns.text + part['text'] %}"
        "{% else %}" + fail("a message holds a part that is not text: this model's chat template takes text only")
        + "{% endif %}{% endfor %}{% set text = ns.text %}"
        "{% else %}" + fail("a message has no text content: this model's chat template takes text only")
        + "{% endif %}"
        "{% if role not in " + json.dumps(list(CHAT_HEADERS)) + " %}"
        + fail(f"a message's role is not one of this model's chat template's ({roles}; ShareGPT's human, gpt): "
               f"tool and function messages are not supported") + "{% endif %}"
        "{% if role == 'system' and not loop.first %}"
        + fail("a system message comes after the first message: a conversation has at most one, first")
        + "{% endif %}"
        "{% if " + json.dumps(CONTROL) + " in text %}"
        + fail(f"a message spells {CONTROL}, which the trainer reads as text and transformers' tokenizer as the "
               f"control token: remove it") + "{% endif %}"
        + "".join(f"{{% if role == '{role}' %}}{literal(CHAT_HEADERS[role])}{{{{ text | trim }}}}"
                  f"{literal(CHAT_ENDS[role])}{{% endif %}}" for role in CHAT_HEADERS)
        + "{% endfor %}{% if add_generation_prompt %}" + literal(CHAT_HEADERS["assistant"]) + "{% endif %}")

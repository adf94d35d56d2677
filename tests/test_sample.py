import argparse
import io
import sys

import pytest
import torch

import sample
from checkpoint import save_checkpoint
from model import GPT, GPTConfig
from tokenizer import EOT_TOKEN, alpaca_prompt, chat_tokens, get_tokenizer


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    """A small random model saved as train.py saves it: sampling needs weights, not good ones."""
    torch.manual_seed(0)
    model = GPT(GPTConfig(n_layer=2, n_head=2, n_embd=32, block_size=32))
    path = tmp_path_factory.mktemp("run") / "ckpt.pt"
    save_checkpoint(str(path), model, torch.optim.AdamW(model.parameters()), torch.amp.GradScaler("cpu", enabled=False),
                    1, argparse.Namespace())
    return model.eval(), str(path)


def run_sample(capsys, *flags):
    sample.main(["--device", "cpu", "--dtype", "float32", *flags])
    return capsys.readouterr().out


def test_greedy_sample_prints_the_prompt_and_generate_s_tokens_up_to_endoftext(checkpoint, capsys):
    model, path = checkpoint
    out = run_sample(capsys, "--init_from", path, "--prompt", "ROMEO:", "--temperature", "0",
                     "--max_new_tokens", "60")  # past the context of 32: the window slides
    tokenizer = get_tokenizer()
    prompt = tokenizer.encode_ordinary("ROMEO:")
    expected = model.generate(torch.tensor([prompt]), 60, temperature=0, stop_token=EOT_TOKEN)[0, len(prompt):]
    expected = expected.tolist()
    expected = expected[: expected.index(EOT_TOKEN)] if EOT_TOKEN in expected else expected
    assert out == "ROMEO:" + tokenizer.decode(expected) + "\n"


def test_samples_are_reproducible_with_a_seed_and_differ_between_seeds(checkpoint, capsys):
    _, path = checkpoint
    flags = ["--init_from", path, "--max_new_tokens", "20", "--num_samples", "2", "--top_p", "0.95"]
    first = run_sample(capsys, *flags, "--seed", "1")
    assert first == run_sample(capsys, *flags, "--seed", "1")
    assert first != run_sample(capsys, *flags, "--seed", "2")
    assert first.count("-" * 80) == 1  # two samples, one separator


def test_the_prompt_can_come_from_a_file_or_stdin(checkpoint, capsys, tmp_path, monkeypatch):
    _, path = checkpoint
    flags = ["--init_from", path, "--temperature", "0", "--max_new_tokens", "10"]
    direct = run_sample(capsys, *flags, "--prompt", "JULIET:\nO Romeo")
    (tmp_path / "prompt.txt").write_text("JULIET:\nO Romeo", encoding="utf-8")
    assert run_sample(capsys, *flags, "--prompt", f"FILE:{tmp_path / 'prompt.txt'}") == direct
    monkeypatch.setattr(sys, "stdin", io.StringIO("JULIET:\nO Romeo"))
    assert run_sample(capsys, *flags, "--prompt", "-") == direct


@pytest.mark.parametrize("flags, message", [
    (["--init_from", "/nonexistent/run"], "no such file or directory"),
    (["--prompt", "FILE:/nonexistent/prompt.txt"], "cannot read the prompt file"),
    (["--top_p", "0"], "argument --top_p: must be a number in (0, 1], got 0"),
    (["--temperature", "nan"], "argument --temperature: must be a number, 0 or more, got nan"),
    (["--instruction", "Add.", "--prompt", "x"], "exclude each other"),
])
def test_bad_options_get_one_line_without_a_traceback(checkpoint, flags, message, capsys):
    _, path = checkpoint
    with pytest.raises(SystemExit) as exit_info:  # (any other exception, a traceback, fails the test)
        sample.main(["--init_from", path, "--device", "cpu", *flags])
    err = capsys.readouterr().err
    assert exit_info.value.code == 2
    assert len(err.strip().splitlines()) == 1 and message in err, err


def test_instruction_is_wrapped_in_the_alpaca_template_and_only_the_response_printed(checkpoint, capsys):
    _, path = checkpoint
    # the template alone is ~40 tokens: a model with room for it
    big = GPT(GPTConfig(n_layer=1, n_head=2, n_embd=16, block_size=128)).eval()
    save_checkpoint(path + ".big", big, torch.optim.AdamW(big.parameters()), torch.amp.GradScaler("cpu", enabled=False),
                    1, argparse.Namespace())
    out = run_sample(capsys, "--init_from", path + ".big", "--instruction", "Add the numbers.", "--input", "2, 3",
                     "--temperature", "0", "--max_new_tokens", "12")
    tokenizer = get_tokenizer()
    prompt = tokenizer.encode_ordinary(alpaca_prompt("Add the numbers.", "2, 3"))
    expected = big.generate(torch.tensor([prompt]), 12, temperature=0, stop_token=EOT_TOKEN)[0, len(prompt):].tolist()
    expected = expected[: expected.index(EOT_TOKEN)] if EOT_TOKEN in expected else expected
    assert out == tokenizer.decode(expected) + "\n"
    assert "### Response:" not in out


# ------------------------------------------------------------------------------------------------------------------
# --chat

SYSTEM = "Be brief."


def chat_model(block_size, eot_bias):
    """A random nano model whose greedy replies vary: its matrices scaled up, so that its tokens depend on the context
    (at GPT-2's initial scale it repeats its last token), and its output bias towards <|endoftext|>, so that some
    replies end there and others are cut by --max_new_tokens (the tests check that both happen)."""
    torch.manual_seed(0)
    model = GPT(GPTConfig(n_layer=2, n_head=2, n_embd=32, block_size=block_size)).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() == 2 and "wte" not in name:
                p.mul_(5)
        eot = model.transformer.wte.weight[EOT_TOKEN]
        model.transformer.ln_f.bias += eot_bias * eot / eot.norm()
    return model


def run_chat(monkeypatch, capsys, model, lines, *flags):
    """sample.py --chat on model, with lines through stdin as from a pipe: (stdout, stderr, and each of the model's
    forward calls as (the tokens fed, the cache, its length before))."""
    calls = []
    hook = model.register_forward_pre_hook(
        lambda _, args, kwargs: calls.append((args[0][0].tolist(), kwargs["cache"], kwargs["cache"].length)),
        with_kwargs=True)
    monkeypatch.setattr(sample, "load_model", lambda _: model)
    monkeypatch.setattr(sample, "trained_on", lambda _: "chat")
    stdin = lines if isinstance(lines, io.IOBase) else io.StringIO("".join(line + "\n" for line in lines))
    monkeypatch.setattr(sys, "stdin", stdin)
    try:
        sample.main(["--device", "cpu", "--dtype", "float32", "--chat", "--temperature", "0", *flags])
    finally:
        hook.remove()
    captured = capsys.readouterr()
    return captured.out, captured.err, calls


def greedy_reply(model, context, max_new_tokens):
    """The reply to context (token ids) as generate gives it without any cache: up to <|endoftext|>."""
    out = model.generate(torch.tensor([context]), max_new_tokens, temperature=0, stop_token=EOT_TOKEN,
                         use_cache=False)[0, len(context):].tolist()
    return out[: out.index(EOT_TOKEN)] if EOT_TOKEN in out else out


def turn_contexts(calls):
    """Each turn's whole context, from run_chat's forward calls: what the cache held before the turn's prefill (the
    one call of more than one token), then the prefill."""
    contexts, held = [], []
    for tokens, _, length in calls:
        held = held[:length] + tokens
        if len(tokens) > 1:
            contexts.append(held)
    return contexts


def test_a_turn_s_new_tokens_are_the_slice_of_the_whole_conversation_s_chat_tokens():
    chat = sample.Chat(GPT(GPTConfig(n_layer=1, n_head=1, n_embd=8, block_size=8)), SYSTEM)
    exchanges = [("  Hi!\n", " Hello there.  "), ("What's 2+2?\n\n", "4.\n"), ("naïve café 日本語 🤖", "¡Sí!")]
    tokenizer = get_tokenizer()
    for system in [[{"role": "system", "content": SYSTEM}], []]:
        chat.system = system
        messages = list(system)
        for k, (user, reply) in enumerate(exchanges):
            # the first turn brings the conversation's start and the system message along
            before = chat_tokens(messages)[0] if k > 0 else []
            messages.append({"role": "user", "content": user})
            asked = chat_tokens(messages, add_generation_prompt=True)[0]
            assert chat.turn_tokens(user, first=k == 0) == asked[len(before) :]
            messages.append({"role": "assistant", "content": reply})
        # the conversation kept (what the cache is filled again from) is chat_tokens' whole conversation
        chat.exchanges = [(user, tokenizer.encode_ordinary(reply.strip()) + [EOT_TOKEN]) for user, reply in exchanges]
        assert chat.kept_tokens() == chat_tokens(messages)[0]


def test_chat_through_a_pipe_answers_each_line_keeping_one_cache_that_is_fed_each_token_once(monkeypatch, capsys):
    model = chat_model(block_size=128, eot_bias=6)
    lines = ["Hi!", "How are you?", "Bye.", "What is 2+2?"]
    out, err, calls = run_chat(monkeypatch, capsys, model, ["", *lines[:2], "  ", *lines[2:]], "--system", SYSTEM,
                               "--max_new_tokens", "8")
    # what each turn gives when the whole conversation so far is fed anew, without a cache
    conversation, replies = [], []
    for k, line in enumerate(lines):
        conversation += sample.Chat(model, SYSTEM).turn_tokens(line, first=k == 0)
        replies.append(greedy_reply(model, conversation, 8))
        conversation += replies[-1] + [EOT_TOKEN]
    assert any(len(reply) == 8 for reply in replies) and any(len(reply) < 8 for reply in replies)  # cut and ended
    tokenizer = get_tokenizer()
    assert out == "".join(tokenizer.decode(reply) + "\n" for reply in replies) and err == ""  # blank lines skipped
    # one cache all along, fed the conversation's tokens in order, each once: a turn prefills only its new tokens
    # (the user's turn, after the last reply's final token, which generate_stream yields without feeding)
    assert len({id(cache) for _, cache, _ in calls}) == 1
    fed = [token for tokens, _, _ in calls for token in tokens]
    assert fed == conversation[: len(fed)] and len(conversation) - 2 <= len(fed) < len(conversation)
    prefills = [len(tokens) for tokens, _, _ in calls if len(tokens) > 1]
    assert len(prefills) == len(lines) and max(prefills[1:]) < prefills[0]  # the first has the system message


def test_a_full_context_drops_the_oldest_exchanges_keeps_the_system_message_says_so_and_answers_on(monkeypatch,
                                                                                                     capsys):
    model = chat_model(block_size=64, eot_bias=12)
    lines = ["Hi!", "How are you?", "Bye.", "What is 2+2?", "Tell me more, please.", "Thanks!"]
    out, err, calls = run_chat(monkeypatch, capsys, model, lines, "--system", SYSTEM, "--max_new_tokens", "12")
    contexts = turn_contexts(calls)
    assert len(contexts) == len(lines)
    # the turns whose prefill starts a new cache, the first turn's aside: where the cache was filled again
    rebuilt = [k for k, (tokens, _, length) in enumerate(c for c in calls if len(c[0]) > 1) if length == 0 and k > 0]
    assert rebuilt and err.count("\n") == len(rebuilt)  # one line each time
    assert all(line.startswith("note: the conversation outgrew the model's context (64 tokens): dropped the oldest")
               for line in err.splitlines())
    chat = sample.Chat(model, SYSTEM)
    for k in rebuilt:
        # the system message with the first exchange kept (a later one than the conversation's first), then this turn
        kept = [j for j in range(1, k + 1) if contexts[k][: len(chat.turn_tokens(lines[j], first=True))]
                == chat.turn_tokens(lines[j], first=True)]
        turn = chat.turn_tokens(lines[k], first=kept == [k])
        assert kept and contexts[k][-len(turn) :] == turn
    replies = [greedy_reply(model, context, 12) for context in contexts]
    assert any(len(reply) == 12 for reply in replies) and any(len(reply) < 12 for reply in replies)
    assert out == "".join(get_tokenizer().decode(reply) + "\n" for reply in replies)


def test_a_message_too_long_for_the_context_cuts_the_reply_or_without_room_is_one_error_and_an_empty_reply(
        monkeypatch, capsys):
    model = chat_model(block_size=64, eot_bias=12)
    lines = ["Hi!", "go " * 60, "Bye.", "go " * 40]
    out, err, calls = run_chat(monkeypatch, capsys, model, lines, "--system", SYSTEM, "--max_new_tokens", "12")
    contexts = turn_contexts(calls)
    assert len(contexts) == 3  # the second message is not answered
    # the conversation goes on after the error as it was: the third turn continues the first's cache
    prefills = [(cache, length) for tokens, cache, length in calls if len(tokens) > 1]
    assert prefills[1][0] is prefills[0][0] and prefills[1][1] > len(contexts[0])
    turn = sample.Chat(model, SYSTEM).turn_tokens(lines[2], first=False)
    assert contexts[1][: len(contexts[0])] == contexts[0] and contexts[1][-len(turn) :] == turn
    # the fourth needs the whole context: both exchanges dropped, the system message kept, the reply cut short
    assert contexts[2] == sample.Chat(model, SYSTEM).turn_tokens(lines[3], first=True)
    room = 64 - len(contexts[2])
    assert 0 < room < 12
    too_long = len(sample.Chat(model, SYSTEM).turn_tokens(lines[1], first=True))
    assert err.splitlines() == [
        f"error: this message takes {too_long} tokens in the chat template (system message included) of the model's "
        f"context of 64: no room for a reply; not answered",
        "note: the conversation outgrew the model's context (64 tokens): dropped the oldest 2 exchange(s), kept 0 "
        "and the system message",
        f"note: this message leaves room for a reply of {room} tokens in the model's context of 64"]
    replies = [greedy_reply(model, context, n) for context, n in zip(contexts, [12, 12, room])]
    tokenizer = get_tokenizer()
    assert out.split("\n") == [tokenizer.decode(replies[0]), "", tokenizer.decode(replies[1]),
                               tokenizer.decode(replies[2]), ""]


def test_transformers_pipeline_given_chat_messages_answers_as_sample_chat_does(tmp_path, monkeypatch, capsys):
    """One turn each: given a conversation with replies, the pipeline tokenizes their text again, which a random
    model's tokens need not survive (sample.py keeps the tokens generated)."""
    transformers = pytest.importorskip("transformers")
    import export
    model = chat_model(block_size=64, eot_bias=12)
    save_checkpoint(str(tmp_path / "ckpt.pt"), model, torch.optim.AdamW(model.parameters()),
                    torch.amp.GradScaler("cpu", enabled=False), 1, argparse.Namespace(dataset_type="chat"))
    export.main(["--init_from", str(tmp_path), "--out_dir", str(tmp_path / "hf")])
    pipe = transformers.pipeline("text-generation", model=str(tmp_path / "hf"), device="cpu")
    # replies that end at <|endoftext|> (this model's, within 12 tokens), and one cut by max_new_tokens
    for system, line, max_new_tokens in [(SYSTEM, "Hi!", 12), (None, "How are you?", 4), (SYSTEM, "Bye.", 12)]:
        messages = ([{"role": "system", "content": system}] if system else []) + [{"role": "user", "content": line}]
        theirs = pipe(messages, do_sample=False, max_new_tokens=max_new_tokens)[0]["generated_text"][-1]
        monkeypatch.setattr(sys, "stdin", io.StringIO(line + "\n"))
        capsys.readouterr()
        sample.main(["--init_from", str(tmp_path), "--device", "cpu", "--dtype", "float32", "--chat", "--temperature",
                     "0", "--max_new_tokens", str(max_new_tokens), *(["--system", system] if system else [])])
        assert theirs["role"] == "assistant" and capsys.readouterr().out == theirs["content"] + "\n"


@pytest.mark.parametrize("flags, message", [
    (["--system", SYSTEM], "--system goes with --chat"),
    (["--chat", "--prompt", "x"], "--chat excludes --prompt and --instruction"),
    (["--chat", "--instruction", "Add."], "--chat excludes --prompt and --instruction"),
    (["--chat", "--num_samples", "2"], "--num_samples is for prompts"),
])
def test_bad_chat_options_exit_2_with_one_line(flags, message, capsys):
    with pytest.raises(SystemExit) as exit_info:
        sample.main(["--init_from", "/nonexistent/run", *flags])
    err = capsys.readouterr().err
    assert exit_info.value.code == 2 and err.count("\n") == 1 and message in err, err


def strict_stdin(data):
    """stdin as under a strict UTF-8 locale (PYTHONIOENCODING=utf-8:strict, as on many desktops), from a pipe."""
    return io.TextIOWrapper(io.BytesIO(data), encoding="utf-8", errors="strict")


@pytest.mark.parametrize("errors", ["strict", "surrogateescape"])
def test_a_prompt_on_stdin_that_is_not_utf8_is_one_line(checkpoint, capsys, monkeypatch, errors):
    monkeypatch.setattr(sys, "stdin", io.TextIOWrapper(io.BytesIO(b"caf\xe9\n"), encoding="utf-8", errors=errors))
    with pytest.raises(SystemExit) as exit_info:
        run_sample(capsys, "--init_from", checkpoint[1], "--prompt", "-")
    err = capsys.readouterr().err
    assert exit_info.value.code == 2 and err.count("\n") == 1
    assert err.startswith("error: stdin is not UTF-8 text (a bad byte at offset 3)")


def test_a_chat_line_that_is_not_utf8_is_one_error_and_the_next_lines_are_answered(monkeypatch, capsys):
    model = chat_model(block_size=128, eot_bias=6)
    lines = [b"Hi!", b"caf\xe9", b"Bye."]
    stdin = strict_stdin(b"".join(line + b"\n" for line in lines))
    out, err, calls = run_chat(monkeypatch, capsys, model, stdin, "--max_new_tokens", "8")
    assert err.splitlines() == ["error: this line is not UTF-8 text (a bad byte at offset 3): convert it to UTF-8, "
                                "e.g. iconv -f LATIN1 -t UTF-8"]
    assert len(out.split("\n")) == 4 and out.split("\n")[1] == ""  # three replies, the second empty, then the end
    assert len(turn_contexts(calls)) == 2


def test_ctrl_c_while_the_model_loads_stops_without_a_traceback(capsys, monkeypatch):
    def interrupted(source):
        raise KeyboardInterrupt
    monkeypatch.setattr(sample, "load_model", interrupted)
    with pytest.raises(SystemExit) as exit_info:
        run_sample(capsys, "--prompt", "Hi")
    assert exit_info.value.code == 130 and "Traceback" not in capsys.readouterr().err


def test_a_system_message_that_fills_the_context_is_refused_before_any_turn(monkeypatch, capsys):
    model = chat_model(block_size=64, eot_bias=12)
    with pytest.raises(SystemExit) as exit_info:
        run_chat(monkeypatch, capsys, model, ["Hi!"], "--system", "Be brief. " * 30)
    err = capsys.readouterr().err
    assert exit_info.value.code == 2 and err.count("\n") == 1
    assert err.startswith("error: --system takes ") and "no room for a conversation; shorten it" in err


@pytest.mark.parametrize("dataset_type, flags, noted", [
    ("text", ["--chat"], True), ("alpaca", ["--chat"], True), ("chat", ["--chat"], False),
    ("text", ["--instruction", "Add."], True), ("alpaca", ["--instruction", "Add."], False),
    ("text", ["--prompt", "Hi"], False)])
def test_a_template_on_weights_not_fine_tuned_on_it_gets_a_note(tmp_path, capsys, monkeypatch, dataset_type, flags,
                                                                noted):
    model = chat_model(block_size=64, eot_bias=12)
    save_checkpoint(str(tmp_path / "ckpt.pt"), model, torch.optim.AdamW(model.parameters()),
                    torch.amp.GradScaler("cpu", enabled=False), 1, argparse.Namespace(dataset_type=dataset_type))
    monkeypatch.setattr(sys, "stdin", io.StringIO("Hi!\n"))
    sample.main(["--init_from", str(tmp_path), "--max_new_tokens", "4", "--device", "cpu", *flags])
    err = capsys.readouterr().err
    assert (f"was trained on --dataset_type {dataset_type} data" in err) == noted, err


@pytest.mark.parametrize("dataset_type, flags, hint", [("alpaca", [], '--instruction "..."'), ("chat", [], "--chat"),
                                                     ("text", [], None), ("alpaca", ["--prompt", "Hi"], None)])
def test_a_model_trained_on_a_template_sampled_without_it_or_a_prompt_gets_a_note_saying_what_to_give_it(
        tmp_path, capsys, dataset_type, flags, hint):
    model = chat_model(block_size=64, eot_bias=12)  # ends its text at once, as a fine-tuned model given "\n" may
    save_checkpoint(str(tmp_path / "ckpt.pt"), model, torch.optim.AdamW(model.parameters()),
                    torch.amp.GradScaler("cpu", enabled=False), 1, argparse.Namespace(dataset_type=dataset_type))
    sample.main(["--init_from", str(tmp_path), "--max_new_tokens", "4", "--device", "cpu", *flags])
    err = capsys.readouterr().err
    if hint is None:
        assert "note:" not in err, err
    else:
        assert f"trained on --dataset_type {dataset_type} data: without its template" in err, err
        assert f"sample it with {hint}" in err, err


def test_endoftext_typed_by_the_user_or_in_system_is_fed_as_text_not_the_control_token():
    chat = sample.Chat(chat_model(block_size=128, eot_bias=6), system="Say <|endoftext|> never.")
    tokens = chat.turn_tokens("what is <|endoftext|>?", first=True)
    assert tokens.count(EOT_TOKEN) == 1  # the conversation's start alone
    assert "Say <|endoftext|> never." in get_tokenizer().decode(tokens)
    assert chat.turn_tokens("<|endoftext|>", first=False).count(EOT_TOKEN) == 0

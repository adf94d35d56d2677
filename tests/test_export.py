import argparse
import errno
import json
import os

import pytest
import torch

import export
import hf
from checkpoint import save_checkpoint
from conftest import REPO
from model import GPT, GPTConfig
from records import conversation
from tokenizer import chat_tokens, get_tokenizer

transformers = pytest.importorskip("transformers")


EXPORTED = {"config.json", "model.safetensors", "vocab.json", "merges.txt", "tokenizer_config.json"}


def tiny_checkpoint(directory, seed=0, dataset_type="text"):
    torch.manual_seed(seed)
    model = GPT(GPTConfig(n_layer=2, n_head=2, n_embd=32, block_size=32)).eval()
    directory.mkdir(exist_ok=True)
    save_checkpoint(str(directory / "ckpt.pt"), model, torch.optim.AdamW(model.parameters()),
                    torch.amp.GradScaler("cpu", enabled=False), 1, argparse.Namespace(dataset_type=dataset_type))
    return model


def assert_same_logits(model, directory):
    theirs = transformers.GPT2LMHeadModel.from_pretrained(str(directory)).eval()
    idx = torch.randint(0, 50257, (2, 32))
    with torch.no_grad():
        ours, _ = model(idx, torch.zeros_like(idx))
        assert (theirs(idx).logits - ours).abs().max().item() < 1e-4


def contents(directory):
    """Every file under directory, with its bytes: what a refused or failed export must leave as it was."""
    return {os.path.relpath(os.path.join(root, name), directory): open(os.path.join(root, name), "rb").read()
            for root, _, names in os.walk(directory) for name in names}


def another_models_export(directory):
    """A directory as an earlier export of another model, or transformers' save_pretrained, may leave it."""
    torch.manual_seed(1)
    hf.save_pretrained(GPT(GPTConfig(n_layer=1, n_head=2, n_embd=16, block_size=16)), str(directory))
    (directory / "tokenizer.json").write_text('{"stale": "a tokenizer AutoTokenizer would prefer"}')
    (directory / "generation_config.json").write_text('{"max_length": 7}')
    torch.save({"wte.weight": torch.zeros(3, 3)}, directory / "pytorch_model.bin")


def export_fails(argv, capsys):
    with pytest.raises(SystemExit) as exit_info:
        export.main(argv)
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("error: ")
    return err


def test_an_exported_checkpoint_loads_in_transformers_with_our_logits_and_tokenizer(tmp_path, capsys):
    model = tiny_checkpoint(tmp_path)
    export.main(["--init_from", str(tmp_path), "--out_dir", str(tmp_path / "hf")])
    assert "wrote" in capsys.readouterr().out
    assert_same_logits(model, tmp_path / "hf")

    # the tokenizer written from the repo's gpt2.tiktoken is GPT-2's: same ids as ours on any text
    tokenizer = transformers.AutoTokenizer.from_pretrained(str(tmp_path / "hf"))
    text = open(os.path.join(REPO, "input.txt")).read(3000)
    text += " naïve café 日本語 🤖\n\n\t  it's 1,234.5"
    assert tokenizer(text)["input_ids"] == get_tokenizer().encode_ordinary(text)
    assert tokenizer.eos_token_id == 50256
    assert json.loads((tmp_path / "hf" / "config.json").read_text())["n_positions"] == 32


def test_export_of_a_missing_run_is_a_one_line_error(tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_info:
        export.main(["--init_from", str(tmp_path / "nothing"), "--out_dir", str(tmp_path / "hf")])
    assert exit_info.value.code == 2
    assert capsys.readouterr().err.count("\n") == 1 and not (tmp_path / "hf").exists()


@pytest.mark.parametrize("case", ["another_model", "subdirectory", "the_checkpoint_itself"])
def test_export_refuses_a_directory_it_would_mix_with_or_lose_data_from_and_leaves_it_untouched(
        tmp_path, capsys, case):
    tiny_checkpoint(tmp_path / "run")
    out = tmp_path / "hf"
    if case == "another_model":  # without --overwrite: its stale files would win over the export's
        another_models_export(out)
        flags = []
    elif case == "subdirectory":  # --overwrite deletes files, not a directory that may be someone's data
        another_models_export(out)
        (out / "data").mkdir()
        (out / "data" / "notes.txt").write_text("mine")
        flags = ["--overwrite"]
    else:  # --overwrite into the run's own out_dir would delete the checkpoint being exported
        out = tmp_path / "run"
        flags = ["--overwrite"]
    before = contents(out)
    err = export_fails(["--init_from", str(tmp_path / "run"), "--out_dir", str(out), *flags], capsys)
    assert str(out) in err and "--overwrite" in err
    assert contents(out) == before
    assert sorted(os.listdir(tmp_path)) == sorted({"run", out.name})  # no temporary directory either


def test_export_with_overwrite_leaves_only_its_own_files_and_loads_with_our_logits(tmp_path, capsys):
    model = tiny_checkpoint(tmp_path / "run")
    out = tmp_path / "exports" / "hf"
    another_models_export(out)
    export.main(["--init_from", str(tmp_path / "run"), "--out_dir", str(out), "--overwrite"])
    assert "wrote" in capsys.readouterr().out
    assert set(os.listdir(out)) == EXPORTED  # the stale tokenizer.json, pytorch_model.bin, ... are gone
    assert os.listdir(tmp_path / "exports") == ["hf"]  # and so are the temporary and the old directories
    assert_same_logits(model, out)
    tokenizer = transformers.AutoTokenizer.from_pretrained(str(out))
    assert tokenizer("ROMEO: it's 1,234")["input_ids"] == get_tokenizer().encode_ordinary("ROMEO: it's 1,234")


def test_every_exported_file_has_the_mode_the_umask_gives(tmp_path):
    tiny_checkpoint(tmp_path)
    previous = os.umask(0o027)
    try:
        export.main(["--init_from", str(tmp_path), "--out_dir", str(tmp_path / "hf")])
    finally:
        os.umask(previous)
    modes = {name: oct(os.stat(tmp_path / "hf" / name).st_mode & 0o777) for name in os.listdir(tmp_path / "hf")}
    assert set(modes) == EXPORTED
    assert set(modes.values()) == {oct(0o640)}  # model.safetensors too, not safetensors' private 0600
    assert os.stat(tmp_path / "hf").st_mode & 0o777 == 0o750


@pytest.mark.parametrize("earlier_export", [True, False], ids=["over_an_export", "into_a_new_directory"])
def test_a_failed_write_is_one_line_and_leaves_the_old_export_and_no_partial_directory(
        tmp_path, capsys, monkeypatch, earlier_export):
    tiny_checkpoint(tmp_path / "run")
    out = tmp_path / "exports" / "hf"
    if earlier_export:
        export.main(["--init_from", str(tmp_path / "run"), "--out_dir", str(out)])
    before = contents(tmp_path / "exports") if earlier_export else None

    def disk_full(tensors, filename, metadata=None):
        with open(filename, "wb") as f:
            f.write(b"the first bytes of the weights")
        raise OSError(errno.ENOSPC, "No space left on device", filename)
    monkeypatch.setattr("safetensors.torch.save_file", disk_full)
    err = export_fails(["--init_from", str(tmp_path / "run"), "--out_dir", str(out), "--overwrite"], capsys)
    assert str(out) in err and "No space left on device" in err
    if earlier_export:
        assert contents(tmp_path / "exports") == before  # the old export, whole, and nothing beside it
    else:
        assert os.listdir(tmp_path / "exports") == []


CONVERSATIONS = [
    [{"role": "user", "content": "Hi!"}, {"role": "assistant", "content": "Hello. How can I help?"}],
    [{"role": "system", "content": "You answer in one line.\n"},
     {"role": "user", "content": "  What is 2 + 2?"}, {"role": "assistant", "content": "4."},
     {"role": "user", "content": "And 3 + 3?\n\n"}, {"role": "assistant", "content": "\n6, of course :)"},
     {"role": "user", "content": "Thanks"}, {"role": "assistant", "content": "You're welcome!"}],
    [{"role": "system", "content": "Réponds en français."}, {"role": "user", "content": "¿Qué tal? 東京は 🙂"},
     {"role": "assistant", "content": "Très bien, merci — et toi ? ✓"}],
]


def test_only_a_model_fine_tuned_on_chat_data_is_exported_with_a_chat_template(tmp_path, capsys):
    for dataset_type in ("text", "alpaca", "chat"):
        tiny_checkpoint(tmp_path / dataset_type, dataset_type=dataset_type)
        export.main(["--init_from", str(tmp_path / dataset_type), "--out_dir", str(tmp_path / f"hf-{dataset_type}")])
        config = json.loads((tmp_path / f"hf-{dataset_type}" / "tokenizer_config.json").read_text())
        assert ("chat_template" in config) == (dataset_type == "chat")
    # exported again from the Hugging Face directories: the template carried over where there was one
    for dataset_type in ("text", "chat"):
        again = tmp_path / f"again-{dataset_type}"
        export.main(["--init_from", str(tmp_path / f"hf-{dataset_type}"), "--out_dir", str(again)])
        config = json.loads((again / "tokenizer_config.json").read_text())
        assert ("chat_template" in config) == (dataset_type == "chat")


def test_the_exported_chat_template_gives_transformers_the_trainers_tokens(tmp_path, capsys):
    tiny_checkpoint(tmp_path / "run", dataset_type="chat")
    export.main(["--init_from", str(tmp_path / "run"), "--out_dir", str(tmp_path / "hf")])
    tokenizer = transformers.AutoTokenizer.from_pretrained(str(tmp_path / "hf"))

    def ids(encoded):  # transformers 5 returns a BatchEncoding, 4 a list
        return list(encoded["input_ids"] if hasattr(encoded, "keys") else encoded)

    # one exchange; a system message and three, with whitespace around the texts; non-ASCII text
    for messages in CONVERSATIONS:
        # the whole conversation, as data.ChatLoader trains on it
        assert ids(tokenizer.apply_chat_template(messages, tokenize=True)) == chat_tokens(messages)[0]
        # up to the last reply, with the header that asks for it: what sample.py --chat feeds the model
        asked = ids(tokenizer.apply_chat_template(messages[:-1], tokenize=True, add_generation_prompt=True))
        assert asked == chat_tokens(messages[:-1], add_generation_prompt=True)[0]
        assert asked == chat_tokens(messages)[0][: len(asked)]


def exported_chat_tokenizer(tmp_path):
    tiny_checkpoint(tmp_path / "run", dataset_type="chat")
    export.main(["--init_from", str(tmp_path / "run"), "--out_dir", str(tmp_path / "hf")])
    return transformers.AutoTokenizer.from_pretrained(str(tmp_path / "hf"))


def test_the_exported_template_reads_sharegpt_roles_and_text_parts_as_the_trainer_does(tmp_path):
    tokenizer = exported_chat_tokenizer(tmp_path)
    names = {"system": "system", "user": "human", "assistant": "gpt"}
    for messages in CONVERSATIONS:
        sharegpt = [{"from": names[m["role"]], "value": m["content"]} for m in messages]
        parts = [{"role": m["role"], "content": [{"type": "text", "text": m["content"][:3]},
                                                 {"type": "text", "text": m["content"][3:]}]} for m in messages]
        # the trainer reads each record format through records.conversation, then tokenizes alike
        for record, key in ((sharegpt, "conversations"), (parts, "messages")):
            theirs = tokenizer.apply_chat_template(record, tokenize=True)
            ours = chat_tokens(conversation({key: record}, "record 0"))[0]
            assert list(theirs["input_ids"] if hasattr(theirs, "keys") else theirs) == ours


@pytest.mark.parametrize("messages, why", [
    ([{"role": "user", "content": "2+2?"}, {"role": "tool", "content": "4"}], "tool and function messages"),
    ([{"role": "user", "content": "Hi"}, {"role": "system", "content": "Be brief."}], "a system message comes after"),
    ([{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}], "a part that is not text"),
    ([{"role": "user", "content": "say <|endoftext|> now"}], "spells <|endoftext|>"),
])
def test_the_exported_template_refuses_what_it_cannot_render_as_the_trainer_would(tmp_path, messages, why):
    # never a silently different prompt: a message dropped, a role unknown, a list shown as Python's repr
    tokenizer = exported_chat_tokenizer(tmp_path)
    with pytest.raises(Exception, match=why):
        tokenizer.apply_chat_template(messages, tokenize=True)

import argparse
import json
import os

import pytest
import torch

import export
from checkpoint import save_checkpoint
from conftest import REPO
from data import get_tokenizer
from model import GPT, GPTConfig

transformers = pytest.importorskip("transformers")


def test_an_exported_checkpoint_loads_in_transformers_with_our_logits_and_tokenizer(tmp_path, capsys):
    torch.manual_seed(0)
    model = GPT(GPTConfig(n_layer=2, n_head=2, n_embd=32, block_size=32)).eval()
    save_checkpoint(str(tmp_path / "ckpt.pt"), model, torch.optim.AdamW(model.parameters()),
                    torch.amp.GradScaler("cpu", enabled=False), 1, argparse.Namespace())
    export.main(["--init_from", str(tmp_path), "--out_dir", str(tmp_path / "hf")])
    assert "wrote" in capsys.readouterr().out

    theirs = transformers.GPT2LMHeadModel.from_pretrained(str(tmp_path / "hf")).eval()
    idx = torch.randint(0, 50257, (2, 32))
    with torch.no_grad():
        ours, _ = model(idx, torch.zeros_like(idx))
        assert (theirs(idx).logits - ours).abs().max().item() < 1e-4

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

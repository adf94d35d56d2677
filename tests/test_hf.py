"""The Hugging Face format, in and out (transformers is a test-only dependency: requirements-dev.txt)."""

import errno
import json
import os

import pytest
import torch

import hf
from model import GPT
from test_model import tiny_config


def hf_gpt2(tmp_path, **shape):
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    model = transformers.GPT2LMHeadModel(transformers.GPT2Config(**shape)).eval()
    model.save_pretrained(tmp_path)
    return model


def assert_same_logits(ours, theirs, vocab_size, length=24):
    idx = torch.randint(0, vocab_size, (2, length))
    with torch.no_grad():
        expected = theirs(idx).logits
        logits, _ = ours.eval()(idx, torch.zeros_like(idx))
    assert (logits - expected).abs().max().item() < 1e-4


@pytest.mark.parametrize("shape", [
    dict(n_layer=2, n_head=4, n_embd=64, n_positions=32, vocab_size=50257),
    dict(),  # the real gpt2 shape: 124M parameters
], ids=["tiny", "gpt2"])
def test_from_pretrained_gives_transformers_logits(tmp_path, shape):
    theirs = hf_gpt2(tmp_path, **shape)
    ours = hf.from_pretrained(str(tmp_path))
    assert ours.num_params() == theirs.num_parameters()
    assert ours.lm_head.weight is ours.transformer.wte.weight
    assert_same_logits(ours, theirs, theirs.config.vocab_size)


def test_from_pretrained_reads_the_old_pytorch_model_bin_layout(tmp_path):
    # OpenAI's original upload: no "transformer." prefix, causal-mask buffers stored as weights, a .bin file
    theirs = hf_gpt2(tmp_path, n_layer=2, n_head=2, n_embd=32, n_positions=16, vocab_size=300)
    os.remove(tmp_path / "model.safetensors")
    state = {k.removeprefix("transformer."): v for k, v in theirs.state_dict().items()}
    for i in range(2):
        state[f"h.{i}.attn.bias"] = torch.ones(1, 1, 16, 16).tril()
    torch.save(state, tmp_path / "pytorch_model.bin")
    assert_same_logits(hf.from_pretrained(str(tmp_path)), theirs, 300, length=16)


def test_save_pretrained_writes_what_transformers_loads_with_the_same_logits(tmp_path):
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    ours = GPT(tiny_config(vocab_size=300))
    hf.save_pretrained(ours, str(tmp_path))
    theirs = transformers.GPT2LMHeadModel.from_pretrained(str(tmp_path)).eval()
    assert_same_logits(ours, theirs, 300, length=16)
    assert torch.equal(hf.from_pretrained(str(tmp_path)).state_dict()["lm_head.weight"],
                       ours.state_dict()["lm_head.weight"])


@pytest.mark.parametrize("breakage, message", [
    (lambda d: (d / "config.json").write_text(json.dumps({"model_type": "llama"})), "not GPT-2"),
    (lambda d: os.remove(d / "model.safetensors"), "neither model.safetensors nor pytorch_model.bin"),
    (lambda d: os.remove(d / "config.json"), "no config.json"),
    (lambda d: (d / "model.safetensors").write_bytes(b"not weights"), "damaged"),
    (lambda d: (d / "config.json").write_text(json.dumps(
        {**json.loads((d / "config.json").read_text()), "n_layer": 3})), "missing transformer.h.2"),
])
def test_from_pretrained_explains_what_is_wrong_with_a_directory(tmp_path, breakage, message):
    torch.manual_seed(0)
    hf.save_pretrained(GPT(tiny_config(vocab_size=300)), str(tmp_path))
    breakage(tmp_path)
    with pytest.raises(ValueError, match=message):
        hf.from_pretrained(str(tmp_path))


def test_save_pretrained_reports_a_failed_weights_write_as_an_oserror_with_its_cause(tmp_path):
    # safetensors raises its own SafetensorError on a failed write; callers catch OSError, as for the other files
    pytest.importorskip("safetensors")
    (tmp_path / "model.safetensors.tmp").mkdir()  # where the weights go first: a directory cannot be written
    with pytest.raises(OSError) as error:
        hf.save_pretrained(GPT(tiny_config(vocab_size=300)), str(tmp_path))
    assert error.value.errno == errno.EISDIR and error.value.strerror == os.strerror(errno.EISDIR)

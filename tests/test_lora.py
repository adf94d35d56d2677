"""LoRA adapters: injection, training only them, merging, their state, and PEFT's format (peft and transformers are
test-only dependencies: requirements-dev.txt)."""

import copy
import json
import os

import pytest
import torch
import torch.nn as nn

import hf
import lora
from model import GPT, GPTConfig
from optim import build_optimizer
from test_model import packed_rows


def tiny_config(**overrides):
    return GPTConfig(**{**dict(n_layer=2, n_head=2, n_embd=32, block_size=32, vocab_size=97), **overrides})


def adapted_model(rank=4, alpha=8, dropout=0.0, targets="all", seed=0):
    """A tiny GPT with adapters that change its outputs: B drawn at random, as if trained (a fresh B is zero)."""
    torch.manual_seed(seed)
    model = GPT(tiny_config())
    lora.add_adapters(model, rank, alpha, dropout, targets)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("lora_B.weight"):
                p.normal_(std=0.1)
    return model


def tokens(batch=2, length=16, seed=1):
    return torch.randint(0, 97, (batch, length), generator=torch.Generator().manual_seed(seed))


def adapter_names(model):
    return [name for name, p in model.named_parameters() if p.requires_grad]


def test_a_fresh_adapter_gives_exactly_the_base_s_logits():
    torch.manual_seed(0)
    model = GPT(tiny_config()).eval()
    idx = tokens()
    before, _ = model(idx, idx)
    lora.add_adapters(model, rank=4, alpha=8, dropout=0.0)
    after, _ = model(idx, idx)
    assert torch.equal(before, after)  # B is zero: B @ A adds exactly nothing


def test_adapters_keep_the_base_parameters_and_their_names_and_add_only_lora_A_and_lora_B():
    torch.manual_seed(0)
    model = GPT(tiny_config())
    base_keys = set(model.state_dict())
    weight = model.transformer.h[0].attn.c_attn.weight
    lora.add_adapters(model, rank=4, alpha=8)
    c_attn = model.transformer.h[0].attn.c_attn
    assert c_attn.weight is weight  # taken over, not copied: the optimizer and hf.py see the same tensor by name
    assert model.lm_head.weight is model.transformer.wte.weight
    added = set(model.state_dict()) - base_keys
    assert base_keys <= set(model.state_dict())
    assert added == {f"transformer.h.{i}.{t}.lora_{ab}.weight" for i in range(2) for t in lora.TARGETS for ab in "AB"}
    assert sorted(adapter_names(model)) == sorted(added)  # the base is frozen, the adapters are not
    assert c_attn.lora_A.weight.shape == (4, 32) and c_attn.lora_B.weight.shape == (96, 4)
    # the projection's output: base(x) + B A x * alpha / rank
    with torch.no_grad():
        c_attn.lora_B.weight.normal_()
        x = torch.randn(3, 32)
        expected = x @ weight.T + c_attn.bias + (x @ c_attn.lora_A.weight.T @ c_attn.lora_B.weight.T) * 8 / 4
        torch.testing.assert_close(c_attn(x), expected)


def test_training_steps_change_the_adapters_and_leave_every_base_weight_bit_identical():
    torch.manual_seed(0)
    model = GPT(tiny_config())
    base = {name: t.clone() for name, t in model.state_dict().items()}
    lora.add_adapters(model, rank=4, alpha=8, dropout=0.1)
    adapters = {name: t.clone() for name, t in lora.adapter_state_dict(model).items()}
    optimizer = build_optimizer(model, weight_decay=0.1, lr=1e-2, betas=(0.9, 0.99))  # the repo's AdamW groups
    assert sum(len(g["params"]) for g in optimizer.param_groups) == len(adapters)
    for step in range(3):  # B moves at the first step, A from the second (its gradient is B's transpose times ...)
        _, loss = model(tokens(seed=step), tokens(seed=step + 10))
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    for name, tensor in base.items():
        assert torch.equal(model.state_dict()[name], tensor), name
    assert all(p.grad is None for name, p in model.named_parameters() if not lora.is_adapter_key(name))
    for name, tensor in lora.adapter_state_dict(model).items():
        assert not torch.equal(tensor, adapters[name]), name


def test_a_merged_model_gives_the_adapted_logits_and_is_a_plain_gpt():
    model = adapted_model(dropout=0.1).eval()
    idx = tokens()
    adapted_logits, _ = model(idx, idx)
    lora.merge_adapters(model)
    merged_logits, _ = model(idx, idx)
    assert (merged_logits - adapted_logits).abs().max().item() <= 1e-5
    plain = GPT(tiny_config())
    assert list(model.state_dict()) == list(plain.state_dict())
    assert not lora.adapted(model) and lora.adapter_settings(model) is None
    assert type(model.transformer.h[0].mlp.c_proj) is nn.Linear
    assert all(p.requires_grad for p in model.parameters())
    assert model.lm_head.weight is model.transformer.wte.weight
    plain.load_state_dict(model.state_dict())  # strict: exactly the base's keys and shapes


def test_target_choices_adapt_only_the_projections_they_name():
    chosen = {"attn": {"attn.c_attn", "attn.c_proj"}, "mlp": {"mlp.c_fc", "mlp.c_proj"},
              "c_attn,c_fc": {"attn.c_attn", "mlp.c_fc"}, " mlp.c_proj ": {"mlp.c_proj"},
              "c_proj": {"attn.c_proj", "mlp.c_proj"}, "all": set(lora.TARGETS), "attn,mlp": set(lora.TARGETS)}
    for value, expected in chosen.items():
        model = GPT(tiny_config())
        lora.add_adapters(model, rank=2, alpha=4, targets=value)
        assert {lora.target_of(name) for name in lora.adapted(model)} == expected, value
        assert {name.split(".lora_")[0].split(".", 3)[3] for name in adapter_names(model)} == expected
        assert lora.adapter_settings(model)["targets"] == [t for t in lora.TARGETS if t in expected]


@pytest.mark.parametrize("settings, message", [
    (dict(targets="attn,qkv"), "unknown LoRA target 'qkv': choose from all, attn, mlp, attn.c_attn"),
    (dict(targets=""), "unknown LoRA target ''"),
    (dict(rank=0), "LoRA rank must be a whole number of at least 1, got 0"),
    (dict(rank=33), "LoRA rank 33 is larger than transformer.h.0.attn.c_attn allows (32 in, 96 out): choose a rank "
                    "from 1 to 32"),
    (dict(alpha=0), "LoRA alpha must be positive"),
    (dict(dropout=1.0), "LoRA dropout must be in [0, 1)"),
])
def test_an_unknown_target_or_an_impossible_setting_is_a_value_error_saying_what_to_choose(settings, message):
    model = GPT(tiny_config())
    with pytest.raises(ValueError) as e:
        lora.add_adapters(model, **{**dict(rank=4, alpha=8), **settings})
    assert message in str(e.value) and "\n" not in str(e.value)
    assert all(p.requires_grad for p in model.parameters())  # refused before anything was changed


def test_adapters_are_not_added_twice():
    model = adapted_model()
    with pytest.raises(ValueError, match="has LoRA adapters already"):
        lora.add_adapters(model, rank=4, alpha=8)


def test_the_adapter_state_round_trips_into_a_fresh_copy_of_the_base():
    model = adapted_model(targets="attn,mlp.c_fc").eval()
    state = lora.adapter_state_dict(model)
    assert all(".lora_A." in name or ".lora_B." in name for name in state) and len(state) == 2 * 3 * 2
    torch.manual_seed(0)
    fresh = GPT(tiny_config()).eval()  # the base adapted_model drew: same seed
    lora.add_adapters(fresh, **lora.adapter_settings(model))
    lora.load_adapter_state_dict(fresh, state)
    idx = tokens()
    assert torch.equal(fresh(idx, idx)[0], model(idx, idx)[0])


@pytest.mark.parametrize("alter, message", [
    (lambda s: s.pop("transformer.h.1.mlp.c_fc.lora_B.weight"), "has no transformer.h.1.mlp.c_fc.lora_B.weight"),
    (lambda s: s.update({"transformer.h.2.attn.c_attn.lora_A.weight": torch.zeros(4, 32)}),
     "has transformer.h.2.attn.c_attn.lora_A.weight, which the model has no adapter for"),
    (lambda s: s.update({"transformer.h.0.attn.c_attn.lora_A.weight": torch.zeros(8, 32)}),
     "transformer.h.0.attn.c_attn.lora_A.weight has shape (8, 32), the model's (4, 32)"),
])
def test_an_adapter_state_that_does_not_fit_is_a_value_error_naming_the_key(alter, message):
    model = adapted_model()
    state = lora.adapter_state_dict(adapted_model(seed=1))
    alter(state)
    before = {name: t.clone() for name, t in lora.adapter_state_dict(model).items()}
    with pytest.raises(ValueError, match=message.replace("(", r"\(").replace(")", r"\)")):
        lora.load_adapter_state_dict(model, state)
    for name, t in lora.adapter_state_dict(model).items():
        assert torch.equal(t, before[name])  # nothing loaded


def test_base_checksum_identifies_the_base_weights_and_ignores_the_adapters():
    torch.manual_seed(0)
    model = GPT(tiny_config())
    plain = lora.base_checksum(model)
    lora.add_adapters(model, rank=4, alpha=8)
    assert lora.base_checksum(model) == plain  # at load, computed after the adapters are added: the same
    with torch.no_grad():
        model.transformer.h[0].attn.c_attn.lora_B.weight.fill_(1.0)
    assert lora.base_checksum(model) == plain
    with torch.no_grad():
        model.transformer.h[1].ln_2.bias[3] += 1e-3
    assert lora.base_checksum(model) != plain
    lora.cast_base(model, torch.bfloat16)
    with pytest.raises(ValueError, match="is torch.bfloat16: compute it before cast_base"):
        lora.base_checksum(model)


def test_adapter_dropout_draws_masks_in_training_and_none_in_eval():
    model = adapted_model(dropout=0.5)
    idx = tokens()
    no_dropout = adapted_model(dropout=0.0).eval()(idx, idx)[0]  # the same weights (same seed)
    model.train()
    assert not torch.allclose(model(idx, idx)[0], model(idx, idx)[0])
    model.eval()
    assert torch.equal(model(idx, idx)[0], no_dropout)


def adapter_grads(model, idx, seed=0):
    torch.manual_seed(seed)  # the dropout masks
    model.zero_grad()
    model(idx, tokens(seed=7))[1].backward()
    return {name: p.grad.clone() for name, p in model.named_parameters() if p.requires_grad}


def test_activation_checkpointing_gives_the_same_adapter_gradients_dropout_included():
    model = adapted_model(dropout=0.2).train()
    idx = tokens()
    stored = adapter_grads(model, idx)
    model.activation_checkpointing = True  # the recomputation draws the same dropout masks again
    recomputed = adapter_grads(model, idx)
    for name, grad in stored.items():
        torch.testing.assert_close(recomputed[name], grad, rtol=1e-6, atol=1e-7)


def test_packed_rows_give_each_example_the_logits_it_has_alone_with_adapters():
    model = adapted_model().eval()
    examples = [torch.randint(0, 97, (n,), generator=torch.Generator().manual_seed(n)).tolist() for n in (9, 5, 12)]
    idx, positions, places = packed_rows(examples, 16)
    packed = model(idx, idx, positions=positions)[0]
    for example, (row, start) in zip(examples, places):
        alone = model(torch.tensor([example]), torch.tensor([example]))[0]
        torch.testing.assert_close(packed[row, start : start + len(example)], alone[0], rtol=1e-5, atol=1e-5)


def test_a_bf16_base_under_autocast_trains_the_adapters_as_a_float32_base_does():
    model = adapted_model()
    idx = tokens()
    exact = adapter_grads(model, idx)
    with torch.autocast("cpu", torch.bfloat16):
        autocast = adapter_grads(model, idx)
        half = copy.deepcopy(model)
        lora.cast_base(half, torch.bfloat16)
        cast = adapter_grads(half, idx)
    block_weight = half.transformer.h[0].mlp.c_fc.weight
    assert block_weight.dtype == torch.bfloat16 and block_weight.element_size() == 2  # half the base's memory
    assert half.transformer.wte.weight.dtype == torch.float32  # the residual stream stays float32 (cast_base)
    assert all(p.dtype == torch.float32 for name, p in half.named_parameters() if p.requires_grad)
    for name, grad in autocast.items():
        # autocast multiplies by the same bf16 weights it would have cast to: the same gradients, bit for bit
        assert torch.equal(cast[name], grad), name
        # and within bf16's rounding of the float32 run's
        assert (cast[name] - exact[name]).norm() <= 0.05 * exact[name].norm(), name


@pytest.mark.filterwarnings("ignore:`is_gradient_checkpointing` is deprecated")
def test_adapters_are_saved_with_the_keys_and_shapes_peft_gives_them(tmp_path):
    peft = pytest.importorskip("peft")
    transformers = pytest.importorskip("transformers")
    from safetensors.torch import load_file

    theirs = transformers.GPT2LMHeadModel(transformers.GPT2Config(n_layer=2, n_head=2, n_embd=32, n_positions=32,
                                                                  vocab_size=97))
    theirs = peft.get_peft_model(theirs, peft.LoraConfig(r=4, lora_alpha=8, target_modules=list(lora.TARGETS),
                                                         fan_in_fan_out=True, task_type="CAUSAL_LM"))
    theirs.save_pretrained(tmp_path / "theirs")
    lora.save_peft(adapted_model(), str(tmp_path / "ours"), "gpt2")
    expected = {k: v.shape for k, v in load_file(tmp_path / "theirs" / "adapter_model.safetensors").items()}
    assert {k: v.shape for k, v in load_file(tmp_path / "ours" / "adapter_model.safetensors").items()} == expected
    config = json.loads((tmp_path / "ours" / "adapter_config.json").read_text())
    their_config = json.loads((tmp_path / "theirs" / "adapter_config.json").read_text())
    for field in ("peft_type", "task_type", "r", "lora_alpha", "fan_in_fan_out", "bias", "use_rslora"):
        assert config[field] == their_config[field], field


# (the warning is transformers' own, raised inside peft)
@pytest.mark.filterwarnings("ignore:`is_gradient_checkpointing` is deprecated")
@pytest.mark.parametrize("targets", ["all", "c_attn,mlp.c_proj"])
def test_the_peft_export_loads_onto_transformers_gpt2_with_our_logits(tmp_path, targets):
    peft = pytest.importorskip("peft")
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    base = GPT(tiny_config())
    hf.save_pretrained(base, str(tmp_path / "base"))
    model = adapted_model(targets=targets, dropout=0.1).eval()  # the same base (seed), trained-looking adapters
    lora.save_peft(model, str(tmp_path / "adapter"), str(tmp_path / "base"))
    theirs = peft.PeftModel.from_pretrained(transformers.GPT2LMHeadModel.from_pretrained(tmp_path / "base"),
                                            tmp_path / "adapter").eval()
    idx = tokens()
    with torch.no_grad():
        ours = model(idx, idx)[0]
        assert (theirs(idx).logits - ours).abs().max().item() <= 1e-4
        assert (base.eval()(idx, idx)[0] - ours).abs().max().item() > 1e-2  # the adapters do change the logits
    # and peft put adapters on exactly our projections (an extra one, fresh, would change no logit)
    their_layers = {name.removeprefix(lora.PEFT_PREFIX) for name, m in theirs.named_modules()
                    if isinstance(m, peft.tuners.lora.LoraLayer)}
    assert their_layers == set(lora.adapted(model))


def test_save_peft_refuses_a_directory_that_holds_files(tmp_path):
    (tmp_path / "old.txt").write_text("someone's")
    with pytest.raises(ValueError, match="already exists and is not an empty directory"):
        lora.save_peft(adapted_model(), str(tmp_path), "gpt2")
    assert os.listdir(tmp_path) == ["old.txt"]
    with pytest.raises(ValueError, match="has no LoRA adapters"):
        lora.save_peft(GPT(tiny_config()), str(tmp_path / "new"), "gpt2")


@pytest.mark.slow  # a minute of compiling on a CPU
def test_a_compiled_adapted_model_gives_the_eager_loss_and_adapter_gradients():
    model = adapted_model()
    idx = tokens()
    eager = adapter_grads(model, idx)
    eager_loss = model(idx, tokens(seed=7))[1]
    compiled = torch.compile(model)
    model.zero_grad()
    loss = compiled(idx, tokens(seed=7))[1]
    loss.backward()
    torch.testing.assert_close(loss, eager_loss)
    for name, p in model.named_parameters():
        if p.requires_grad:
            torch.testing.assert_close(p.grad, eager[name], rtol=1e-4, atol=1e-6)

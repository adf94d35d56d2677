import math

import pytest
import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode

from model import GPT, PRESETS, GPTConfig


def tiny_config(**overrides):
    return GPTConfig(**{**dict(n_layer=2, n_head=2, n_embd=32, block_size=16, vocab_size=97), **overrides})


@pytest.mark.parametrize(
    "preset, expected",
    [("gpt2", 124_439_808), ("gpt2-medium", 354_823_168), ("gpt2-large", 774_030_080), ("gpt2-xl", 1_557_611_200)],
)
def test_released_presets_have_openai_gpt2_parameter_counts(preset, expected):
    with torch.device("meta"):  # shapes only: no memory, no time
        model = GPT(GPTConfig(**PRESETS[preset]))
    assert model.num_params() == expected


def test_input_embedding_and_output_layer_share_one_parameter():
    model = GPT(tiny_config())
    assert model.lm_head.weight is model.transformer.wte.weight
    assert model.lm_head.weight.data_ptr() == model.transformer.wte.weight.data_ptr()
    # trained through both uses: the gradient holds the output layer's part even for tokens never seen as input
    idx = torch.zeros(1, 4, dtype=torch.long)
    _, loss = model(idx, torch.full((1, 4), 5))
    loss.backward()
    assert model.transformer.wte.weight.grad[5].abs().sum() > 0


def test_changing_a_future_token_leaves_earlier_logits_unchanged():
    torch.manual_seed(0)
    model = GPT(tiny_config()).eval()
    idx = torch.randint(0, 97, (2, 16))
    changed = idx.clone()
    changed[:, 10] = (changed[:, 10] + 1) % 97
    targets = torch.zeros_like(idx)
    logits, _ = model(idx, targets)
    logits_changed, _ = model(changed, targets)
    torch.testing.assert_close(logits[:, :10], logits_changed[:, :10], rtol=0, atol=0)
    assert not torch.allclose(logits[:, 10:], logits_changed[:, 10:])


def test_sdpa_attention_equals_plain_reference_attention():
    torch.manual_seed(0)
    cfg = tiny_config(n_head=4)
    attn = GPT(cfg).transformer.h[0].attn
    x = torch.randn(3, 16, cfg.n_embd)
    q, k, v = attn.c_attn(x).split(cfg.n_embd, dim=2)
    q, k, v = (t.view(3, 16, 4, cfg.n_embd // 4).transpose(1, 2) for t in (q, k, v))
    scores = q @ k.transpose(-2, -1) / math.sqrt(cfg.n_embd // 4)
    scores = scores.masked_fill(torch.ones(16, 16, dtype=torch.bool).triu(1), float("-inf"))
    reference = (F.softmax(scores, dim=-1) @ v).transpose(1, 2).reshape(3, 16, cfg.n_embd)
    torch.testing.assert_close(attn(x), attn.c_proj(reference), rtol=1e-5, atol=1e-6)


def test_tiny_model_overfits_one_batch():
    torch.manual_seed(0)
    model = GPT(tiny_config())
    idx = torch.randint(0, 97, (4, 16))
    targets = torch.randint(0, 97, (4, 16))
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    for _ in range(150):
        _, loss = model(idx, targets)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    assert loss.item() < 0.05  # from ln(97) = 4.6: it memorised 64 random targets


def test_forward_without_targets_returns_only_the_last_positions_logits():
    torch.manual_seed(0)
    model = GPT(tiny_config()).eval()
    idx = torch.randint(0, 97, (2, 9))
    full, _ = model(idx, torch.zeros_like(idx))
    last, loss = model(idx)
    assert loss is None and last.shape == (2, 1, 97)
    torch.testing.assert_close(last[:, 0], full[:, -1])


def test_loss_is_the_mean_over_targets_that_are_not_minus_100():
    torch.manual_seed(0)
    model = GPT(tiny_config())
    idx = torch.randint(0, 97, (2, 8))
    targets = torch.randint(0, 97, (2, 8))
    targets[0, :5] = -100
    logits, loss = model(idx, targets)
    kept = targets != -100
    expected = F.cross_entropy(logits[kept], targets[kept])
    torch.testing.assert_close(loss, expected)


def test_residual_projections_start_smaller_by_sqrt_of_twice_the_depth():
    torch.manual_seed(0)
    model = GPT(tiny_config(n_layer=8, n_embd=256, n_head=4))
    assert model.transformer.h[0].attn.c_attn.weight.std().item() == pytest.approx(0.02, rel=0.02)
    for block in model.transformer.h:
        for proj in (block.attn.c_proj, block.mlp.c_proj):
            assert proj.weight.std().item() == pytest.approx(0.02 / math.sqrt(16), rel=0.05)


def test_flops_per_token_counts_the_training_step_matmuls():
    cfg = tiny_config(n_layer=3, n_embd=64, n_head=4, block_size=32)
    model = GPT(cfg)
    idx = torch.randint(0, 97, (2, 32))
    # the math backend spells attention as matmuls the counter sees (the fused kernels are opaque to it)
    with FlopCounterMode(display=False) as counter, sdpa_kernel(SDPBackend.MATH):
        _, loss = model(idx, idx)
        loss.backward()
    assert counter.get_total_flops() == pytest.approx(model.flops_per_token(32) * idx.numel(), rel=1e-9)


@pytest.mark.parametrize("bad", [dict(n_embd=30, n_head=4), dict(n_layer=0), dict(dropout=1.0)])
def test_impossible_shapes_are_rejected(bad):
    with pytest.raises(ValueError):
        tiny_config(**bad)

import math
import subprocess
import sys
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode

import model as model_module
from conftest import REPO
from model import GPT, PRESETS, GPTConfig, KVCache, cross_entropy, filter_logits
from measure import peak_memory_bytes, step_flops, token_flops
from runtime import Runtime


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


def test_the_model_imports_nothing_of_data_files_or_flags():
    # model.py knows nothing of files or flags: the one label it needs, IGNORE_INDEX, comes from tokenizer.py, which
    # imports no project module
    check = "import model, sys; assert not {'data', 'records', 'files', 'cli'} & sys.modules.keys(), sys.modules.keys()"
    assert subprocess.run([sys.executable, "-c", check], cwd=REPO).returncode == 0


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


def test_bf16_attention_on_a_cpu_is_float32_s_rounded_once_for_short_rows_and_close_to_it_for_long_ones():
    # short rows take the float32 kernel (faster there than the CPU's bf16 one): the exact float32 attention of the
    # bf16 inputs, rounded once, and its gradient in bf16; long rows keep the bf16 kernel, within bf16's rounding
    torch.manual_seed(0)
    for T, exact_match in ((64, True), (1024, False)):  # head size 32: up to 512 positions in float32
        q, k, v = (torch.randn(1, 2, T, 32).bfloat16().requires_grad_() for _ in range(3))
        y = model_module.attention(q, k, v, None, 0.0, True)
        exact = F.scaled_dot_product_attention(q.float(), k.float(), v.float(), is_causal=True)
        assert y.dtype == torch.bfloat16
        if exact_match:
            assert torch.equal(y, exact.bfloat16())
        torch.testing.assert_close(y.float(), exact, rtol=2**-7, atol=2**-7)
        y.float().square().sum().backward()
        assert q.grad.dtype == torch.bfloat16 and all(t.grad.isfinite().all() for t in (q, k, v))


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


def test_loss_is_the_mean_over_targets_that_are_not_minus_100_of_the_per_token_losses():
    torch.manual_seed(0)
    model = GPT(tiny_config())
    idx = torch.randint(0, 97, (2, 8))
    targets = torch.randint(0, 97, (2, 8))
    targets[0, :5] = -100
    logits, loss = model(idx, targets)
    kept = targets != -100
    expected = F.cross_entropy(logits[kept], targets[kept])
    torch.testing.assert_close(loss, expected)
    # loss_reduction="none": each position's loss, 0 where ignored, for evaluations that weigh tokens their own way
    _, per_token = model(idx, targets, loss_reduction="none")
    assert per_token.shape == (2, 8) and (per_token[0, :5] == 0).all() and (per_token[kept] > 0).all()
    torch.testing.assert_close(per_token[kept], F.cross_entropy(logits[kept], targets[kept], reduction="none"))


@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_without_logits_the_output_layer_runs_on_the_targets_alone_for_the_same_loss_and_gradients(reduction):
    # what train.py's step and the evaluations ask for: a fine-tuning batch's prompts and padding (no target) are
    # often most of its tokens, and the 50,257-way output layer with its softmax most of a small model's step
    torch.manual_seed(0)
    model = GPT(tiny_config())
    idx = torch.randint(0, 97, (3, 8))
    targets = torch.randint(0, 97, (3, 8))
    targets[0, :5] = targets[2, 6:] = -100
    weights = torch.rand(3, 8) if reduction == "none" else 1.0
    logits, full = model(idx, targets, loss_reduction=reduction)
    full_grads = torch.autograd.grad((full * weights).sum(), list(model.parameters()))
    rows_seen = []
    real_output_layer = model.output_layer
    model.output_layer = lambda x: rows_seen.append(x.size(0)) or real_output_layer(x)
    no_logits, loss = model(idx, targets, loss_reduction=reduction, return_logits=False)
    grads = torch.autograd.grad((loss * weights).sum(), list(model.parameters()))
    assert logits.shape == (3, 8, 97) and no_logits is None
    assert rows_seen == [int((targets != -100).sum())] == [17]
    torch.testing.assert_close(loss, full)
    for grad, full_grad in zip(grads, full_grads):
        torch.testing.assert_close(grad, full_grad)


@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_our_cross_entropy_has_pytorch_s_loss_and_gradient(reduction):
    torch.manual_seed(0)
    logits = (torch.randn(64, 500) * 3).requires_grad_()
    targets = torch.randint(0, 500, (64,))
    targets[::5] = -100
    weights = torch.rand(64) if reduction == "none" else 2.5  # a gradient that differs from row to row
    ours = cross_entropy(logits, targets, reduction)
    (grad_ours,) = torch.autograd.grad((ours * weights).sum(), logits)
    theirs = F.cross_entropy(logits, targets, ignore_index=-100, reduction=reduction)
    (grad_theirs,) = torch.autograd.grad((theirs * weights).sum(), logits)
    torch.testing.assert_close(ours, theirs)
    torch.testing.assert_close(grad_ours, grad_theirs)
    assert grad_ours[::5].abs().max() == 0  # unlabelled rows get no gradient


def test_residual_projections_start_smaller_by_sqrt_of_twice_the_depth():
    torch.manual_seed(0)
    model = GPT(tiny_config(n_layer=8, n_embd=256, n_head=4))
    assert model.transformer.h[0].attn.c_attn.weight.std().item() == pytest.approx(0.02, rel=0.02)
    for block in model.transformer.h:
        for proj in (block.attn.c_proj, block.mlp.c_proj):
            assert proj.weight.std().item() == pytest.approx(0.02 / math.sqrt(16), rel=0.05)


def test_flops_per_token_counts_the_training_step_matmuls(monkeypatch):
    monkeypatch.setattr(model_module, "ONEDNN_LINEAR", None)  # an op the FLOP counter does not know
    cfg = tiny_config(n_layer=3, n_embd=64, n_head=4, block_size=32)
    model = GPT(cfg)
    idx = torch.randint(0, 97, (2, 32))
    # the math backend spells attention as matmuls the counter sees (the fused kernels are opaque to it)
    with FlopCounterMode(display=False) as counter, sdpa_kernel(SDPBackend.MATH):
        _, loss = model(idx, idx)
        loss.backward()
    assert counter.get_total_flops() == pytest.approx(model.flops_per_token(32) * idx.numel(), rel=1e-9)


def test_mfu_counts_the_output_layer_only_at_the_targets_as_a_cpu_step_computes_it(monkeypatch):
    # fine-tuning: the prompts have no targets, and on a CPU the output layer skips their rows; counting it on every
    # token (as flops_per_token * tokens) made the MFU of Alpaca runs over 100% in fp32
    monkeypatch.setattr(model_module, "ONEDNN_LINEAR", None)
    model = GPT(tiny_config(n_layer=3, n_embd=64, n_head=4, block_size=32))
    idx = torch.randint(0, 97, (2, 32))
    targets = idx.clone()
    targets[0, :20], targets[1, :9] = -100, -100  # prompts
    with FlopCounterMode(display=False) as counter, sdpa_kernel(SDPBackend.MATH):
        model(idx, targets, return_logits=False)[1].backward()
    loader = SimpleNamespace(tokens_in_step=lambda split, step: idx.numel(),
                             targets_in_step=lambda split, step: int((targets != -100).sum()))
    flops = step_flops(token_flops(model, 32), loader, 0)
    assert counter.get_total_flops() == pytest.approx(flops, rel=1e-9)
    assert flops < model.flops_per_token(32) * idx.numel()


@pytest.mark.parametrize("bad", [dict(n_embd=30, n_head=4), dict(n_layer=0), dict(dropout=1.0)])
def test_impossible_shapes_are_rejected(bad):
    with pytest.raises(ValueError):
        tiny_config(**bad)


# ----------------------------------------------------------------------------------------------------------------
# Generation


def test_logits_with_the_kv_cache_equal_the_full_forward_at_every_position():
    torch.manual_seed(0)
    model = GPT(tiny_config()).eval()
    idx = torch.randint(0, 97, (2, 16))
    full, _ = model(idx, torch.zeros_like(idx))
    cache = KVCache(model.config)
    prefix, _ = model(idx[:, :5], cache=cache)  # a prompt of 5 in one pass, then one token at a time
    steps = [prefix] + [model(idx[:, [t]], cache=cache)[0] for t in range(5, 16)]
    torch.testing.assert_close(torch.cat(steps, dim=1), full[:, 4:], rtol=1e-5, atol=1e-5)
    # several new tokens after cached ones (a masked, not causal, attention)
    cache = KVCache(model.config)
    model(idx[:, :5], cache=cache)
    chunk, _ = model(idx[:, 5:9], cache=cache)
    torch.testing.assert_close(chunk[:, 0], full[:, 8], rtol=1e-5, atol=1e-5)


def test_greedy_generation_is_the_same_with_and_without_the_cache_even_past_the_context():
    torch.manual_seed(0)
    model = GPT(tiny_config()).eval()  # a context of 16: 40 new tokens slide the window several times
    idx = torch.randint(0, 97, (3, 6))
    cached = model.generate(idx, 40, temperature=0)
    uncached = model.generate(idx, 40, temperature=0, use_cache=False)
    assert cached.shape == (3, 46)
    assert torch.equal(cached, uncached)


def test_sampling_with_a_seeded_generator_is_reproducible():
    torch.manual_seed(0)
    model = GPT(tiny_config()).eval()
    idx = torch.zeros(2, 1, dtype=torch.long)
    runs = [model.generate(idx, 30, temperature=1.0, top_k=20, top_p=0.9,
                           generator=torch.Generator().manual_seed(seed)) for seed in (7, 7, 8)]
    assert torch.equal(runs[0], runs[1])
    assert not torch.equal(runs[0], runs[2])


def test_generation_stops_once_every_row_has_produced_the_stop_token():
    torch.manual_seed(0)
    model = GPT(tiny_config()).eval()
    idx = torch.tensor([[1], [2]])
    free = model.generate(idx, 20, temperature=0)[:, 1:]
    stop = free[0, 4].item()
    ends = [(row == stop).nonzero()[0].item() if (row == stop).any() else None for row in free]
    expected = free.clone()
    for row, end in zip(expected, ends):  # a row that has stopped repeats the stop token
        if end is not None:
            row[end:] = stop
    length = max(ends) + 1 if None not in ends else 20
    stopped = model.generate(idx, 20, temperature=0, stop_token=stop)[:, 1:]
    assert torch.equal(stopped, expected[:, :length])


def test_top_k_keeps_exactly_the_k_most_likely_tokens():
    logits = torch.tensor([[0.1, 3.0, -1.0, 2.0, 0.5], [5.0, 4.0, 3.0, 2.0, 1.0]])
    kept = filter_logits(logits, top_k=2).isfinite()
    assert kept.tolist() == [[False, True, False, True, False], [True, True, False, False, False]]
    assert filter_logits(logits, top_k=5).isfinite().all()


def test_top_p_keeps_the_fewest_most_likely_tokens_that_reach_p():
    probs = torch.tensor([[0.05, 0.5, 0.15, 0.3]])
    logits = probs.log()
    def kept(p):
        return filter_logits(logits, top_p=p).isfinite().tolist()[0]
    assert kept(0.8) == [False, True, False, True]  # 0.5 + 0.3 reaches 0.8
    assert kept(0.81) == [False, True, True, True]
    assert kept(0.4) == [False, True, False, False]  # the most likely token always stays
    assert kept(1.0) == [True, True, True, True]
    assert filter_logits(logits, top_k=2, top_p=0.4).isfinite().tolist()[0] == [False, True, False, False]


# ----------------------------------------------------------------------------------------------------------------
# The output layer's kernels


def test_padding_the_output_layer_for_gpu_tensor_cores_changes_no_value():
    torch.manual_seed(0)
    x, weight = torch.randn(2, 5, 16, requires_grad=True), torch.randn(97, 16, requires_grad=True)
    padded = model_module.padded_linear(x, weight, multiple=64)
    plain = F.linear(x, weight)
    assert padded.shape == plain.shape == (2, 5, 97)
    torch.testing.assert_close(padded, plain)
    grads = torch.autograd.grad(padded.square().sum(), (x, weight))
    torch.testing.assert_close(grads, torch.autograd.grad(plain.square().sum(), (x, weight)))


@pytest.mark.skipif(model_module.ONEDNN_LINEAR is None, reason="this PyTorch build has no oneDNN")
def test_the_onednn_output_layer_gives_f_linear_s_values_and_gradients():
    torch.manual_seed(0)
    x, weight = torch.randn(2, 5, 16, requires_grad=True), torch.randn(97, 16, requires_grad=True)
    ours, plain = model_module.OneDNNLinear.apply(x, weight), F.linear(x, weight)
    torch.testing.assert_close(ours, plain)
    grads = torch.autograd.grad(ours.square().sum(), (x, weight))
    torch.testing.assert_close(grads, torch.autograd.grad(plain.square().sum(), (x, weight)))


def test_the_softmax_of_bf16_logits_is_float32_block_by_block_and_exact():
    logits = torch.randn(100, 50257).bfloat16()  # 20 rows a block on a CPU: 5 blocks
    targets = torch.randint(0, 50257, (100,))
    probs, target_probs = model_module.softmax_float32(logits, targets)
    exact = torch.softmax(logits.float(), dim=-1)
    # kept in bf16 (the gradient's dtype), each value the float32 one rounded once; the targets' own in float32
    assert probs.dtype == torch.bfloat16 and torch.equal(probs, exact.bfloat16())
    assert target_probs.dtype == torch.float32 and torch.equal(target_probs, exact[torch.arange(100), targets])


def test_bf16_logits_get_the_float32_gradient_rounded_once_even_where_p_is_near_one():
    # softmax - one_hot at a target the model is sure of is a small difference of numbers near 1: from a bf16 p it
    # would be mostly rounding error, so it is taken from the float32 p
    logits = torch.zeros(3, 50257)
    logits[:, 7] = torch.tensor([20.0, 9.0, 0.0])  # p(target) ~ 1 - 1e-4, ~0.13, ~2e-5
    targets = torch.tensor([7, 7, 7])
    exact = torch.autograd.grad(F.cross_entropy(logits.requires_grad_(), targets), logits)[0]
    bf16 = logits.detach().bfloat16().requires_grad_()
    ours = torch.autograd.grad(model_module.cross_entropy(bf16, targets), bf16)[0]
    assert ours.dtype == torch.bfloat16
    torch.testing.assert_close(ours.float(), exact, rtol=2 * 2**-8, atol=0)


def test_a_bf16_training_step_keeps_no_float32_copy_of_the_logits():
    # The logits dominate a small model's memory. Under autocast they are bf16 (2 bytes each), their softmax is
    # computed in float32 a block at a time and kept in bf16 (2), and backward turns that into the bf16 gradient in
    # place: 4 bytes a logit at the peak (4.6 measured). A float32 copy of the logits or of their softmax (4 more),
    # a float32 gradient (4 more), or the logits kept alive through backward (2 more) shows up here.
    model = GPT(GPTConfig(n_layer=1, n_head=1, n_embd=32, block_size=256))
    x = torch.randint(0, 50257, (2, 256))

    def step():
        with torch.autocast("cpu", dtype=torch.bfloat16):
            loss = model(x, x)[1]
        loss.backward()
        model.zero_grad(set_to_none=True)

    step()
    weights = list(model.parameters())
    peak = peak_memory_bytes(step, Runtime("cpu", "cpu", torch.float32), resident=weights)
    weight_bytes = sum(p.numel() * p.element_size() for p in weights)
    assert (peak - weight_bytes) / (x.numel() * model.config.vocab_size) < 5.5


def packed_rows(examples, width):
    """The examples (lists of token ids) back to back in rows of `width` as data.ExampleLoader.pack lays them out,
    in the order given, a new row when one is full: (idx, positions, where each example went as (row, start))."""
    rows, places = [[]], []
    for example in examples:
        if len(rows[-1]) + len(example) > width:
            rows.append([])
        places.append((len(rows) - 1, len(rows[-1])))
        rows[-1] += [(token, position) for position, token in enumerate(example)]
    rows = [row + [(0, p) for p in range(width - len(row))] for row in rows]  # padding: a segment of its own
    idx = torch.tensor([[t for t, _ in row] for row in rows])
    return idx, torch.tensor([[p for _, p in row] for row in rows]), places


def test_packed_rows_give_every_example_the_losses_and_gradients_it_has_alone():
    torch.manual_seed(0)
    model = GPT(tiny_config(block_size=16))
    examples = [torch.randint(0, 97, (n,)).tolist() for n in (9, 5, 16, 2, 7, 11)]
    idx, positions, places = packed_rows(examples, 16)
    targets = torch.full(idx.shape, -100)  # the padding learns nothing, as the loaders label it
    for example, (row, start) in zip(examples, places):
        targets[row, start : start + len(example)] = torch.randint(0, 97, (len(example),))
    _, packed = model(idx, targets, loss_reduction="none", positions=positions)
    packed.sum().backward()
    packed_grads = [p.grad.clone() for p in model.parameters()]
    model.zero_grad()
    alone_total = 0
    for example, (row, start) in zip(examples, places):
        end = start + len(example)
        _, alone = model(torch.tensor([example]), targets[row : row + 1, start:end], loss_reduction="none")
        torch.testing.assert_close(packed[row, start:end], alone[0], rtol=1e-5, atol=1e-5)
        alone_total = alone_total + alone.sum()
    alone_total.backward()  # the examples each in a row of its own: the same gradient
    for packed_grad, p in zip(packed_grads, model.parameters()):
        torch.testing.assert_close(packed_grad, p.grad, rtol=1e-4, atol=1e-6)


def test_attention_never_crosses_from_one_packed_example_into_another():
    torch.manual_seed(0)
    model = GPT(tiny_config(block_size=16)).eval()
    examples = [torch.randint(0, 97, (n,)).tolist() for n in (6, 4, 5)]
    idx, positions, _ = packed_rows(examples, 16)
    logits = model(idx, idx, positions=positions)[0]
    changed = idx.clone()
    changed[0, 6:10] = (changed[0, 6:10] + 1) % 97  # the second example, all of it
    changed_logits = model(changed, changed, positions=positions)[0]
    torch.testing.assert_close(changed_logits[0, :6], logits[0, :6])  # the one before it: unchanged
    torch.testing.assert_close(changed_logits[0, 10:15], logits[0, 10:15])  # the one after it too
    assert not torch.allclose(changed_logits[0, 6:10], logits[0, 6:10])


def packed_and_alone(model, examples, width, dtype):
    """Per-token losses and the summed loss's gradients of the examples packed into rows of `width`, then of each
    example in a row of its own, under autocast in dtype: ((losses, gradients) packed, the same alone, the places)."""
    idx, positions, places = packed_rows(examples, width)
    targets = torch.full(idx.shape, -100)
    for example, (row, start) in zip(examples, places):
        targets[row, start : start + len(example)] = torch.randint(0, 97, (len(example),))
    with torch.autocast("cpu", dtype=dtype, enabled=dtype != torch.float32):
        _, packed = model(idx, targets, loss_reduction="none", positions=positions)
    packed.sum().backward()
    packed_grads = [p.grad.clone() for p in model.parameters()]
    model.zero_grad()
    alone, total = [], 0
    for example, (row, start) in zip(examples, places):
        with torch.autocast("cpu", dtype=dtype, enabled=dtype != torch.float32):
            _, losses = model(torch.tensor([example]), targets[row : row + 1, start : start + len(example)],
                              loss_reduction="none")
        alone.append(losses[0].detach())
        total = total + losses.sum()
    total.backward()
    alone_grads = [p.grad.clone() for p in model.parameters()]
    model.zero_grad()
    return (packed.detach(), packed_grads), (alone, alone_grads), places


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_packed_examples_of_every_length_on_a_cpu_run_each_alone_without_a_dense_mask(monkeypatch, dtype):
    # On a CPU the packed rows run the causal kernel on each example's own tokens (PackedRows.segment_attention):
    # examples of one token, a row that is one example, rows that end in padding (a segment of its own), the
    # examples' segments split from and joined back into the rows. The (B, 1, T, T) mask is never built.
    monkeypatch.setattr(model_module.PackedRows, "mask", lambda self: pytest.fail("dense mask built on a CPU"))
    torch.manual_seed(0)
    model = GPT(tiny_config(block_size=32))
    # rows: 1+2+3+5+8+13 (full), 32 (one example), 21+7+4 (full), 31 + 1 of padding, 11+16+1 + 4 of padding
    lengths = (1, 2, 3, 5, 8, 13, 32, 21, 7, 4, 31, 11, 16, 1)
    examples = [torch.randint(0, 97, (n,)).tolist() for n in lengths]
    (packed, packed_grads), (alone, alone_grads), places = packed_and_alone(model, examples, 32, dtype)
    assert packed.shape[0] == 5 and places[6] == (1, 0) and places[10] == (3, 0)
    # bf16: the packed attention runs in float32, alone in bf16; the bound holds with or without bf16 units
    # (measured: 0.008 nats and 0.6% of a gradient's norm at most)
    tolerance = dict(rtol=1e-5, atol=1e-5) if dtype == torch.float32 else dict(rtol=0.02, atol=0.05)
    for example_losses, (row, start) in zip(alone, places):
        torch.testing.assert_close(packed[row, start : start + len(example_losses)], example_losses, **tolerance)
    for packed_grad, alone_grad in zip(packed_grads, alone_grads):
        if dtype == torch.float32:
            torch.testing.assert_close(packed_grad, alone_grad, rtol=1e-4, atol=1e-6)
        else:
            assert (packed_grad - alone_grad).norm() <= 0.03 * alone_grad.norm()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_changing_one_packed_example_leaves_the_others_logits_unchanged_in_either_dtype(dtype):
    torch.manual_seed(0)
    model = GPT(tiny_config(block_size=32)).eval()
    examples = [torch.randint(0, 97, (n,)).tolist() for n in (9, 1, 14, 5, 20, 12)]
    idx, positions, places = packed_rows(examples, 32)
    row, start = places[2]
    changed = idx.clone()
    changed[row, start : start + 14] = (changed[row, start : start + 14] + 1) % 97
    with torch.autocast("cpu", dtype=dtype, enabled=dtype != torch.float32):
        logits = model(idx, idx, positions=positions)[0].float()
        changed_logits = model(changed, changed, positions=positions)[0].float()
    inside = torch.zeros(idx.shape, dtype=torch.bool)
    inside[row, start : start + 14] = True
    # the others are computed from the same values in the same order: equal to the bit
    assert torch.equal(changed_logits[~inside], logits[~inside])
    assert not torch.allclose(changed_logits[inside], logits[inside])


def test_packed_rows_train_with_dropout_and_recompute_it_exactly_under_activation_checkpointing():
    # dropout: SDPA's dropout_p in each example's attention (the math kernel: the fused CPU one has none)
    torch.manual_seed(0)
    model = GPT(tiny_config(block_size=32, dropout=0.2))
    examples = [torch.randint(0, 97, (n,)).tolist() for n in (9, 1, 14, 5, 20, 12)]
    idx, positions, _ = packed_rows(examples, 32)
    runs = []
    for checkpointing in (False, True):
        model.activation_checkpointing = checkpointing
        torch.manual_seed(1)
        _, loss = model(idx, idx, positions=positions)
        loss.backward()
        runs.append((loss.detach(), [p.grad.clone() for p in model.parameters()]))
        model.zero_grad()
    (loss, grads), (loss_checkpointed, grads_checkpointed) = runs
    torch.testing.assert_close(loss_checkpointed, loss, rtol=0, atol=0)
    torch.testing.assert_close(grads_checkpointed, grads, rtol=1e-6, atol=1e-7)
    assert not torch.allclose(model.eval()(idx, idx, positions=positions)[1], loss)  # the dropout acted

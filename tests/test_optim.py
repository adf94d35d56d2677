import pytest
import torch

from model import GPT, GPTConfig
from optim import MUON_LR_SCALE, build_optimizer, optimizer_step


def tiny_config(**overrides):
    return GPTConfig(**{**dict(n_layer=2, n_head=2, n_embd=16, block_size=8, vocab_size=50), **overrides})


def test_the_optimizer_decays_matrices_and_embeddings_but_not_biases_and_gains():
    model = GPT(tiny_config())
    decayed, not_decayed = build_optimizer(model, weight_decay=0.1, lr=1e-3, betas=(0.9, 0.95)).param_groups
    assert decayed["weight_decay"] == 0.1 and not_decayed["weight_decay"] == 0.0
    assert {id(p) for p in decayed["params"]} == {id(p) for p in model.parameters() if p.dim() == 2}
    assert all(p.dim() == 1 for p in not_decayed["params"])
    assert len(decayed["params"]) + len(not_decayed["params"]) == len(list(model.parameters()))  # tied: counted once


def test_muon_updates_the_blocks_weight_matrices_and_adamw_everything_else():
    model = GPT(tiny_config())
    optimizer = build_optimizer(model, weight_decay=0.1, lr=1e-3, betas=(0.9, 0.95), optimizer="muon")
    muon, adamw = optimizer.optimizers["muon"], optimizer.optimizers["adamw"]
    matrices = {id(p) for block in model.transformer.h for p in block.parameters() if p.dim() == 2}
    assert {id(p) for group in muon.param_groups for p in group["params"]} == matrices
    others = {id(p) for p in model.parameters()} - matrices  # embeddings (the tied head with them), biases, gains
    assert {id(p) for group in adamw.param_groups for p in group["params"]} == others
    assert id(model.lm_head.weight) in others and len(matrices) == 4 * model.config.n_layer
    assert [group["lr"] for group in optimizer.param_groups] == [1e-3, 1e-3, MUON_LR_SCALE * 1e-3]


def test_gradients_are_clipped_to_the_cap_and_the_norm_before_clipping_returned():
    torch.manual_seed(0)
    model = GPT(GPTConfig(n_layer=1, n_head=2, n_embd=16, block_size=8, vocab_size=50))
    optimizer = build_optimizer(model, 0.0, lr=0.0, betas=(0.9, 0.95))  # lr 0: the step leaves the weights
    idx = torch.randint(0, 50, (2, 8))
    (model(idx, idx)[1] * 1000).backward()
    norm_before = torch.sqrt(sum(p.grad.square().sum() for p in model.parameters()))
    clipped = []
    optimizer.register_step_pre_hook(lambda opt, *_: clipped.append(
        torch.sqrt(sum(p.grad.square().sum() for group in opt.param_groups for p in group["params"]))))
    norm = optimizer_step(model, optimizer, torch.amp.GradScaler("cpu", enabled=False), 1.0)
    torch.testing.assert_close(norm, norm_before)
    assert norm > 1 and clipped[0].item() == pytest.approx(1.0, rel=1e-4)
    assert all(p.grad is None for p in model.parameters())  # zeroed for the next step

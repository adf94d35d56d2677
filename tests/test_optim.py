import pytest
import torch

from model import GPT, GPTConfig
from optim import MUON_LR_SCALE, Muon, assign_owners, build_optimizer, newton_schulz, optimizer_step, shard_rows


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
    norm, skipped = optimizer_step(model, optimizer, torch.amp.GradScaler("cpu", enabled=False), 1.0)
    torch.testing.assert_close(norm, norm_before)
    assert norm > 1 and clipped[0].item() == pytest.approx(1.0, rel=1e-4)
    assert all(p.grad is None for p in model.parameters())  # zeroed for the next step


def random_matrices(shapes, seed):
    generator = torch.Generator().manual_seed(seed)
    return [torch.randn(*shape, generator=generator) for shape in shapes]


MATRIX_SHAPES = [(48, 16), (16, 16), (64, 16), (16, 64)]  # a block's c_attn, attn c_proj, c_fc, mlp c_proj


def test_muon_makes_torch_optim_muon_s_updates_and_reads_its_state():
    # the same update in the same precision (bf16 iterations), and checkpoints of either load in the other
    ours = [torch.nn.Parameter(m) for m in random_matrices(MATRIX_SHAPES, 0)]
    theirs = [torch.nn.Parameter(m.clone()) for m in ours]
    settings = dict(lr=0.02, weight_decay=0.1, momentum=0.9, adjust_lr_fn="match_rms_adamw")
    muon, reference = Muon(ours, ns_dtype=torch.bfloat16, **settings), torch.optim.Muon(theirs, **settings)
    for step in range(3):
        for a, b, grad in zip(ours, theirs, random_matrices(MATRIX_SHAPES, 1 + step)):
            a.grad, b.grad = grad, grad.clone()
        muon.step()
        reference.step()
        for a, b in zip(ours, theirs):
            assert torch.equal(a, b)
    assert muon.orthogonalised == 3 * len(MATRIX_SHAPES)
    restored = torch.optim.Muon([torch.nn.Parameter(m.clone()) for m in ours], **settings)
    restored.load_state_dict(muon.state_dict())
    assert all(torch.equal(restored.state[p]["momentum_buffer"], muon.state[q]["momentum_buffer"])
               for p, q in zip(restored.param_groups[0]["params"], ours))


def test_orthogonalising_in_float32_gives_an_orthogonal_update_close_to_bf16_s():
    # where bf16 is emulated (many times slower than fp32) the iterations run in fp32: the same update, closely
    coefficients = (3.4445, -4.775, 2.0315)
    for shape in MATRIX_SHAPES:
        k = min(shape)
        u, _ = torch.linalg.qr(random_matrices([(shape[0], k)], 1)[0])
        v, _ = torch.linalg.qr(random_matrices([(shape[1], k)], 2)[0])
        update = u @ torch.diag(torch.logspace(-1, 1, k)) @ v.T  # singular values from 0.1 to 10
        fp32 = newton_schulz(update, coefficients, 5, 1e-7, torch.float32)
        bf16 = newton_schulz(update, coefficients, 5, 1e-7, torch.bfloat16)
        assert fp32.dtype == torch.float32 and fp32.shape == update.shape
        torch.testing.assert_close(fp32, bf16.float(), atol=0.03, rtol=0.05)
        # every direction moves about as much: singular values near 1 (Muon's iteration does not reach 1 exactly)
        singular_values = torch.linalg.svdvals(fp32)
        assert singular_values.min() > 0.3 and singular_values.max() < 1.5


def test_each_matrix_has_one_owner_and_the_owners_share_the_work_evenly():
    shapes = [(2304, 768), (768, 768), (3072, 768), (768, 3072)] * 12  # gpt2's blocks
    for world in (2, 3, 8):
        owners = assign_owners(shapes, world)
        assert owners == assign_owners(shapes, world)  # every rank computes the same answer
        work = [sum(4 * min(s) ** 2 * max(s) + 2 * min(s) ** 3 for s, o in zip(shapes, owners) if o == r)
                for r in range(world)]
        assert set(owners) == set(range(world)) and max(work) < 1.1 * sum(work) / world


@pytest.mark.parametrize("rows, world", [(12, 2), (5, 2), (5, 4), (1, 3), (4800, 8)])
def test_shard_rows_are_the_rows_fsdp_gives_each_rank(rows, world):
    # FSDP2 shards dim 0 as torch.chunk does, with empty shards for the ranks it runs out of rows for
    chunks = torch.arange(rows).chunk(world)
    assert shard_rows(rows, world) == [len(c) for c in chunks] + [0] * (world - len(chunks))


@pytest.mark.parametrize("optimizer", ["adamw", "muon"])
def test_an_update_whose_gradient_is_not_finite_is_skipped(optimizer):
    torch.manual_seed(0)
    model = GPT(tiny_config())
    opt = build_optimizer(model, 0.1, lr=1e-2, betas=(0.9, 0.95), optimizer=optimizer, ns_dtype=torch.float32)
    scaler = torch.amp.GradScaler("cpu", enabled=False)
    idx = torch.randint(0, 50, (2, 8))
    model(idx, idx)[1].backward()
    assert optimizer_step(model, opt, scaler, 1.0)[1] == 0  # a finite gradient: applied
    before = {name: p.detach().clone() for name, p in model.named_parameters()}
    model(idx, idx)[1].backward()
    model.transformer.h[0].mlp.c_fc.weight.grad[0, 0] = float("nan")  # one NaN spoils the norm
    state = [t.clone() for s in opt.state.values() for t in s.values()]
    norm, skipped = optimizer_step(model, opt, scaler, 1.0)
    assert skipped == 1 and norm.isnan()  # (both on the device: the step does not wait for it)
    for name, p in model.named_parameters():
        assert torch.equal(p, before[name]), name  # no weight took the update...
    assert all(torch.equal(a, b) for a, b in zip(state, [t for s in opt.state.values() for t in s.values()]))
    model(idx, idx)[1].backward()  # ...nor the optimizer's state: the next finite step is as if it never happened
    assert optimizer_step(model, opt, scaler, 1.0)[1] == 0 and all(p.isfinite().all() for p in model.parameters())
    assert all(p.grad is None for p in model.parameters())  # and the next step starts clean

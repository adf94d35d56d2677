import dataclasses
import os
import socket

import torch
import torch.multiprocessing as mp

import runtime
from model import GPT, GPTConfig
from optim import Muon, optimizer_step
from parallel import build_training
from runtime import Runtime


def test_build_training_restores_model_optimizer_and_scaler_from_a_checkpoint_state():
    config = GPTConfig(n_layer=1, n_head=2, n_embd=16, block_size=8, vocab_size=50)
    rt = Runtime("cpu", "cpu", torch.float32)
    torch.manual_seed(0)
    model, optimizer, scaler = build_training(GPT(config), rt, weight_decay=0.1, lr=1e-2, betas=(0.9, 0.95))
    idx = torch.randint(0, 50, (2, 8))
    model(idx, idx)[1].backward()
    optimizer_step(model, optimizer, scaler, grad_clip=1.0)
    state = {"model": model.state_dict(), "optimizer": optimizer.state_dict(), "scaler": scaler.state_dict()}
    torch.manual_seed(1)  # other initial weights: all of the restored model must come from the state
    restored, restored_optimizer, _ = build_training(GPT(config), rt, weight_decay=0.1, lr=1e-2,
                                                             betas=(0.9, 0.95), state=state)
    for name, tensor in model.state_dict().items():
        assert torch.equal(restored.state_dict()[name], tensor)
    for a, b in zip(optimizer.state.values(), restored_optimizer.state.values()):
        assert torch.equal(a["exp_avg"], b["exp_avg"]) and torch.equal(a["exp_avg_sq"], b["exp_avg_sq"])


def ddp_worker(rank, port, checks):
    """One of two gloo processes, set up as torchrun would; runs the runtime's multi-process checks."""
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE="2", LOCAL_WORLD_SIZE="2",
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    rt = runtime.setup_runtime("cpu", "float32")
    try:
        for check in checks:
            globals()[check](rt)
    finally:
        runtime.shutdown()


def gradients_stay_in_ddp_buckets(rt):
    torch.manual_seed(0)
    model = GPT(GPTConfig(n_layer=1, n_head=2, n_embd=16, block_size=8, vocab_size=50))
    step_model, optimizer, scaler = build_training(model, rt, weight_decay=0.1, lr=1e-2, betas=(0.9, 0.95))
    for step in range(3):
        idx = torch.randint(0, 50, (2, 8), generator=torch.Generator().manual_seed(step * 2 + rt.rank))
        step_model(idx, idx)[1].backward()
        optimizer_step(step_model, optimizer, scaler, grad_clip=1.0)
        assert all(p.grad is not None and not p.grad.any() for p in model.parameters())  # zeroed in place
    # the gradients are views into DDP's bucket (one for a model this small), not tensors of their own
    assert len({p.grad.untyped_storage().data_ptr() for p in model.parameters()}) == 1


def rank0_agreement_is_every_rank_s(rt):
    assert runtime.agrees_with_rank0([7, 8])
    assert not runtime.agrees_with_rank0([7, 8 + rt.rank])  # rank 1 differs: both ranks learn it


def bf16_gradient_reduction_is_close_to_fp32(rt):
    grads = {}
    for reduce_dtype in ("float32", "bfloat16"):
        torch.manual_seed(0)
        model = GPT(GPTConfig(n_layer=1, n_head=2, n_embd=16, block_size=8, vocab_size=50))
        step_model, _, _ = build_training(model, rt, weight_decay=0.1, lr=1e-2, betas=(0.9, 0.95),
                                                  reduce_dtype=reduce_dtype)
        idx = torch.randint(0, 50, (2, 8), generator=torch.Generator().manual_seed(rt.rank))
        step_model(idx, idx)[1].backward()
        grads[reduce_dtype] = torch.cat([p.grad.flatten() for p in model.parameters()])
    assert grads["bfloat16"].dtype == torch.float32  # the optimizer still sees fp32 gradients
    assert not torch.equal(grads["bfloat16"], grads["float32"])  # the hook is in use: rounded to bf16 on the way
    torch.testing.assert_close(grads["bfloat16"], grads["float32"], rtol=1e-2, atol=1e-4)


def spread_muon_equals_muon_on_every_rank(rt):
    # what DDP hands the optimizer: the same whole gradients on every rank
    shapes = [(48, 16), (16, 16), (64, 16), (16, 64)] * 2
    generator = torch.Generator().manual_seed(0)
    weights = [torch.randn(*shape, generator=generator) for shape in shapes]
    spread, alone = ([torch.nn.Parameter(w.clone()) for w in weights] for _ in range(2))
    muons = [Muon(params, lr=0.02, momentum=0.9, ns_dtype=torch.float32, spread=flag)
             for params, flag in ((spread, True), (alone, False))]
    for step in range(3):
        grads = [torch.randn(*shape, generator=generator) for shape in shapes]
        for params, muon in zip((spread, alone), muons):
            for p, grad in zip(params, grads):
                p.grad = grad.clone()
            muon.step()
    for a, b in zip(spread, alone):
        assert torch.equal(a, b)  # bit for bit: each result is computed once and copied
    counts = rt.gather(muons[0].orthogonalised)
    assert counts == [3 * len(shapes) / 2] * 2  # each rank orthogonalised its half of the matrices, once a step
    assert muons[1].orthogonalised == 3 * len(shapes)  # where PyTorch's Muon does all of them on every rank


def sharded_muon_equals_muon_on_whole_matrices(rt):
    # FSDP's layout: each rank a block of rows of every matrix; odd row counts give the ranks unequal blocks
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import Shard, distribute_tensor

    mesh = init_device_mesh("cpu", (rt.world_size,))
    shapes = [(5, 4), (4, 4), (9, 3), (1, 6), (16, 64)]
    generator = torch.Generator().manual_seed(0)
    weights = [torch.randn(*shape, generator=generator) for shape in shapes]
    whole = [torch.nn.Parameter(w.clone()) for w in weights]
    sharded = [torch.nn.Parameter(distribute_tensor(w.clone(), mesh, [Shard(0)])) for w in weights]
    muons = [Muon(params, lr=0.02, momentum=0.9, ns_dtype=torch.float32) for params in (whole, sharded)]
    for step in range(3):
        grads = [torch.randn(*shape, generator=generator) for shape in shapes]
        for p, q, grad in zip(whole, sharded, grads):
            p.grad, q.grad = grad.clone(), distribute_tensor(grad.clone(), mesh, [Shard(0)])
        for muon in muons:
            muon.step()
    for p, q in zip(whole, sharded):
        torch.testing.assert_close(q.full_tensor(), p.data, rtol=1e-5, atol=1e-6)
    momentum = muons[1].state[sharded[0]]["momentum_buffer"]
    assert momentum.placements == (Shard(0),)  # the momentum stays sharded, like the weights
    torch.testing.assert_close(momentum.full_tensor(), muons[0].state[whole[0]]["momentum_buffer"])
    assert sum(rt.gather(muons[1].orthogonalised)) == 3 * len(shapes)  # each matrix once a step, job-wide


def fp16_loss_scales_stay_equal_under_fsdp_when_one_shard_overflows(rt):
    fp16 = dataclasses.replace(rt, dtype=torch.float16)
    torch.manual_seed(0)
    model = GPT(GPTConfig(n_layer=1, n_head=2, n_embd=16, block_size=8, vocab_size=50))
    step_model, optimizer, scaler = build_training(model, fp16, weight_decay=0.1, lr=1e-2, betas=(0.9, 0.95),
                                                   optimizer="muon", fsdp=True)
    idx = torch.randint(0, 50, (2, 8), generator=torch.Generator().manual_seed(0))
    scale = scaler.get_scale()
    scaler.scale(step_model(idx, idx)[1]).backward()
    if rt.rank == 0:  # an overflow in rank 0's rows alone
        model.transformer.h[0].mlp.c_fc.weight.grad.to_local()[0, 0] = float("inf")
    before = [p.full_tensor().clone() for p in model.parameters()]
    norm, skipped = optimizer_step(step_model, optimizer, scaler, grad_clip=1.0)
    assert skipped == 1 and all(torch.equal(p.full_tensor(), b) for p, b in zip(model.parameters(), before))
    assert rt.gather(scaler.get_scale()) == [scale / 2] * 2  # both ranks back off: their scales stay equal


def test_ddp_on_two_gloo_processes():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    mp.spawn(ddp_worker, args=(port, ["gradients_stay_in_ddp_buckets", "rank0_agreement_is_every_rank_s",
                                      "bf16_gradient_reduction_is_close_to_fp32",
                                      "spread_muon_equals_muon_on_every_rank",
                                      "sharded_muon_equals_muon_on_whole_matrices",
                                      "fp16_loss_scales_stay_equal_under_fsdp_when_one_shard_overflows"]), nprocs=2)

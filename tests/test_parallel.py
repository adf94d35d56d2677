import os
import socket

import pytest
import torch
import torch.multiprocessing as mp

import runtime
from cli import UserError
from model import GPT, GPTConfig
from optim import optimizer_step
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


def test_ddp_on_two_gloo_processes():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    mp.spawn(ddp_worker, args=(port, ["gradients_stay_in_ddp_buckets", "rank0_agreement_is_every_rank_s",
                                      "bf16_gradient_reduction_is_close_to_fp32"]), nprocs=2)


def test_muon_with_fsdp_is_refused_before_anything_is_built():
    model = GPT(GPTConfig(n_layer=1, n_head=2, n_embd=16, block_size=8, vocab_size=50))
    with pytest.raises(UserError, match="--optimizer muon does not work with --fsdp"):
        build_training(model, runtime.Runtime("cpu", "cpu", torch.float32), weight_decay=0.1, lr=1e-3,
                               betas=(0.9, 0.95), optimizer="muon", fsdp=True)

import os
import socket

import pytest
import torch
import torch.multiprocessing as mp

import runtime
from model import GPT, GPTConfig


@pytest.mark.parametrize("bf16_faster, expected", [(True, torch.bfloat16), (False, torch.float32)])
def test_auto_dtype_on_cpu_follows_the_measured_matmul_speed(monkeypatch, bf16_faster, expected):
    assert isinstance(runtime.cpu_bf16_is_faster(), bool)  # the real measurement runs on any CPU
    monkeypatch.setattr(runtime, "cpu_bf16_is_faster", lambda: bf16_faster)
    rt = runtime.setup_runtime("cpu", "auto")
    assert rt.dtype == expected
    with rt.autocast():
        assert (torch.ones(2, 2) @ torch.ones(2, 2)).dtype == expected  # matmuls run in the chosen dtype


def test_a_grad_scaler_only_under_float16():
    for dtype, enabled in [(torch.float16, True), (torch.bfloat16, False), (torch.float32, False)]:
        assert runtime.Runtime("cpu", "cpu", dtype).grad_scaler().is_enabled() == enabled


def test_build_training_restores_model_optimizer_and_scaler_from_a_checkpoint_state():
    config = GPTConfig(n_layer=1, n_head=2, n_embd=16, block_size=8, vocab_size=50)
    rt = runtime.Runtime("cpu", "cpu", torch.float32)
    torch.manual_seed(0)
    model, optimizer, scaler = runtime.build_training(GPT(config), rt, weight_decay=0.1, lr=1e-2, betas=(0.9, 0.95))
    idx = torch.randint(0, 50, (2, 8))
    model(idx, idx)[1].backward()
    runtime.optimizer_step(model, optimizer, scaler, grad_clip=1.0)
    state = {"model": model.state_dict(), "optimizer": optimizer.state_dict(), "scaler": scaler.state_dict()}
    torch.manual_seed(1)  # other initial weights: all of the restored model must come from the state
    restored, restored_optimizer, _ = runtime.build_training(GPT(config), rt, weight_decay=0.1, lr=1e-2,
                                                             betas=(0.9, 0.95), state=state)
    for name, tensor in model.state_dict().items():
        assert torch.equal(restored.state_dict()[name], tensor)
    for a, b in zip(optimizer.state.values(), restored_optimizer.state.values()):
        assert torch.equal(a["exp_avg"], b["exp_avg"]) and torch.equal(a["exp_avg_sq"], b["exp_avg_sq"])


def test_gradients_are_clipped_to_the_cap_and_the_norm_before_clipping_returned():
    torch.manual_seed(0)
    model = GPT(GPTConfig(n_layer=1, n_head=2, n_embd=16, block_size=8, vocab_size=50))
    optimizer = model.configure_optimizer(0.0, lr=0.0, betas=(0.9, 0.95))  # lr 0: the step leaves the weights
    idx = torch.randint(0, 50, (2, 8))
    (model(idx, idx)[1] * 1000).backward()
    norm_before = torch.sqrt(sum(p.grad.square().sum() for p in model.parameters()))
    clipped = []
    optimizer.register_step_pre_hook(lambda opt, *_: clipped.append(
        torch.sqrt(sum(p.grad.square().sum() for group in opt.param_groups for p in group["params"]))))
    norm = runtime.optimizer_step(model, optimizer, runtime.Runtime("cpu", "cpu", torch.float32).grad_scaler(), 1.0)
    torch.testing.assert_close(norm, norm_before)
    assert norm > 1 and clipped[0].item() == pytest.approx(1.0, rel=1e-4)
    assert all(p.grad is None for p in model.parameters())  # zeroed for the next step


def test_auto_dtype_on_a_gpu_that_only_emulates_bf16_is_float16(monkeypatch):
    # a V100 or T4: torch.cuda.is_bf16_supported() says yes by default, counting emulation
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda including_emulation=True: including_emulation)
    assert runtime.auto_dtype(runtime.Runtime("cuda:0", "cuda", torch.float32)) == "float16"
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda including_emulation=True: True)  # Ampere on
    assert runtime.auto_dtype(runtime.Runtime("cuda:0", "cuda", torch.float32)) == "bfloat16"


@pytest.mark.parametrize("name, flops", [("NVIDIA L4", 121e12), ("NVIDIA L40", 181e12), ("NVIDIA L40S", 362e12),
                                         ("NVIDIA H100 80GB HBM3", 989e12), ("NVIDIA H100 PCIe", 756e12),
                                         ("NVIDIA A100-SXM4-80GB", 312e12), ("Tesla T4", 65e12),
                                         ("NVIDIA GeForce RTX 4090", 165e12), ("NVIDIA GH200 480GB", None)])
def test_known_gpus_are_matched_by_whole_words_of_their_name(name, flops):
    assert runtime.gpu_peak_flops(name) == flops  # None: not in the table, its peak is measured


def test_peak_memory_counts_the_tensors_alive_at_the_worst_moment():
    rt = runtime.Runtime("cpu", "cpu", torch.float32)
    kept = torch.zeros(1_000_000)  # 4 MB that exist before and after: the weights of a training step

    def work():
        a = torch.ones(2_000_000)  # 8 MB
        b = a + 1  # 8 MB more: 20 MB with `kept`, the peak
        del a, b
        return torch.ones(1_000_000)  # 4 MB, after the peak has passed

    peak = runtime.peak_memory_bytes(work, rt, resident=[kept, kept[:10]])  # a view shares its storage
    assert 20_000_000 <= peak < 20_000_100  # (and a few bytes of scalars)


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
    step_model, optimizer, scaler = runtime.build_training(model, rt, weight_decay=0.1, lr=1e-2, betas=(0.9, 0.95))
    for step in range(3):
        idx = torch.randint(0, 50, (2, 8), generator=torch.Generator().manual_seed(step * 2 + rt.rank))
        step_model(idx, idx)[1].backward()
        runtime.optimizer_step(step_model, optimizer, scaler, grad_clip=1.0)
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
        step_model, _, _ = runtime.build_training(model, rt, weight_decay=0.1, lr=1e-2, betas=(0.9, 0.95),
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
    with pytest.raises(runtime.UserError, match="--optimizer muon does not work with --fsdp"):
        runtime.build_training(model, runtime.Runtime("cpu", "cpu", torch.float32), weight_decay=0.1, lr=1e-3,
                               betas=(0.9, 0.95), optimizer="muon", fsdp=True)

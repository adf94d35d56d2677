import pytest
import torch

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

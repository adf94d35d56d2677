import argparse

import pytest
import torch

from conftest import TINY
from measure import peak_memory_bytes
from model import GPT
from options import make_loader, resolve
from parallel import build_training
from runtime import setup_runtime
from step import get_lr, train_step


def resolved(small_text, tmp_path, *flags):
    return resolve([*TINY, "--dataset_path", small_text, "--out_dir", str(tmp_path), *flags])


def steps(model, optimizer, scaler, loader, numbers, accum_steps, rt, args):
    """train_step's losses at steps `numbers`, as train.py's loop calls it."""
    return [train_step(model, optimizer, scaler, loader, step, accum_steps, rt, lr=get_lr(step, args), seed=args.seed,
                       grad_clip=args.grad_clip)[0].item() for step in numbers]


def test_learning_rate_warms_up_from_zero_then_decays_to_min_lr():
    args = argparse.Namespace(max_lr=1e-3, min_lr=1e-4, warmup_steps=10, max_steps=100)
    assert get_lr(0, args) == 0.0
    assert get_lr(5, args) == pytest.approx(5e-4)
    assert get_lr(10, args) == pytest.approx(1e-3)
    assert get_lr(55, args) == pytest.approx(5.5e-4)  # halfway through the cosine
    assert get_lr(100, args) == pytest.approx(1e-4)
    schedule = [get_lr(s, args) for s in range(10, 101)]
    assert all(a >= b for a, b in zip(schedule, schedule[1:]))


@pytest.mark.parametrize("optimizer", [pytest.param("adamw", marks=pytest.mark.slow), "muon"])
def test_compiled_and_eager_training_steps_give_the_same_losses(optimizer, small_text, tmp_path):
    opts = resolved(small_text, tmp_path, "--batch_size", "2", "--optimizer", optimizer)
    args, accum_steps = opts.args, opts.accum_steps
    rt = setup_runtime("cpu", "float32")
    loader = make_loader(args, accum_steps)
    losses_by_mode = {}
    for compiled in (False, True):
        torch.manual_seed(0)
        step_model, opt, scaler = build_training(GPT(opts.cfg), rt, weight_decay=args.weight_decay, lr=args.max_lr,
                                                 betas=(args.beta1, args.beta2), optimizer=optimizer, compile=compiled)
        losses_by_mode[compiled] = steps(step_model, opt, scaler, loader, (1, 2, 3), accum_steps, rt, args)
    # the same math in another order of operations: equal to float rounding, far inside bf16's 1e-2
    assert losses_by_mode[True] == pytest.approx(losses_by_mode[False], rel=1e-3)


def test_more_micro_steps_keep_no_more_logits_alive(small_text, tmp_path):
    # each micro-step's logits (the largest tensor of a small model's step) are dropped before the next forward
    opts = resolved(small_text, tmp_path, "--batch_size", "2")
    args, cfg = opts.args, opts.cfg
    rt = setup_runtime("cpu", "float32")
    peaks = []
    for accum_steps in (1, 3):
        loader = make_loader(args, accum_steps)
        torch.manual_seed(0)
        model, optimizer, scaler = build_training(GPT(cfg), rt, weight_decay=0.1, lr=1e-3, betas=(0.9, 0.95))
        steps(model, optimizer, scaler, loader, [1], accum_steps, rt, args)  # the optimizer's state
        resident = [*model.parameters(), *(t for state in optimizer.state.values() for t in state.values())]
        peaks.append(peak_memory_bytes(lambda: steps(model, optimizer, scaler, loader, [2], accum_steps, rt, args), rt,
                                       resident))
    # accumulating into the gradients costs a gradient's size (the sum is made beside it), a micro-step's logits more
    gradient_bytes = sum(p.numel() * 4 for p in model.parameters())
    logits_bytes = args.batch_size * args.seq_len * cfg.vocab_size * 4
    assert peaks[1] - peaks[0] < gradient_bytes + logits_bytes / 4


def test_before_update_is_called_between_the_last_backward_and_the_update(small_text, tmp_path):
    # bench.py times the step's two parts there: every gradient is in, and no weight has moved yet
    opts = resolved(small_text, tmp_path, "--batch_size", "2", "--total_batch_size", str(2 * 2 * 32))
    rt = setup_runtime("cpu", "float32")
    torch.manual_seed(0)
    model, optimizer, scaler = build_training(GPT(opts.cfg), rt, weight_decay=0.1, lr=1e-3, betas=(0.9, 0.95))
    before = [p.detach().clone() for p in model.parameters()]
    seen = []

    def before_update():
        seen.append((all(p.grad is not None for p in model.parameters()),
                     all(torch.equal(p, b) for p, b in zip(model.parameters(), before))))

    loader = make_loader(opts.args, opts.accum_steps)
    _, _, tokens, skipped = train_step(model, optimizer, scaler, loader, 1, opts.accum_steps, rt, lr=1e-3, seed=0,
                                       grad_clip=1.0, before_update=before_update)
    assert seen == [(True, True)] and tokens == 2 * 2 * 32 and skipped.item() == 0
    assert not all(torch.equal(p, b) for p, b in zip(model.parameters(), before))  # then the update

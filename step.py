"""
The training step, one optimizer update, and the learning-rate schedule. train.py's loop and bench.py's timed steps
both call train_step: a change to the step is a change to what the benchmark measures.

    lr = get_lr(step, args)
    loss, grad_norm, tokens, skipped = train_step(model, optimizer, scaler, loader, step, accum_steps, rt, lr=lr,
                                                  seed=args.seed, grad_clip=args.grad_clip)

Its own file because scripts never import train.py (README.md); the pieces it puts together are the shared ones:
the loader's batches (data.py), the gradient sync (parallel.py), the update (optim.py).
"""

import math

import numpy as np
import torch

from tokenizer import IGNORE_INDEX
from optim import optimizer_step
from parallel import require_grad_sync


def train_step(model, optimizer, scaler, loader, step, accum_steps, rt, *, lr, seed, grad_clip, before_update=None):
    """One optimizer update, number `step` (1-based), at learning rate lr: the forward and backward passes of its
    micro-steps, then clipping to grad_clip and the optimizer's step. Returns the loss (a device tensor: reading it
    waits for the device), the gradient norm, the tokens fed (this rank's times the ranks: packed rows differ a little
    from rank to rank; padding included), and `skipped`: 1.0 if the update was not applied, its gradient not finite
    (a device tensor too). before_update, if given, is called between the last backward and the update: bench.py
    times the step's two parts there."""
    for group in optimizer.param_groups:
        # Muon's group runs at its own multiple of --max_lr (checkpoints from before --optimizer have no lr_scale)
        group["lr"] = lr * group.get("lr_scale", 1.0)
    # Dropout draws from the global RNG: seeding it from (seed, step, rank) makes it a function of the step too,
    # so a resumed run draws the same masks as an uninterrupted one, and each rank its own.
    torch.manual_seed(int(np.random.SeedSequence([seed, step, rt.rank]).generate_state(1)[0]))
    model.train()
    loss_sum = torch.zeros((), device=rt.device)
    # The loss is the mean over every label of the global batch (all micro-steps, all ranks): each micro-batch's
    # mean is weighted by its share of the labels, so padding and prompt lengths don't change an example's weight.
    # DDP averages gradients over ranks, hence the factor world_size.
    labels_in_step = loader.targets_in_step("train", step - 1)
    tokens = 0
    for micro_step in range(accum_steps):
        # (batch_size, seq_len) each; positions None, or where the examples of a packed batch start (data.py)
        x, y, positions = rt.to_device(loader.get_batch("train", step - 1, micro_step))
        require_grad_sync(model, micro_step == accum_steps - 1)  # DDP: all-reduce on the last micro-step only
        with rt.autocast():
            # no logits returned: they would outlive the step, and without them a CPU skips the rows with no target
            loss = model(x, y, positions=positions, return_logits=False)[1]
        loss = loss * ((y != IGNORE_INDEX).sum() * rt.world_size / labels_in_step)
        loss_sum += loss.detach()
        scaler.scale(loss).backward()
        tokens += x.numel() * rt.world_size
    if before_update is not None:
        before_update()
    grad_norm, skipped = optimizer_step(model, optimizer, scaler, grad_clip)
    return loss_sum, grad_norm, tokens, skipped


def get_lr(step, args):
    """Learning rate for update number `step` (1 to max_steps): linear warmup from 0 at step 0 to max_lr at
    warmup_steps, then cosine decay to min_lr at max_steps."""
    if step < args.warmup_steps:
        return args.max_lr * step / args.warmup_steps
    if step >= args.max_steps:
        return args.min_lr
    progress = (step - args.warmup_steps) / (args.max_steps - args.warmup_steps)
    return args.min_lr + 0.5 * (1.0 + math.cos(math.pi * progress)) * (args.max_lr - args.min_lr)

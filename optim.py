"""
The optimizers: which parameters each one trains (the parameter groups), AdamW alone or the AdamW/Muon pair, and the
update after a step's backward passes (unscale, clip, step, zero), with the GradScaler's state restored on resume.

    optimizer = build_optimizer(model, weight_decay=0.1, lr=4e-3, betas=(0.9, 0.99), optimizer="muon")
    ...backward passes...
    grad_norm = optimizer_step(model, optimizer, scaler, grad_clip=1.0)
"""

import sys

import torch
from torch.nn.parallel import DistributedDataParallel as DDP


def build_optimizer(model, weight_decay, lr, betas, optimizer="adamw", muon_lr=None, muon_momentum=0.9):
    """The optimizer, built after the model is on its device. "adamw": AdamW in two groups. Weight decay pulls
    weights toward 0: right for matrices and embeddings, which it keeps from growing; wrong for biases and
    LayerNorm gains, whose scale is meaningful. Those are exactly the 1-D parameters. The fused kernel (all
    parameters in a few launches instead of several per tensor) runs on CUDA and CPU tensors.
    "muon": Muon (torch.optim.Muon) on the blocks' weight matrices, whose updates it orthogonalises (every
    direction of the matrix moves as much: more learning per step than AdamW's), at muon_lr, with its update's
    RMS matched to AdamW's so that the two learning rates are on one scale; AdamW as above for the rest (the
    embeddings and tied head, which are lookups rather than transforms, biases and gains). Each group's
    "lr_scale" is its learning rate over lr, for the schedule to keep."""
    params = [p for p in model.parameters() if p.requires_grad]
    matrices = {id(p) for p in model.transformer.h.parameters() if p.dim() == 2} if optimizer == "muon" else set()
    fused = model.lm_head.weight.device.type in ("cuda", "cpu")
    adamw = torch.optim.AdamW([
        {"params": [p for p in params if p.dim() >= 2 and id(p) not in matrices], "weight_decay": weight_decay},
        {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0},
    ], lr=lr, betas=betas, fused=fused)
    for group in adamw.param_groups:
        group["lr_scale"] = 1.0
    if optimizer == "adamw":
        return adamw
    muon_lr = muon_lr or MUON_LR_SCALE * lr
    muon = torch.optim.Muon([p for p in params if id(p) in matrices], lr=muon_lr, weight_decay=weight_decay,
                            momentum=muon_momentum, adjust_lr_fn="match_rms_adamw")
    muon.param_groups[0]["lr_scale"] = muon_lr / lr
    return Optimizers(adamw=adamw, muon=muon)


# --optimizer muon's default learning rate for the Muon group, as a multiple of --max_lr (AdamW's): with the update
# RMS matched to AdamW's the two share a scale (README.md, the optimizer sweep)
MUON_LR_SCALE = 1.0


class Optimizers:
    """Several optimizers, each over its own parameters, as one: what the loop, the GradScaler, the schedule and
    checkpoints see. param_groups are all of theirs (the same dicts), state_dict() holds each one's by name."""

    def __init__(self, **optimizers):
        self.optimizers = optimizers

    @property
    def param_groups(self):
        return [group for optimizer in self.optimizers.values() for group in optimizer.param_groups]

    @property
    def state(self):
        return {p: s for optimizer in self.optimizers.values() for p, s in optimizer.state.items()}

    def step(self):
        for optimizer in self.optimizers.values():
            optimizer.step()

    def zero_grad(self, set_to_none=True):
        for optimizer in self.optimizers.values():
            optimizer.zero_grad(set_to_none=set_to_none)

    def register_step_pre_hook(self, hook):
        return [optimizer.register_step_pre_hook(hook) for optimizer in self.optimizers.values()]

    def state_dict(self):
        return {name: optimizer.state_dict() for name, optimizer in self.optimizers.items()}

    def load_state_dict(self, state_dict):
        if set(state_dict) != set(self.optimizers):
            raise ValueError(f"the saved optimizer state is not of {' + '.join(self.optimizers)}")
        for name, optimizer in self.optimizers.items():
            optimizer.load_state_dict(state_dict[name])


def restore_grad_scaler(scaler, saved, rt):
    """The GradScaler's saved state, where it applies: a run may resume in another dtype (--dtype auto on another
    GPU, or --dtype given anew). Into fp16 from bf16/fp32 (no saved scale), the loss scale starts afresh, as at the
    start of a run, and finds its level within a few steps; out of fp16, the scale is not needed."""
    if scaler.is_enabled() and not saved:
        if rt.master:
            print("--resume: the checkpoint was trained without fp16's loss scaling; it starts afresh", file=sys.stderr)
        return
    scaler.load_state_dict(saved)  # a disabled scaler ignores it


def optimizer_step(model, optimizer, scaler, grad_clip):
    """The update after a step's backward passes: gradients unscaled (fp16), clipped to grad_clip (0: not
    clipped), the optimizer's step, and the gradients zeroed. Returns the gradient norm before clipping."""
    scaler.unscale_(optimizer)
    # with clipping off, an infinite cap only measures the norm
    grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), grad_clip or float("inf"))
    if hasattr(grad_norm, "full_tensor"):  # FSDP: a DTensor, summed over the shards
        grad_norm = grad_norm.full_tensor()
    scaler.step(optimizer)
    scaler.update()
    # Under DDP the gradients are views into its communication buckets (gradient_as_bucket_view): zeroed in place
    # they stay there; set to None, the next backward would allocate new ones beside the buckets, every step.
    optimizer.zero_grad(set_to_none=not isinstance(model, DDP))
    return grad_norm

"""
The optimizers: which parameters each one trains (the parameter groups), AdamW alone or the AdamW/Muon pair, and the
update after a step's backward passes (unscale, clip, step, zero), with the GradScaler's state restored on resume.

    optimizer = build_optimizer(model, weight_decay=0.1, lr=4e-3, betas=(0.9, 0.99), optimizer="muon")
    ...backward passes...
    grad_norm, skipped = optimizer_step(model, optimizer, scaler, grad_clip=1.0)   # skipped: 1.0 if not applied
"""

import math
import sys

import torch
import torch.distributed as dist
from torch.distributed.tensor import DTensor, Shard
from torch.nn.parallel import DistributedDataParallel as DDP


def build_optimizer(model, weight_decay, lr, betas, optimizer="adamw", muon_lr=None, muon_momentum=0.9,
                    ns_dtype=torch.bfloat16):
    """The optimizer, built after the model is on its device (or sharded). "adamw": AdamW in two groups. Weight
    decay pulls weights toward 0: right for matrices and embeddings, which it keeps from growing; wrong for biases
    and LayerNorm gains, whose scale is meaningful. Those are exactly the 1-D parameters. The fused kernel (all
    parameters in a few launches instead of several per tensor) runs on CUDA and CPU tensors.
    "muon": Muon (below) on the blocks' weight matrices, whose updates it orthogonalises (every direction of the
    matrix moves as much: more learning per step than AdamW's), at muon_lr, with its update's RMS matched to
    AdamW's so that the two learning rates are on one scale, orthogonalised in ns_dtype; AdamW as above for the
    rest (the embeddings and tied head, which are lookups rather than transforms, biases and gains). Each group's
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
    muon = Muon([p for p in params if id(p) in matrices], lr=muon_lr, weight_decay=weight_decay,
                momentum=muon_momentum, ns_dtype=ns_dtype)
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


class Muon(torch.optim.Optimizer):
    """Muon (Keller Jordan's, as torch.optim.Muon computes it): momentum on the gradient, the Nesterov blend of the
    two orthogonalised by Newton-Schulz iterations, decoupled weight decay, a step whose RMS matches AdamW's. The
    same hyperparameters and state (a momentum_buffer per matrix) as torch.optim.Muon, so checkpoints of either
    load into the other; what it adds is where the work is done. Orthogonalising a matrix needs all of it, and
    costs far more than the rest of the update, so under torchrun each matrix is orthogonalised once for the whole
    job, on the rank that owns it (owners balanced by the work, assign_owners), and the results are shared:
    - replicated weights (DDP, or one process): every rank has every whole gradient; the owner orthogonalises, then
      broadcasts the result to the others, in the dtype it was computed in (the ranks stay bit-identical);
    - sharded weights (FSDP's DTensors, each rank a block of rows): the ranks send the owner their rows of the
      momentum-blended gradient, and the owner sends each rank back its rows of the result (two all-to-alls per
      step). The momentum stays sharded like the weights.
    ns_dtype: the precision of the iterations. PyTorch's Muon runs them in bf16, which is fast where the hardware
    multiplies bf16 (GPUs since Ampere, CPUs with AMX or AVX512-BF16) and many times slower than fp32 where it is
    emulated: parallel.build_training picks by what the device has. spread=False orthogonalises every matrix on
    every rank (PyTorch's way): the same result, for comparison."""

    def __init__(self, params, lr, weight_decay=0.1, momentum=0.95, nesterov=True,
                 ns_coefficients=(3.4445, -4.775, 2.0315), eps=1e-7, ns_steps=5, adjust_lr_fn="match_rms_adamw",
                 ns_dtype=torch.bfloat16, spread=True):
        super().__init__(params, dict(lr=lr, weight_decay=weight_decay, momentum=momentum, nesterov=nesterov,
                                      ns_coefficients=ns_coefficients, eps=eps, ns_steps=ns_steps,
                                      adjust_lr_fn=adjust_lr_fn))
        self.ns_dtype, self.spread = ns_dtype, spread
        self.orthogonalised = 0  # matrices this process has orthogonalised: its share of the job's work

    @torch.no_grad()
    def step(self, closure=None):
        # found_inf (optim.optimizer_step's, as GradScaler's for fused AdamW): a device tensor, 1.0 when this step's
        # gradient is not finite. The update is then multiplied by 0, on the device: no wait for it on the host
        found_inf = getattr(self, "found_inf", None)
        skip = None if found_inf is None else found_inf.bool()
        keep = 1.0 if found_inf is None else 1 - found_inf
        for group in self.param_groups:
            params = [p for p in group["params"] if p.grad is not None]
            if not params:
                continue
            # the group's factors, computed once for all of its matrices (device tensors when found_inf is one)
            blend, decay = (1 - group["momentum"]) * keep, 1 - group["lr"] * group["weight_decay"] * keep
            blended = [self.momentum_blend(p, group, skip, blend) for p in params]  # this rank's rows, under FSDP
            for p, update in zip(params, self.orthogonalise(params, blended, group)):
                weights = local_tensor(p)
                weights.mul_(decay)
                step_size = -adjusted_lr(group["lr"], group["adjust_lr_fn"], p.shape)
                if found_inf is None:
                    weights.add_(update, alpha=step_size)
                else:
                    weights.addcmul_(update.to(weights.dtype), keep, value=step_size)

    def momentum_blend(self, p, group, skip, blend):
        state = self.state[p]
        if "momentum_buffer" not in state:
            state["momentum_buffer"] = torch.zeros_like(p.grad)  # sharded like the gradient under FSDP
        buffer, grad = local_tensor(state["momentum_buffer"]), local_tensor(p.grad)
        if skip is not None:  # a skipped step's gradient (NaN, inf) must not reach the buffer, even times 0
            grad = torch.where(skip, 0.0, grad)
        buffer.lerp_(grad, blend)
        return grad.lerp(buffer, group["momentum"]) if group["nesterov"] else buffer

    def newton_schulz(self, update, group):
        self.orthogonalised += 1
        return newton_schulz(update, group["ns_coefficients"], group["ns_steps"], group["eps"], self.ns_dtype)

    def orthogonalise(self, params, blended, group):
        """The orthogonalised updates, in the order of params: whole matrices, or this rank's rows of them."""
        if params and isinstance(params[0], DTensor):
            return self.orthogonalise_sharded(params, blended, group)
        if not (self.spread and dist.is_initialized() and dist.get_world_size() > 1):
            return [self.newton_schulz(update, group) for update in blended]
        rank, world = dist.get_rank(), dist.get_world_size()
        owners = assign_owners([p.shape for p in params], world)
        results = [self.newton_schulz(u, group) if owner == rank else None for u, owner in zip(blended, owners)]
        for owner in range(world):
            mine = [i for i in range(len(params)) if owners[i] == owner]
            if not mine:
                continue
            if owner == rank:
                pieces = flat([results[i] for i in mine], self.ns_dtype, params[0].device)
            else:
                pieces = torch.empty(sum(params[i].numel() for i in mine), dtype=self.ns_dtype,
                                     device=params[0].device)
            dist.broadcast(pieces, src=owner)
            for i, piece in zip(mine, pieces.split([params[i].numel() for i in mine])):
                results[i] = piece.view(params[i].shape)
        return results

    def orthogonalise_sharded(self, params, blended, group):
        """FSDP: each rank holds a block of rows of each matrix (Shard(0)). Every rank sends each owner its rows of
        the owner's matrices (one all-to-all); the owners orthogonalise them whole; every rank gets its rows of the
        results back (a second all-to-all)."""
        for p in params:
            if p.placements != (Shard(0),):
                raise ValueError(f"Muon expects parameters sharded by rows (Shard(0)), not {p.placements}")
        process_group = params[0].device_mesh.get_group()
        rank, world = dist.get_rank(process_group), dist.get_world_size(process_group)
        owners = assign_owners([p.shape for p in params], world)
        rows = [shard_rows(p.shape[0], world) for p in params]  # rows[i][r]: rank r's rows of matrix i
        owned_by = [[i for i in range(len(params)) if owners[i] == r] for r in range(world)]
        mine = owned_by[rank]
        device = blended[0].device if blended else params[0].device

        def piece_sizes(matrices, r):  # the elements of rank r's rows of these matrices
            return [rows[i][r] * params[i].shape[1] for i in matrices]

        # there: my rows of each owner's matrices, to the owner
        sent = [sum(piece_sizes(owned_by[r], rank)) for r in range(world)]
        received = [sum(piece_sizes(mine, r)) for r in range(world)]
        inbox = torch.empty(sum(received), dtype=blended[0].dtype, device=device)
        dist.all_to_all_single(inbox, flat([blended[i] for r in range(world) for i in owned_by[r]], blended[0].dtype,
                                           device), received, sent, group=process_group)
        from_rank = [part.split(piece_sizes(mine, r)) for r, part in enumerate(inbox.split(received))]
        results = {}
        for k, i in enumerate(mine):
            whole = torch.cat([from_rank[r][k].view(rows[i][r], params[i].shape[1]) for r in range(world)])
            results[i] = self.newton_schulz(whole, group).split(rows[i])  # cut back into each rank's rows
        # back: each rank's rows of my results
        inbox = torch.empty(sum(sent), dtype=self.ns_dtype, device=device)
        dist.all_to_all_single(inbox, flat([results[i][r] for r in range(world) for i in mine], self.ns_dtype, device),
                               sent, received, group=process_group)
        updates = [None] * len(params)
        for r, part in enumerate(inbox.split(sent)):
            for i, piece in zip(owned_by[r], part.split(piece_sizes(owned_by[r], rank))):
                updates[i] = piece.view(rows[i][rank], params[i].shape[1])
        return updates


def newton_schulz(update, coefficients, steps, eps, dtype):
    """The update's orthogonalisation (about U V^T of its SVD U S V^T, with singular values near 1 rather than
    exactly), torch.optim.Muon's quintic iteration computed in `dtype`. Works on the wide orientation (rows <=
    columns), where the Gram matrix X X^T is the smaller one."""
    a, b, c = coefficients
    x = update.to(dtype)
    tall = update.size(0) > update.size(1)
    if tall:
        x = x.T
    x = x / x.norm().clamp(min=eps)  # spectral norm at most 1
    for _ in range(steps):
        gram = x @ x.T
        x = torch.addmm(x, torch.addmm(gram, gram, gram, beta=b, alpha=c), x, beta=a)
    return x.T if tall else x


def adjusted_lr(lr, adjust_lr_fn, shape):
    """torch.optim.Muon's scaling of the learning rate by the matrix's shape. match_rms_adamw: an update whose RMS
    is AdamW's (0.2 sqrt(max(rows, columns)), Moonshot's "Muon is Scalable"); original: Keller Jordan's."""
    rows, columns = shape[:2]
    if adjust_lr_fn == "match_rms_adamw":
        return lr * 0.2 * math.sqrt(max(rows, columns))
    if adjust_lr_fn in (None, "original"):
        return lr * math.sqrt(max(1, rows / columns))
    return lr


def assign_owners(shapes, world):
    """The rank that orthogonalises each matrix: the costliest first, each to the rank with the least work so far
    (the same answer on every rank). A Newton-Schulz iteration on an m x n matrix (m <= n) costs about 4 m^2 n +
    2 m^3 multiply-adds."""
    costs = [4 * min(s) ** 2 * max(s) + 2 * min(s) ** 3 for s in shapes]
    owners, load = [0] * len(shapes), [0] * world
    for i in sorted(range(len(shapes)), key=lambda i: (-costs[i], i)):
        owners[i] = min(range(world), key=lambda r: (load[r], r))
        load[owners[i]] += costs[i]
    return owners


def shard_rows(n, world):
    """How many of n rows each of `world` ranks holds under Shard(0): torch.chunk's split (ceil(n / world) each,
    the last ranks fewer or none), as FSDP2 shards."""
    size = -(-n // world)
    return [max(0, min(size, n - r * size)) for r in range(world)]


def local_tensor(t):
    """This rank's part of a tensor: a DTensor's local shard (a view: writing to it writes the DTensor), or t."""
    return t.to_local() if isinstance(t, DTensor) else t


def flat(tensors, dtype, device):
    """The tensors' elements, one after another, in one 1-D tensor (an empty one for none)."""
    return torch.cat([t.flatten() for t in tensors]) if tensors else torch.empty(0, dtype=dtype, device=device)


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
    clipped), the optimizer's step, and the gradients zeroed. Returns the gradient norm before clipping, and
    `skipped`, 1.0 where the update was not applied: a gradient that is not finite (NaN or inf: a diverging run, or
    fp16's overflow) never reaches the weights or the optimizer's state, in any dtype. Both stay on the device: the
    optimizers read the flag there (fused AdamW's found_inf, as fp16's GradScaler uses it; Muon's own), so the step
    never waits for the device. Every rank sees the same norm (the gradients are reduced before it)."""
    scaler.unscale_(optimizer)
    # with clipping off, an infinite cap only measures the norm
    grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), grad_clip or float("inf"))
    if hasattr(grad_norm, "full_tensor"):  # FSDP: a DTensor, summed over the shards
        grad_norm = grad_norm.full_tensor()
    skipped = (~torch.isfinite(grad_norm)).float()
    for part in (optimizer.optimizers.values() if isinstance(optimizer, Optimizers) else [optimizer]):
        if isinstance(part, Muon) or part.defaults.get("fused"):
            part.grad_scale, part.found_inf = None, skipped
            part.step()
            del part.grad_scale, part.found_inf
        elif not skipped.item():  # (an optimizer that cannot read the flag: MPS's AdamW, unfused)
            part.step()
    scaler.update()  # fp16: a skipped step lowers the loss scale (unscale_ saw the same non-finite gradients)
    # Under DDP the gradients are views into its communication buckets (gradient_as_bucket_view): zeroed in place
    # they stay there; set to None, the next backward would allocate new ones beside the buckets, every step.
    optimizer.zero_grad(set_to_none=not isinstance(model, DDP))
    return grad_norm, skipped

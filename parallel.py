"""
Model parallelism: one model trained by the processes of a torchrun job. DDP keeps a whole copy of the model in each
process and averages the gradients during backward; FSDP2 (--fsdp) keeps 1/N of every parameter, gradient and
optimizer state in each and gathers a block's weights just before it runs. Checkpoints hold the full training state
either way (gathered to rank 0), so a run resumes with or without FSDP, on any number of processes.

    model, optimizer, scaler = build_training(GPT(config), rt, weight_decay=0.1, lr=4e-3, betas=(0.9, 0.99), ...)
    require_grad_sync(model, sync=last_micro_step)     # before each micro-step's forward
    model_state, optimizer_state = training_state(raw_model, optimizer)   # every rank calls it; rank 0 gets them
"""

import torch
from torch.nn.parallel import DistributedDataParallel as DDP

import lora
from optim import Optimizers, build_optimizer, restore_grad_scaler


def build_training(model, rt, *, weight_decay, lr, betas, optimizer="adamw", muon_lr=None, muon_momentum=0.9,
                   compile=False, state=None, reduce_dtype="float32", fsdp=False, activation_checkpointing=False):
    """What a training step needs, built in the one order that works: the model on the device (sharded over the
    ranks with fsdp), its optimizer (built on the device's parameters, or their shards) and GradScaler, their
    states restored from a checkpoint's `state` when given, then the model compiled if asked and, under torchrun
    without fsdp, wrapped in DDP. Gradients cross the network in reduce_dtype. Returns (step_model, optimizer,
    scaler): step_model is what the step calls; `model` itself (unwrapped; sharded in place by fsdp) is what
    checkpoints save and samples use. The optimizer is optim.build_optimizer's. train.py and bench.py both
    build through here."""
    model.activation_checkpointing = activation_checkpointing
    if fsdp:
        shard_model(model, rt, reduce_dtype)
    else:
        model.to(rt.device)
    # Muon's orthogonalisation in bf16 on GPUs that multiply bf16 natively, else in fp32: a CPU without bf16 units
    # emulates it many times slower, and one with them (oneDNN's bf16 kernels on an AMX Xeon) gave a second identical
    # run in the same process other last bits one time in four, which bf16's rounding makes visible in the losses;
    # fp32's costs gpt2-micro 11 ms a step more there (49 ms against 37), and its runs repeat bit for bit
    ns_dtype = torch.bfloat16 if rt.native_bf16 and rt.device_type == "cuda" else torch.float32
    optimizer = build_optimizer(model, weight_decay, lr, betas, optimizer, muon_lr, muon_momentum, ns_dtype=ns_dtype)
    scaler = rt.grad_scaler()
    if state is not None:
        load_training_state(model, optimizer, state["model"], state["optimizer"])
        restore_grad_scaler(scaler, state.get("scaler") or {}, rt)
    step_model = torch.compile(model) if compile else model
    if rt.ddp and not fsdp:
        # gradients live in DDP's communication buckets: no copy between the two, less memory
        step_model = DDP(step_model, device_ids=[torch.device(rt.device)] if rt.device_type == "cuda" else None,
                         gradient_as_bucket_view=True)
        if reduce_dtype == "bfloat16":
            step_model.register_comm_hook(None, bf16_gradient_hook)
    return step_model, optimizer, scaler


def shard_model(model, rt, reduce_dtype):
    """FSDP2: each rank keeps 1/world_size of every parameter, of its gradient and of its optimizer state, and
    gathers a block's full weights just before the block runs (forward and backward), freeing them after. Each
    block is one unit of gathering; the root takes the rest (embeddings, final LayerNorm, and the head, which is the
    token embedding: one parameter, one unit). On GPUs the gathered weights are in the autocast dtype (half the
    traffic and memory); the gradients are reduced in reduce_dtype and kept in fp32, like the weights' shards."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    mesh = init_device_mesh(rt.device_type, (rt.world_size,))
    low_precision = rt.device_type == "cuda" and rt.dtype != torch.float32
    policy = MixedPrecisionPolicy(param_dtype=rt.dtype if low_precision else None,
                                  reduce_dtype=getattr(torch, reduce_dtype))
    for block in model.transformer.h:
        fully_shard(block, mesh=mesh, mp_policy=policy)
    fully_shard(model, mesh=mesh, mp_policy=policy)  # moves the shards to the device


def is_sharded(model):
    from torch.distributed.fsdp import FSDPModule

    return isinstance(getattr(model, "_orig_mod", model), FSDPModule)  # (compiled, the module is _orig_mod)


def require_grad_sync(model, sync):
    """Whether the next backward pass reduces the gradients over the ranks. DDP and FSDP do it during backward;
    between the micro-steps of one optimizer step that is wasted traffic, so only the last one syncs (FSDP then
    keeps the micro-steps' gradients unsharded until it). DDP reads its flag in forward: set it before."""
    if is_sharded(model):
        getattr(model, "_orig_mod", model).set_requires_gradient_sync(sync)
    elif isinstance(model, DDP):
        model.require_backward_grad_sync = sync


def training_state(model, optimizer):
    """The model's and the optimizer's state dicts as checkpoints hold them: full tensors, each optimizer's state
    keyed by position (torch.optim's own layout; an Optimizers pair holds one such dict per optimizer). A sharded
    model's are gathered to rank 0's CPU, one tensor at a time (a collective: every rank calls this; the others get
    empty dicts). A model with LoRA adapters (never sharded: train.py refuses --fsdp with them) gives the adapters'
    tensors alone: the base is frozen, and the checkpoint records where it comes from instead."""
    if lora.adapted(model):
        return lora.adapter_state_dict(model), optimizer.state_dict()
    if not is_sharded(model):
        return model.state_dict(), optimizer.state_dict()
    from torch.distributed.checkpoint.state_dict import (StateDictOptions, get_model_state_dict,
                                                         get_optimizer_state_dict)

    options = StateDictOptions(full_state_dict=True, cpu_offload=True)
    # the model's first: it reshards what an evaluation's forward left gathered (the root's weights), so that the
    # model's parameters are again the sharded ones the optimizer holds
    model_state = get_model_state_dict(model, options=options)
    states = {name: by_position(get_optimizer_state_dict(model, part, options=options))
              for name, part in optimizer_parts(optimizer).items()}
    return model_state, states if None not in states else states[None]


def load_training_state(model, optimizer, model_state, optimizer_state):
    """training_state's dicts back into the model and its optimizer, sharded or not: a checkpoint resumes with or
    without FSDP, on any number of processes. A model with LoRA adapters loads them alone (its base is loaded
    already)."""
    if lora.adapted(model):
        lora.load_adapter_state_dict(model, model_state)
        optimizer.load_state_dict(optimizer_state)
        return
    if not is_sharded(model):
        model.load_state_dict(model_state)
        optimizer.load_state_dict(optimizer_state)
        return
    from torch.distributed.checkpoint.state_dict import (StateDictOptions, set_model_state_dict,
                                                         set_optimizer_state_dict)

    options = StateDictOptions(full_state_dict=True)
    set_model_state_dict(model, model_state, options=options)
    parts = optimizer_parts(optimizer)
    saved = {None: optimizer_state} if None in parts else optimizer_state
    if set(saved) != set(parts):
        raise ValueError(f"the saved optimizer state is not of {' + '.join(map(str, parts))}")
    name_of = {id(p): name for name, p in model.named_parameters()}
    for name, part in parts.items():
        names = [name_of[id(p)] for group in part.param_groups for p in group["params"]]
        by_name = {"state": {names[i]: s for i, s in saved[name]["state"].items()},
                   "param_groups": [{**g, "params": [names[i] for i in g["params"]]}
                                    for g in saved[name]["param_groups"]]}
        set_optimizer_state_dict(model, part, by_name, options=options)


def optimizer_parts(optimizer):
    """The torch.optim optimizers in optimizer, by name: an Optimizers pair's, or {None: optimizer}."""
    return optimizer.optimizers if isinstance(optimizer, Optimizers) else {None: optimizer}


def by_position(by_name):
    """An optimizer state dict keyed by parameter names (PyTorch's distributed checkpointing) keyed by positions
    instead (torch.optim's own layout, as an unsharded model's optimizer writes it)."""
    if not by_name:  # (ranks other than 0)
        return by_name
    names = [name for group in by_name["param_groups"] for name in group["params"]]
    position = {name: i for i, name in enumerate(names)}
    return {"state": {position[name]: s for name, s in by_name["state"].items()},
            "param_groups": [{**g, "params": [position[n] for n in g["params"]]} for g in by_name["param_groups"]]}


def bf16_gradient_hook(process_group, bucket) -> torch.futures.Future[torch.Tensor]:
    """DDP's all-reduce of a bucket of gradients in bf16: half the bytes on the wire. Each rank's gradients are
    rounded to bf16 and divided by the number of ranks, summed in bf16, and copied back into the fp32 gradients (the
    optimizer and its state stay fp32). PyTorch's own bf16_compress_hook, called from a hook of another name: DDP
    accepts that name only with NCCL, and the hook works as well on gloo."""
    from torch.distributed.algorithms.ddp_comm_hooks.default_hooks import bf16_compress_hook

    return bf16_compress_hook(process_group, bucket)

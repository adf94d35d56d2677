"""
LoRA adapters (Hu et al., 2021): fine-tuning that trains a low-rank correction to each adapted projection instead of
its weights. The base model stays frozen; each adapted nn.Linear computes

    base(x) + B(A(dropout(x))) * alpha / rank        A: (rank, in), B: (out, rank), B zero at the start

so a fresh adapter changes nothing, and training moves rank * (in + out) numbers per projection instead of in * out.

    add_adapters(model, rank=8, alpha=16, dropout=0.05, targets="all")   # the base frozen, the adapters trainable
    cast_base(model, torch.bfloat16)          # optional: the frozen base in half the memory, the adapters in fp32
    adapter_state_dict(model) / load_adapter_state_dict(model, state)    # what a LoRA checkpoint holds
    merge_adapters(model)                     # back to a plain GPT with W + B @ A * alpha / rank in each weight
    save_peft(model, directory, "gpt2")       # the adapters as PEFT's adapter directory, for transformers + peft

The base's parameter names do not change (transformer.h.0.attn.c_attn.weight): checkpoints, hf.py and the
optimizer's groups read them. The adapters' are PEFT's without its adapter name (....c_attn.lora_A.weight). Problems
raise ValueError with one line to show.
"""

import json
import math
import os

import torch
import torch.nn as nn

# The projections an adapter can go on, by their names inside a block. The tied output layer is not one: it is the
# token embedding, and an adapter on it would be a second, untied head.
TARGETS = ("attn.c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj")
# What --lora_targets accepts, comma-separated (the union): groups, the full names, and the short names PEFT users
# write for GPT-2 ("c_proj" is both projections, as PEFT's suffix match reads it)
TARGET_NAMES = {
    "all": TARGETS,
    "attn": ("attn.c_attn", "attn.c_proj"),
    "mlp": ("mlp.c_fc", "mlp.c_proj"),
    **{name: (name,) for name in TARGETS},
    "c_attn": ("attn.c_attn",),
    "c_fc": ("mlp.c_fc",),
    "c_proj": ("attn.c_proj", "mlp.c_proj"),
}
# the prefix PEFT gives every key of adapter_model.safetensors (its PeftModel around transformers' model)
PEFT_PREFIX = "base_model.model."


def parse_targets(value):
    """The projections named by value, "attn,mlp" or a list of names (see TARGET_NAMES), as a tuple in TARGETS'
    order. An unknown or empty name raises ValueError listing the valid ones."""
    names = value.split(",") if isinstance(value, str) else list(value)
    chosen = set()
    for name in names:
        name = name.strip()
        if name not in TARGET_NAMES:
            raise ValueError(f"unknown LoRA target {name!r}: choose from {', '.join(TARGET_NAMES)} "
                             f"(comma-separated, e.g. attn,mlp.c_fc)")
        chosen.update(TARGET_NAMES[name])
    return tuple(t for t in TARGETS if t in chosen)


class LoRALinear(nn.Linear):
    """An nn.Linear plus a low-rank adapter. It takes over the base's weight and bias Parameters (their names stay
    weight and bias; the same tensors, not copies), frozen; lora_A and lora_B are nn.Linears without bias, as PEFT
    keeps them, so their state dict keys are PEFT's. The adapters are float32 whatever the base's dtype: they are
    what the optimizer steps, and bf16 would round away updates smaller than 1/256 of a weight."""

    def __init__(self, base, rank, alpha, dropout):
        # on the meta device: nn.Linear's own weight and bias would only be thrown away for the base's
        super().__init__(base.in_features, base.out_features, bias=base.bias is not None, device="meta")
        self.weight, self.bias = base.weight, base.bias
        if getattr(base, "RESIDUAL_PROJECTION", False):  # (GPT._init_weights's mark, kept for merge_adapters)
            self.RESIDUAL_PROJECTION = True
        device = base.weight.device
        self.lora_A = nn.Linear(base.in_features, rank, bias=False, device=device, dtype=torch.float32)
        self.lora_B = nn.Linear(rank, base.out_features, bias=False, device=device, dtype=torch.float32)
        # PEFT's (and the LoRA paper's) initialisation: A as nn.Linear's default, B zero, so B @ A starts at 0
        nn.init.kaiming_uniform_(self.lora_A.weight, a=math.sqrt(5))
        nn.init.zeros_(self.lora_B.weight)
        self.lora_dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.rank, self.alpha = rank, alpha
        self.scaling = alpha / rank  # (PEFT's use_rslora=False; alpha / sqrt(rank) with rslora)

    def forward(self, x):
        # A first: (tokens, in) -> (tokens, rank) -> (tokens, out) costs rank * (in + out) a token, never in * out
        return super().forward(x) + self.lora_B(self.lora_A(self.lora_dropout(x))) * self.scaling

    def extra_repr(self):
        return f"{super().extra_repr()}, rank={self.rank}, alpha={self.alpha}"


def adapted(model):
    """{name: LoRALinear} of the model's adapted projections, in the model's order."""
    return {name: m for name, m in model.named_modules() if isinstance(m, LoRALinear)}


def add_adapters(model, rank, alpha, dropout=0.0, targets="all"):
    """Put an adapter of this rank on each projection of every block that targets names (parse_targets), and freeze
    every parameter of the base: only the adapters train. In place, on the device of the base's weights. Refuses
    (ValueError) a model that has adapters already, a rank outside 1..min(in, out) of the smallest target (a larger
    one adds parameters and no expressiveness), an alpha that is not positive, a dropout outside [0, 1)."""
    targets = parse_targets(targets)
    if adapted(model):
        raise ValueError("the model has LoRA adapters already: merge_adapters first, or load its adapter state")
    if not isinstance(rank, int) or rank < 1:
        raise ValueError(f"LoRA rank must be a whole number of at least 1, got {rank}")
    if not alpha > 0:
        raise ValueError(f"LoRA alpha must be positive, got {alpha} (the adapters' output is scaled by alpha / rank)")
    if not 0 <= dropout < 1:
        raise ValueError(f"LoRA dropout must be in [0, 1), got {dropout}")
    chosen = {name: m for name, m in model.named_modules() if target_of(name) in targets}
    smallest = min(chosen, key=lambda name: min(chosen[name].in_features, chosen[name].out_features))
    most = min(chosen[smallest].in_features, chosen[smallest].out_features)
    if rank > most:
        raise ValueError(f"LoRA rank {rank} is larger than {smallest} allows ({chosen[smallest].in_features} in, "
                         f"{chosen[smallest].out_features} out): choose a rank from 1 to {most}")
    for p in model.parameters():  # the tied head is the token embedding: one Parameter, frozen once
        p.requires_grad_(False)
    for name, module in chosen.items():
        parent, child = name.rsplit(".", 1)
        setattr(model.get_submodule(parent), child, LoRALinear(module, rank, alpha, dropout))


def target_of(name):
    """"attn.c_attn" for the module name "transformer.h.3.attn.c_attn": its name inside its block (else None)."""
    parts = name.split(".", 3)
    return parts[3] if len(parts) == 4 and parts[:2] == ["transformer", "h"] else None


def adapter_settings(model):
    """{"rank", "alpha", "dropout", "targets"} of the model's adapters (add_adapters(model, **settings) makes
    the same ones on another copy of the base), or None for a model without adapters."""
    modules = adapted(model)
    if not modules:
        return None
    first = next(iter(modules.values()))
    dropout = first.lora_dropout.p if isinstance(first.lora_dropout, nn.Dropout) else 0.0
    names = {target_of(name) for name in modules}
    return {"rank": first.rank, "alpha": first.alpha, "dropout": dropout,
            "targets": [t for t in TARGETS if t in names]}


def adapter_count(cfg, rank, targets="all"):
    """The adapters' parameters that add_adapters(GPT(cfg), rank, targets=targets) adds, without building it:
    rank * (in + out) for each adapted projection of each block."""
    d = cfg.n_embd
    sides = {"attn.c_attn": d + 3 * d, "attn.c_proj": d + d, "mlp.c_fc": d + 4 * d, "mlp.c_proj": 4 * d + d}
    return cfg.n_layer * rank * sum(sides[t] for t in parse_targets(targets))


def cast_base(model, dtype):
    """Keep the frozen weight matrices of the blocks in dtype (bf16 for a bf16 run): half the base's memory, and
    under autocast no cast of each frozen weight in every forward (autocast caches the casts of trainable
    weights only). The adapters stay float32. For use under torch.autocast of that dtype: outside it, a float32
    input does not multiply a bf16 weight.

    Not cast: the embeddings, whose output is the residual stream (bf16 embeddings would make the whole stream bf16,
    every block's output rounded to 8 bits where a float32 base keeps it float32); the token embedding is also the
    tied output layer, one Parameter, so it stays float32 for both. Nor the biases and LayerNorm gains: a
    thousandth of the memory, and autocast runs LayerNorm in float32 anyway. The blocks' matrices are most of the
    model (68% of gpt2's parameters, 95% of gpt2-xl's)."""
    if not adapted(model):
        raise ValueError("cast_base is for the frozen base of an adapted model: add_adapters first")
    for module in model.transformer.h.modules():
        if isinstance(module, nn.Linear) and not module.weight.requires_grad:
            module.weight.data = module.weight.data.to(dtype)


def adapter_state_dict(model):
    """The adapters' tensors by name (....c_attn.lora_A.weight), and nothing of the base: what a LoRA checkpoint
    holds. The model's own (compiled or DDP-wrapped models: pass the module inside)."""
    return {name: tensor for name, tensor in model.state_dict().items() if is_adapter_key(name)}


def is_adapter_key(name):
    return ".lora_A." in name or ".lora_B." in name


def load_adapter_state_dict(model, state):
    """adapter_state_dict's tensors back into a model with the same adapters (add_adapters with the settings they
    were saved with). A key missing or unexpected, or a tensor of another shape, raises ValueError naming it."""
    params = {name: p for name, p in model.named_parameters() if is_adapter_key(name)}
    missing, unexpected = sorted(set(params) - set(state)), sorted(set(state) - set(params))
    if missing:
        raise ValueError(f"the adapter state has no {missing[0]}"
                         f"{f' (and {len(missing) - 1} more missing)' if len(missing) > 1 else ''}: it was saved "
                         f"with other LoRA targets or another number of layers")
    if unexpected:
        raise ValueError(f"the adapter state has {unexpected[0]}, which the model has no adapter for"
                         f"{f' (and {len(unexpected) - 1} more)' if len(unexpected) > 1 else ''}: it was saved with "
                         f"other LoRA targets or another number of layers")
    for name, p in params.items():
        if state[name].shape != p.shape:
            raise ValueError(f"the adapter state's {name} has shape {tuple(state[name].shape)}, the model's "
                             f"{tuple(p.shape)}: it was saved with another LoRA rank or model")
    with torch.no_grad():
        for name, p in params.items():
            p.copy_(state[name])


def merge_adapters(model):
    """Fold each adapter into its base weight, W + (B @ A) * alpha / rank (computed in float32, stored in W's
    dtype: a float32 base stays exact to float32 rounding), and put plain nn.Linears back, every parameter
    trainable again: the model is a plain GPT, its state dict the base's keys (hf.save_pretrained, checkpoints)."""
    with torch.no_grad():
        for name, module in adapted(model).items():
            delta = (module.lora_B.weight.float() @ module.lora_A.weight.float()) * module.scaling
            module.weight.copy_(module.weight.float() + delta)
            plain = nn.Linear(module.in_features, module.out_features, bias=module.bias is not None, device="meta")
            plain.weight, plain.bias = module.weight, module.bias
            if getattr(module, "RESIDUAL_PROJECTION", False):
                plain.RESIDUAL_PROJECTION = True
            parent, child = name.rsplit(".", 1)
            setattr(model.get_submodule(parent), child, plain)
    for p in model.parameters():
        p.requires_grad_(True)


def base_checksum(model):
    """The CRC32 (checkpoint.checksum) of the base's tensors, the adapters left out: what a LoRA checkpoint
    records of the base it was trained on, and what loading it checks the base against, so that adapters are never
    silently put on other weights. Over the float32 base as loaded (checkpoint.load_model and hf.from_pretrained
    give float32): a base cast to another dtype is refused rather than given another checksum, so compute it
    before cast_base, at save and at load alike. Adapters, and whether they are merged, do not change it."""
    import checkpoint  # here, not at the top: checkpoint.py imports this module to load LoRA checkpoints

    base = {name: t for name, t in model.state_dict().items() if not is_adapter_key(name)}
    cast = next((name for name, t in base.items() if t.is_floating_point() and t.dtype != torch.float32), None)
    if cast:
        raise ValueError(f"base_checksum is over the float32 base, and {cast} is {base[cast].dtype}: compute it "
                         f"before cast_base")
    return checkpoint.checksum(base)


def save_peft(model, directory, base_name_or_path):
    """The adapters as a PEFT adapter directory: adapter_config.json and adapter_model.safetensors, which
    peft.PeftModel.from_pretrained(GPT2LMHeadModel.from_pretrained(base), directory) loads onto the base as
    transformers has it (the weights hf.save_pretrained writes, or OpenAI's by hub name). base_name_or_path is
    recorded for peft's AutoPeftModelForCausalLM, which loads the base from there. The directory must be empty or
    absent (created): old files would mix with these. Written in place: for all or nothing, write into a fresh
    directory and rename it (export.write_whole)."""
    settings = adapter_settings(model)
    if settings is None:
        raise ValueError("the model has no LoRA adapters to save")
    if os.path.exists(directory) and (not os.path.isdir(directory) or os.listdir(directory)):
        raise ValueError(f"{directory} already exists and is not an empty directory: choose another")
    try:
        from safetensors.torch import save
    except ImportError:
        raise ValueError("writing PEFT adapters needs safetensors: pip install safetensors")
    # Transformers' GPT-2 keeps its projections as Conv1D, weight (in, out), and PEFT wraps those with
    # fan_in_fan_out=True; its lora_A and lora_B are nn.Linear(in, rank) and nn.Linear(rank, out) all the same,
    # so our tensors are its tensors, untransposed. The keys: PEFT's prefix, then transformers' module names
    # (ours), then lora_A.weight without PEFT's adapter name (which it inserts when loading).
    tensors = {PEFT_PREFIX + name: t.detach().float().cpu().contiguous()
               for name, t in adapter_state_dict(model).items()}
    config = {
        "peft_type": "LORA", "task_type": "CAUSAL_LM", "base_model_name_or_path": base_name_or_path,
        "inference_mode": True,
        "r": settings["rank"], "lora_alpha": settings["alpha"], "lora_dropout": settings["dropout"],
        # full names: PEFT matches a target by suffix, so "mlp.c_proj" is that projection alone
        "target_modules": settings["targets"],
        "fan_in_fan_out": True, "bias": "none", "use_rslora": False, "use_dora": False,
        "init_lora_weights": True, "modules_to_save": None,
    }
    os.makedirs(directory, exist_ok=True)
    # serialised in memory (adapters are megabytes), written with open(): a full disk is an ordinary OSError, and
    # the file gets the umask's mode like every other file (safetensors' save_file writes 0600)
    with open(os.path.join(directory, "adapter_model.safetensors"), "wb") as f:
        f.write(save(tensors, metadata={"format": "pt"}))
    with open(os.path.join(directory, "adapter_config.json"), "w") as f:
        json.dump(config, f, indent=2)

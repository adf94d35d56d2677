"""
The GPT-2 model, its generation (with a KV cache) and the Hugging Face weight format: no knowledge of flags, runs or
checkpoints (train.py has those).

The module layout and parameter names follow OpenAI's GPT-2 (as laid out by Hugging Face's GPT2LMHeadModel, minus
the `transformer.` prefix quirks), so released weights load into it without changing the module:
token + learned position embeddings -> n_layer pre-LayerNorm blocks (attention, then a 4x GELU MLP, each added
to the residual stream) -> final LayerNorm -> a linear head that shares its weight with the token embedding.
"""

import json
import math
import os
import re
from dataclasses import dataclass, replace

import torch
import torch.nn as nn
import torch.nn.functional as F


@dataclass
class GPTConfig:
    block_size: int = 1024  # the model's context: the longest sequence it has position embeddings for
    vocab_size: int = 50257  # GPT-2's BPE vocabulary: 50,000 merges + 256 bytes + <|endoftext|>
    n_layer: int = 12
    n_head: int = 12
    n_embd: int = 768
    dropout: float = 0.0  # 0 for pretraining (GPT-2 used 0.1; modern runs of this size see no gain)
    bias: bool = True  # GPT-2 has biases in every Linear and LayerNorm

    def __post_init__(self):
        for name in ("block_size", "vocab_size", "n_layer", "n_head", "n_embd"):
            if getattr(self, name) <= 0:
                raise ValueError(f"{name} must be positive, got {getattr(self, name)}")
        if self.n_embd % self.n_head != 0:
            raise ValueError(f"n_embd ({self.n_embd}) must be divisible by n_head ({self.n_head})")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {self.dropout}")


# The four released GPT-2 sizes, and smaller ones that train in minutes on a laptop CPU. The small ones keep GPT-2's
# vocabulary, so with them most of the compute is the 50257-way output layer: width buys more than depth there.
PRESETS = {
    "gpt2": dict(n_layer=12, n_head=12, n_embd=768, block_size=1024),  # 124M
    "gpt2-medium": dict(n_layer=24, n_head=16, n_embd=1024, block_size=1024),  # 350M
    "gpt2-large": dict(n_layer=36, n_head=20, n_embd=1280, block_size=1024),  # 774M
    "gpt2-xl": dict(n_layer=48, n_head=25, n_embd=1600, block_size=1024),  # 1558M
    "gpt2-mini": dict(n_layer=6, n_head=6, n_embd=384, block_size=256),  # 30M, 19M of it the embedding
    "gpt2-micro": dict(n_layer=4, n_head=6, n_embd=192, block_size=256),  # 11.5M, 9.7M of it the embedding
    "gpt2-nano": dict(n_layer=2, n_head=2, n_embd=32, block_size=64),  # for tests
}


class CausalSelfAttention(nn.Module):
    def __init__(self, config, layer_index):
        super().__init__()
        self.n_head = config.n_head
        self.layer_index = layer_index  # which slot of a KVCache holds this layer's keys and values
        self.dropout = config.dropout
        self.c_attn = nn.Linear(config.n_embd, 3 * config.n_embd, bias=config.bias)  # q, k, v in one matmul
        self.c_proj = nn.Linear(config.n_embd, config.n_embd, bias=config.bias)
        self.c_proj.RESIDUAL_PROJECTION = True  # see GPT._init_weights
        self.resid_dropout = nn.Dropout(config.dropout)

    def forward(self, x, cache=None):
        B, T, C = x.shape
        q, k, v = self.c_attn(x).split(C, dim=2)
        # (B, T, C) -> (B, n_head, T, head_size): each head attends on its own slice of the channels
        q, k, v = (t.view(B, T, self.n_head, C // self.n_head).transpose(1, 2) for t in (q, k, v))
        past = 0 if cache is None else cache.length
        if cache is not None:  # generation: attend to the keys and values of every earlier position too
            k, v = cache.update(self.layer_index, k, v)
        if past == 0 or T == 1:
            # is_causal lets PyTorch pick a fused kernel (flash attention on GPU) that never materialises a T x T
            # mask; one new query after cached positions may see all of them, so it needs no mask at all
            mask, is_causal = None, past == 0
        else:  # several new queries after cached ones: query i sits at position past + i
            positions = torch.arange(past + T, device=x.device)
            mask, is_causal = positions <= positions[past:, None], False
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=is_causal,
                                           dropout_p=self.dropout if self.training else 0.0)
        y = y.transpose(1, 2).contiguous().view(B, T, C)
        return self.resid_dropout(self.c_proj(y))


class CrossEntropy(torch.autograd.Function):
    """F.cross_entropy(logits, targets, ignore_index=-100), faster where the vocabulary is large. PyTorch's keeps the
    log-softmax, then in backward fills a (rows, vocab) one-hot gradient and recomputes the exponentials from it;
    keeping the softmax instead makes the gradient, softmax - one_hot(target), one in-place pass. With GPT-2's 50,257
    tokens and a small model that is a sixth of the training step on a CPU. Loss: -log p(target), with p clamped to
    the smallest normal float (a loss of 87 at most: only a diverged model gets there)."""

    @staticmethod
    def forward(ctx, logits, targets):
        labelled = targets != -100
        safe_targets = targets.masked_fill(~labelled, 0)[:, None]
        probs = torch.softmax(logits, dim=-1)
        target_probs = probs.gather(1, safe_targets).squeeze(1).clamp_min(torch.finfo(probs.dtype).tiny)
        n_labelled = labelled.sum()
        ctx.save_for_backward(probs, safe_targets, labelled, n_labelled)
        return -(target_probs.log() * labelled).sum() / n_labelled

    @staticmethod
    def backward(ctx, grad_loss):
        probs, safe_targets, labelled, n_labelled = ctx.saved_tensors
        # the softmax is not needed again: it becomes the gradient in place (so backward runs once per forward)
        grad = probs.scatter_add_(1, safe_targets, -labelled[:, None].to(probs.dtype))
        return grad.mul_((grad_loss / n_labelled * labelled)[:, None].to(grad.dtype)), None


class KVCache:
    """The keys and values of the positions generated so far, so that each new token costs one position's work
    instead of the whole prefix's. Preallocated to the model's context on first use (no copy per token)."""

    def __init__(self, config):
        self.size = config.block_size
        self.keys = [None] * config.n_layer
        self.values = [None] * config.n_layer
        self.length = 0  # positions stored; GPT.forward advances it after all layers have written

    def update(self, layer, k, v):
        """Store the new keys and values (B, n_head, T, head_size) of one layer; return all of them so far."""
        if self.keys[layer] is None:
            B, H, _, D = k.shape
            self.keys[layer] = k.new_empty(B, H, self.size, D)
            self.values[layer] = v.new_empty(B, H, self.size, D)
        end = self.length + k.size(2)
        self.keys[layer][:, :, self.length : end] = k
        self.values[layer][:, :, self.length : end] = v
        return self.keys[layer][:, :, :end], self.values[layer][:, :, :end]


class MLP(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.c_fc = nn.Linear(config.n_embd, 4 * config.n_embd, bias=config.bias)
        self.c_proj = nn.Linear(4 * config.n_embd, config.n_embd, bias=config.bias)
        self.c_proj.RESIDUAL_PROJECTION = True
        self.dropout = nn.Dropout(config.dropout)

    def forward(self, x):
        # GPT-2 was trained with the tanh approximation of GELU; the exact erf form would change its outputs
        return self.dropout(self.c_proj(F.gelu(self.c_fc(x), approximate="tanh")))


class Block(nn.Module):
    def __init__(self, config, layer_index):
        super().__init__()
        self.ln_1 = nn.LayerNorm(config.n_embd, bias=config.bias)
        self.attn = CausalSelfAttention(config, layer_index)
        self.ln_2 = nn.LayerNorm(config.n_embd, bias=config.bias)
        self.mlp = MLP(config)

    def forward(self, x, cache=None):
        # pre-LayerNorm: the residual stream itself is never normalised, which keeps deep stacks trainable
        x = x + self.attn(self.ln_1(x), cache)
        x = x + self.mlp(self.ln_2(x))
        return x


class GPT(nn.Module):
    def __init__(self, config: GPTConfig):
        super().__init__()
        self.config = config
        self.transformer = nn.ModuleDict(
            dict(
                wte=nn.Embedding(config.vocab_size, config.n_embd),
                wpe=nn.Embedding(config.block_size, config.n_embd),
                drop=nn.Dropout(config.dropout),
                h=nn.ModuleList([Block(config, i) for i in range(config.n_layer)]),
                ln_f=nn.LayerNorm(config.n_embd, bias=config.bias),
            )
        )
        self.lm_head = nn.Linear(config.n_embd, config.vocab_size, bias=False)
        # Weight tying (as in GPT-2): the output layer scores each token by its similarity to the token's input
        # embedding. One Parameter, two uses: it saves vocab_size * n_embd parameters and both uses train it.
        self.lm_head.weight = self.transformer.wte.weight
        self.apply(self._init_weights)

    def _init_weights(self, module):
        if isinstance(module, nn.Linear):
            std = 0.02
            if getattr(module, "RESIDUAL_PROJECTION", False):
                # Each block adds two projections to the residual stream, so its variance grows with depth;
                # GPT-2 scales these initial weights by 1/sqrt(2 * n_layer) to keep it constant.
                std *= (2 * self.config.n_layer) ** -0.5
            nn.init.normal_(module.weight, mean=0.0, std=std)
            if module.bias is not None:
                nn.init.zeros_(module.bias)
        elif isinstance(module, nn.Embedding):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)

    def forward(self, idx, targets=None, cache=None):
        """idx: (B, T) token ids. With targets (B, T), returns (logits, mean cross-entropy over targets != -100).
        Without, returns (logits of the last position only, None): all that generation needs, at 1/T of the cost.
        With a KVCache, idx continues the positions already in it, and their keys and values are reused."""
        B, T = idx.shape
        past = 0 if cache is None else cache.length
        if past + T > self.config.block_size:
            raise ValueError(f"sequence of length {past + T} is longer than the model's context "
                             f"({self.config.block_size})")
        pos = torch.arange(past, past + T, dtype=torch.long, device=idx.device)
        x = self.transformer.drop(self.transformer.wte(idx) + self.transformer.wpe(pos))
        for block in self.transformer.h:
            x = block(x, cache)
        if cache is not None:
            cache.length += T
        x = self.transformer.ln_f(x)
        if targets is None:
            return self.output_layer(x[:, [-1], :]), None
        logits = self.output_layer(x)
        # float() so the softmax is in fp32 even under autocast; -100 marks positions with nothing to predict
        loss = CrossEntropy.apply(logits.float().reshape(-1, logits.size(-1)), targets.view(-1))
        return logits, loss

    def output_layer(self, x):
        """lm_head(x). On a GPU, tensor cores need matrix sizes that are multiples of 8 (and are fastest at 64),
        and GPT-2's 50,257 is odd: the matmul runs with the weight padded by zero rows to a multiple of 64 and the
        logits are sliced back, so the parameter, the checkpoints and the exported weights keep 50,257 rows. The
        padded copy costs microseconds on a GPU; CPUs gain nothing from it (bench.py), so they skip it. On a CPU in
        fp32 the product goes through oneDNN instead (see OneDNNLinear)."""
        if x.is_cuda:
            return padded_linear(x, self.lm_head.weight, multiple=64)
        # (under autocast the matmul runs in bf16 anyway; under torch.compile, inductor picks its own kernels)
        if (ONEDNN_LINEAR is not None and x.device.type == "cpu" and x.dtype == torch.float32
                and not torch.is_autocast_enabled("cpu") and not torch.compiler.is_compiling()):
            return OneDNNLinear.apply(x, self.lm_head.weight)
        return self.lm_head(x)

    def num_params(self, non_embedding=False):
        """Parameters, each counted once (the tied head is the token embedding). non_embedding drops both
        embeddings: what the per-token compute scales with, apart from the output layer."""
        n = sum(p.numel() for p in self.parameters())
        if non_embedding:
            n -= self.transformer.wte.weight.numel() + self.transformer.wpe.weight.numel()
        return n

    def flops_per_token(self, seq_len):
        """Training FLOPs (forward + backward) per token: 6 per matmul weight (the output layer included; embedding
        lookups, biases and LayerNorms are not matmuls), plus attention's QK^T and AV, 12 * n_layer * n_embd *
        seq_len (PaLM, appendix B, without its causal halving, as nanoGPT and most MFU figures count it)."""
        cfg = self.config
        matmul_weights = sum(m.weight.numel() for m in self.modules() if isinstance(m, nn.Linear))
        return 6 * matmul_weights + 12 * cfg.n_layer * cfg.n_embd * seq_len

    # ------------------------------------------------------------------------------------------------------------
    # Generation: one generator, which sample.py, train.py's end-of-run sample and the tests all use.

    @torch.no_grad()
    def generate_stream(self, idx, max_new_tokens, temperature=1.0, top_k=None, top_p=None, generator=None,
                        stop_token=None, use_cache=True):
        """Yield the next token of each row, (B, 1), max_new_tokens times, continuing idx (B, T).

        temperature 0 is greedy; top_k keeps the k most likely tokens, top_p the fewest whose probability adds up to
        top_p (both may be given). Rows that have produced stop_token keep producing it, and the stream ends when
        all of them have. When the context is full, the window slides by half of it: the newest block_size // 2
        tokens are fed again at positions 0..(block_size // 2 - 1), since GPT-2's positions are absolute. The cache
        only saves work: with use_cache=False the same tokens come out, each one recomputing the whole window."""
        window = idx[:, -self.config.block_size :]
        cache = KVCache(self.config) if use_cache else None
        new_tokens = window  # what the model has not seen yet
        finished = torch.zeros(idx.size(0), 1, dtype=torch.bool, device=idx.device)
        for _ in range(max_new_tokens):
            logits, _ = self(new_tokens if use_cache else window, cache=cache)
            next_token = sample_next_token(logits[:, -1, :].float(), temperature, top_k, top_p, generator)
            if stop_token is not None:
                next_token = next_token.masked_fill(finished, stop_token)
                finished |= next_token == stop_token
            yield next_token
            if finished.all():
                return
            window = torch.cat([window, next_token], dim=1)
            new_tokens = next_token
            if window.size(1) > self.config.block_size:
                window = window[:, -(self.config.block_size // 2) :]
                new_tokens, cache = window, KVCache(self.config) if use_cache else None

    def generate(self, idx, max_new_tokens, **kwargs):
        """idx (B, T) extended by up to max_new_tokens tokens: generate_stream's, collected."""
        return torch.cat([idx, *self.generate_stream(idx, max_new_tokens, **kwargs)], dim=1)

    # ------------------------------------------------------------------------------------------------------------
    # The Hugging Face format: a directory with config.json and model.safetensors, as GPT2LMHeadModel reads and
    # writes it. Its Conv1D layers store Linear weights transposed, (in, out); ours are nn.Linear's (out, in).

    @classmethod
    def from_pretrained(cls, name_or_dir, dropout=0.0):
        """GPT-2 weights from a Hugging Face directory, or the hub names gpt2, gpt2-medium, gpt2-large and gpt2-xl
        (downloaded with huggingface_hub, or found in its cache). Problems raise ValueError with one line to show."""
        directory = name_or_dir if os.path.isdir(name_or_dir) else _download(name_or_dir)
        config_path = os.path.join(directory, "config.json")
        if not os.path.exists(config_path):
            raise ValueError(f"{directory} has no config.json: not a Hugging Face model directory")
        with open(config_path) as f:
            hf = json.load(f)
        config = replace(_config_from_hf(hf, directory), dropout=dropout)
        state = {}
        for key, tensor in _read_hf_weights(directory).items():
            key = key.removeprefix("transformer.")
            if key.endswith((".attn.bias", ".attn.masked_bias")) or key == "lm_head.weight":
                continue  # the causal-mask buffers of old transformers versions, and the tied head
            if key.endswith(HF_TRANSPOSED):
                tensor = tensor.t()
            state["transformer." + key] = tensor.float()
        if "transformer.wte.weight" in state:
            state["lm_head.weight"] = state["transformer.wte.weight"]
        model = cls(config)
        expected = set(model.state_dict())
        if set(state) != expected:
            missing, unexpected = sorted(expected - set(state)), sorted(set(state) - expected)
            raise ValueError(f"{directory} does not hold GPT-2 weights: "
                             f"{'missing ' + missing[0] if missing else 'unexpected ' + unexpected[0]} and "
                             f"{max(len(missing) + len(unexpected) - 1, 0)} more")
        for key, tensor in state.items():
            if tensor.shape != model.state_dict()[key].shape:
                raise ValueError(f"{directory}: {key} has shape {tuple(tensor.shape)}, config.json implies "
                                 f"{tuple(model.state_dict()[key].shape)}")
        model.load_state_dict(state)
        return model

    def save_pretrained(self, directory):
        """Write config.json and model.safetensors that transformers' GPT2LMHeadModel.from_pretrained loads."""
        try:
            from safetensors.torch import save_file
        except ImportError:
            raise ValueError("writing Hugging Face weights needs safetensors: pip install safetensors")
        cfg = self.config
        if not cfg.bias:
            raise ValueError("GPT-2 in the Hugging Face format has biases; a model with bias=False cannot be saved")
        tensors = {}
        for key, tensor in self.state_dict().items():
            if key == "lm_head.weight":
                continue  # tied: transformers rebuilds it from wte (safetensors refuses shared tensors anyway)
            tensor = tensor.detach().float().cpu()
            tensors[key] = (tensor.t() if key.endswith(HF_TRANSPOSED) else tensor).contiguous()
        hf_config = {
            "architectures": ["GPT2LMHeadModel"], "model_type": "gpt2", "vocab_size": cfg.vocab_size,
            "n_positions": cfg.block_size, "n_ctx": cfg.block_size, "n_embd": cfg.n_embd, "n_layer": cfg.n_layer,
            "n_head": cfg.n_head, "n_inner": None, "activation_function": "gelu_new", "layer_norm_epsilon": 1e-5,
            "resid_pdrop": cfg.dropout, "embd_pdrop": cfg.dropout, "attn_pdrop": cfg.dropout,
            "initializer_range": 0.02, "tie_word_embeddings": True,
            # <|endoftext|> begins and ends GPT-2's documents, when the vocabulary has it
            "bos_token_id": 50256 if cfg.vocab_size > 50256 else None,
            "eos_token_id": 50256 if cfg.vocab_size > 50256 else None,
            "torch_dtype": "float32",
        }
        os.makedirs(directory, exist_ok=True)
        # each file is written under a temporary name and renamed: an interrupted save leaves the old files whole
        save_file(tensors, os.path.join(directory, "model.safetensors.tmp"), metadata={"format": "pt"})
        with open(os.path.join(directory, "config.json.tmp"), "w") as f:
            json.dump(hf_config, f, indent=2)
        for name in ("model.safetensors", "config.json"):
            os.replace(os.path.join(directory, name + ".tmp"), os.path.join(directory, name))


def _onednn_linear():
    """oneDNN's linear kernel (the one torch.compile uses on CPUs), where this build of PyTorch has it."""
    try:
        return torch.ops.mkldnn._linear_pointwise if torch.backends.mkldnn.is_available() else None
    except (AttributeError, RuntimeError):
        return None


ONEDNN_LINEAR = _onednn_linear()


class OneDNNLinear(torch.autograd.Function):
    """F.linear(x, weight) without bias, forward through oneDNN. For the output layer on a CPU in fp32: MKL, which
    F.linear calls, runs this thin, wide product ((tokens x n_embd) by (n_embd x 50,257)) at 75-95 GFLOP/s on the
    2-core EPYC of bench.py's figures, oneDNN at 120-145; backward's two products are MKL's best already."""

    @staticmethod
    def forward(ctx, x, weight):
        ctx.save_for_backward(x, weight)
        return ONEDNN_LINEAR(x, weight, None, "none", [], "")

    @staticmethod
    def backward(ctx, grad):
        x, weight = ctx.saved_tensors
        grad_rows = grad.reshape(-1, grad.size(-1))
        return (grad_rows @ weight).view_as(x), grad_rows.t() @ x.reshape(-1, x.size(-1))


def padded_linear(x, weight, multiple):
    """F.linear(x, weight) computed with weight's rows padded to a multiple of `multiple`: the same values."""
    rows = weight.size(0)
    padded = F.pad(weight, (0, 0, 0, -rows % multiple))
    return F.linear(x, padded)[..., :rows]


def sample_next_token(logits, temperature=1.0, top_k=None, top_p=None, generator=None):
    """One token id per row of logits (B, vocab): argmax at temperature 0, else drawn from the filtered softmax."""
    if temperature == 0:
        return logits.argmax(dim=-1, keepdim=True)
    probs = F.softmax(filter_logits(logits / temperature, top_k, top_p), dim=-1)
    return torch.multinomial(probs, 1, generator=generator)


def filter_logits(logits, top_k=None, top_p=None):
    """Set to -inf the logits of every token outside the top_k, and outside the smallest set of most likely tokens
    whose probabilities reach top_p (nucleus sampling). The most likely token always stays."""
    if top_k is not None and top_k < logits.size(-1):
        kth = torch.topk(logits, top_k).values[:, [-1]]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p is not None and top_p < 1.0:
        sorted_logits, order = torch.sort(logits, dim=-1, descending=True)
        probs = F.softmax(sorted_logits, dim=-1)
        # drop a token when the more likely ones before it already reach top_p
        drop_sorted = probs.cumsum(dim=-1) - probs >= top_p
        drop = drop_sorted.scatter(-1, order, drop_sorted)
        logits = logits.masked_fill(drop, float("-inf"))
    return logits


HF_TRANSPOSED = ("attn.c_attn.weight", "attn.c_proj.weight", "mlp.c_fc.weight", "mlp.c_proj.weight")
HUB_NAMES = ("gpt2", "gpt2-medium", "gpt2-large", "gpt2-xl")


def _download(name):
    if name not in HUB_NAMES and not re.fullmatch(r"[\w-]+/[\w.-]+", name):  # hub ids are owner/name
        raise ValueError(f"{name}: no such file or directory, and not a Hugging Face model name "
                         f"({', '.join(HUB_NAMES)}, or owner/name)")
    try:
        from huggingface_hub import snapshot_download
    except ImportError:
        raise ValueError(f"{name} is not a local path; to download it from the Hugging Face hub: "
                         f"pip install huggingface_hub")
    files = ["config.json", "model.safetensors"]
    try:
        return snapshot_download(name, allow_patterns=files)
    except Exception:
        try:  # offline: a copy downloaded earlier may be in the cache
            return snapshot_download(name, allow_patterns=files, local_files_only=True)
        except Exception:
            raise ValueError(f"{name}: no such file or directory, and it cannot be downloaded from the Hugging Face "
                             f"hub (offline, or no such model) nor found in its cache")


def _config_from_hf(hf, directory):
    """GPTConfig from a transformers config.json, refusing the variants this model does not implement."""
    if hf.get("model_type") != "gpt2":
        raise ValueError(f"{directory} holds a {hf.get('model_type')!r} model, not GPT-2 (model_type 'gpt2')")
    unsupported = {
        "activation_function": (hf.get("activation_function", "gelu_new"), ("gelu_new", "gelu_pytorch_tanh")),
        "n_inner": (hf.get("n_inner"), (None, 4 * hf.get("n_embd", 0))),
        "layer_norm_epsilon": (hf.get("layer_norm_epsilon", 1e-5), (1e-5,)),
        "scale_attn_weights": (hf.get("scale_attn_weights", True), (True,)),
        "scale_attn_by_inverse_layer_idx": (hf.get("scale_attn_by_inverse_layer_idx", False), (False,)),
        "tie_word_embeddings": (hf.get("tie_word_embeddings", True), (True,)),
        "add_cross_attention": (hf.get("add_cross_attention", False), (False,)),
    }
    for field, (value, allowed) in unsupported.items():
        if value not in allowed:
            raise ValueError(f"{directory}: config.json has {field}={value!r}, which this GPT-2 does not implement")
    try:
        return GPTConfig(block_size=hf["n_positions"], vocab_size=hf["vocab_size"], n_layer=hf["n_layer"],
                         n_head=hf["n_head"], n_embd=hf["n_embd"])
    except (KeyError, TypeError, ValueError) as e:
        raise ValueError(f"{directory}: config.json is not a usable GPT-2 config ({type(e).__name__}: {e})")


def _read_hf_weights(directory):
    safetensors_path = os.path.join(directory, "model.safetensors")
    bin_path = os.path.join(directory, "pytorch_model.bin")
    if os.path.exists(safetensors_path):
        try:
            from safetensors.torch import load_file
        except ImportError:
            raise ValueError(f"reading {safetensors_path} needs safetensors: pip install safetensors")
        try:
            return load_file(safetensors_path)
        except Exception as e:
            raise ValueError(f"cannot read {safetensors_path} ({type(e).__name__}): damaged or incomplete")
    if os.path.exists(bin_path):
        try:
            return torch.load(bin_path, map_location="cpu", weights_only=True)
        except Exception as e:
            raise ValueError(f"cannot read {bin_path} ({type(e).__name__}): damaged or incomplete")
    raise ValueError(f"{directory} has neither model.safetensors nor pytorch_model.bin")

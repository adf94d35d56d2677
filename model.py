"""
The GPT-2 model and its generation (with a KV cache). No knowledge of files, flags or runs (train.py and the scripts
bring those; the Hugging Face file format is hf.py's). The module layout and parameter names follow OpenAI's GPT-2
(Hugging Face's GPT2LMHeadModel), so released weights load as they are: token + learned position embeddings ->
n_layer pre-LayerNorm blocks (attention, then a 4x GELU MLP, each added to the residual stream) -> final LayerNorm ->
a linear head that shares its weight with the token embedding.
"""

from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F
import torch.utils.checkpoint

from tokenizer import IGNORE_INDEX  # the label the loss skips: prompt tokens and padding (data.py writes them)


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


def preset_config(name, dropout=0.0, seq_len=None, **shape):
    """The GPTConfig of preset `name`, with the fields of shape (n_layer=..., ...) that are not None in place of the
    preset's, and a context (block_size) of at least seq_len: a model trained from scratch learns positions as far
    as it is trained, so a preset's context is no limit to its sequences. An impossible shape raises ValueError."""
    config = {**PRESETS[name], **{k: v for k, v in shape.items() if v is not None}}
    config["block_size"] = max(config["block_size"], seq_len or 0)
    return GPTConfig(**config, dropout=dropout)


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

    def forward(self, x, cache=None, packed=None):
        B, T, C = x.shape
        q, k, v = self.c_attn(x).split(C, dim=2)
        # (B, T, C) -> (B, T, n_head, head_size): each head attends on its own slice of the channels
        q, k, v = (t.view(B, T, self.n_head, C // self.n_head) for t in (q, k, v))
        dropout_p = self.dropout if self.training else 0.0
        if packed is not None and packed.takes_varlen(q, dropout_p):
            y = packed.varlen_attention(q, k, v)
        elif packed is not None and packed.takes_segments(q):
            y = packed.segment_attention(q, k, v, dropout_p)
        else:
            q, k, v = (t.transpose(1, 2) for t in (q, k, v))  # (B, n_head, T, head_size)
            past = 0 if cache is None else cache.length
            if cache is not None:  # generation: attend to the keys and values of every earlier position too
                k, v = cache.update(self.layer_index, k, v)
            if packed is not None:  # several examples a row: each attends to itself only
                mask, is_causal = packed.mask(), False
            elif past == 0 or T == 1:
                # is_causal lets PyTorch pick a fused kernel (flash attention on GPU) that never materialises a T x T
                # mask; one new query after cached positions may see all of them, so it needs no mask at all
                mask, is_causal = None, past == 0
            else:  # several new queries after cached ones: query i sits at position past + i
                positions = torch.arange(past + T, device=x.device)
                mask, is_causal = positions <= positions[past:, None], False
            y = attention(q, k, v, mask, dropout_p, is_causal).transpose(1, 2)
        y = y.contiguous().view(B, T, C)  # the heads side by side again
        return self.resid_dropout(self.c_proj(y))


def attention(q, k, v, mask, dropout_p, is_causal):
    """SDPA of (B, n_head, T, head_size) q, k, v; in float32 for bf16 ones on a CPU, uncached, up to 16,384 / head_size
    positions (256 at head size 64): the CPU's bf16 flash kernel has a cost per block of queries that only longer
    rows amortise, and below that takes longer than the float32 one, forward and backward (README.md, Performance)."""
    if q.device.type == "cpu" and q.dtype == torch.bfloat16 and k.size(2) == q.size(2) <= 16384 // q.size(3):
        with torch.autocast("cpu", enabled=False):  # (autocast would run SDPA in bf16 again)
            y = F.scaled_dot_product_attention(q.float(), k.float(), v.float(), mask, dropout_p, is_causal)
        return y.to(q.dtype)
    return F.scaled_dot_product_attention(q, k, v, mask, dropout_p, is_causal)


class PackedRows:
    """Attention for rows that hold several examples back to back (data.py's ExampleLoader.pack), given each token's
    position in its example (B, T), 0 where one starts: a token attends to its own example's earlier tokens only, so
    each example is computed as in a row of its own. On a GPU in bf16/fp16, variable-length flash attention, which
    skips the other examples' blocks; on a CPU, the causal kernel on each example alone (segment_attention);
    elsewhere (a GPU in fp32 or with dropout, torch.compile) a (B, 1, T, T) mask. Built on first use, for all layers."""

    def __init__(self, positions):
        self.positions = positions
        self._mask = self._starts = self._lengths = None

    def mask(self):
        if self._mask is None:
            example = (self.positions == 0).cumsum(dim=1)  # (B, T): which example of its row each token is in
            causal = torch.ones(example.size(1), example.size(1), dtype=torch.bool, device=example.device).tril()
            self._mask = ((example[:, :, None] == example[:, None, :]) & causal)[:, None]
        return self._mask

    def takes_segments(self, q):
        """Whether q's attention runs example by example: on a CPU, where the host has the positions at no cost (a
        GPU would wait for them), outside torch.compile (the examples' lengths are data, the graph would break)."""
        return q.device.type == "cpu" and not torch.compiler.is_compiling()

    def segment_attention(self, q, k, v, dropout_p):
        """(B, T, n_head, head_size) q, k, v -> the attention's output, in the same shape: SDPA's causal kernel on
        each example alone (and each row's padding tail), in a Python loop of ~1.5 ms a layer; a mask would cost all
        T x T scores of a row. Split at the starts and joined by cat: slicing would add a zero-filled gradient of the
        whole batch per segment in backward. In float32 even under bf16 autocast, as attention() for short rows."""
        B, T, H, D = q.shape
        if self._lengths is None:
            starts = self.positions == 0
            starts[:, 0] = True  # a row starts a segment whatever its first position (rows are never joined)
            flat = torch.nonzero(starts.flatten()).flatten().tolist() + [B * T]
            self._lengths = [end - start for start, end in zip(flat, flat[1:])]
        with torch.autocast("cpu", enabled=False):  # (autocast would run SDPA in bf16 again)
            segments = zip(*(t.reshape(B * T, H, D).float().split(self._lengths) for t in (q, k, v)))
            y = torch.cat([F.scaled_dot_product_attention(*(t.transpose(0, 1)[None] for t in qkv), None, dropout_p,
                                                          is_causal=True)[0].transpose(0, 1) for qkv in segments])
        return y.to(q.dtype).view(B, T, H, D)

    def takes_varlen(self, q, dropout_p):
        """Whether q's attention can run varlen's flash kernel: bf16/fp16 on an Ampere or later GPU (a T4 or V100
        has no flash attention), without dropout (the kernel has none)."""
        return (VARLEN_ATTENTION is not None and q.is_cuda and q.dtype in (torch.bfloat16, torch.float16)
                and dropout_p == 0.0 and torch.cuda.get_device_capability(q.device) >= (8, 0))

    def varlen_attention(self, q, k, v):
        """(B, T, n_head, head_size) q, k, v -> the attention's output, in the same shape."""
        B, T, H, D = q.shape
        if self._starts is None:
            flat = self.positions.reshape(-1)
            end = torch.tensor([flat.numel()], device=flat.device)
            self._starts = torch.cat([torch.nonzero(flat == 0).flatten(), end]).to(torch.int32)
        # an example is at most T long: T bounds max_q and max_k without reading the lengths back from the device
        y = VARLEN_ATTENTION(q.reshape(B * T, H, D), k.reshape(B * T, H, D), v.reshape(B * T, H, D),
                             self._starts, self._starts, T, T, window_size=(-1, 0))  # (-1, 0): causal
        return y.view(B, T, H, D)


try:  # variable-length flash attention, in PyTorch 2.10 and later
    from torch.nn.attention.varlen import varlen_attn as VARLEN_ATTENTION
except ImportError:
    VARLEN_ATTENTION = None


class CrossEntropy(torch.autograd.Function):
    """F.cross_entropy(logits, targets, ignore_index=IGNORE_INDEX, reduction="none"): (rows, vocab), (rows,) ->
    (rows,) nats, 0 where the target is IGNORE_INDEX. PyTorch's keeps the log-softmax, then in backward fills a
    one-hot gradient and recomputes the exponentials; keeping the softmax makes the gradient, softmax - one_hot, one
    in-place pass: with GPT-2's 50,257 tokens, a large part of a small model's CPU step (README.md, Performance).
    -log p(target), p clamped to the smallest normal float (87 nats at most: only a diverged model gets there)."""

    @staticmethod
    def forward(ctx, logits, targets):
        labelled, safe_targets = targets != IGNORE_INDEX, targets.clamp_min(0)  # (IGNORE_INDEX is negative)
        probs, target_probs = softmax_float32(logits, safe_targets)
        ctx.save_for_backward(probs, target_probs, safe_targets, labelled)
        return -(target_probs.clamp_min(torch.finfo(torch.float32).tiny).log() * labelled)

    @staticmethod
    def backward(ctx, grad_nats):
        probs, target_probs, safe_targets, labelled = ctx.saved_tensors
        # the softmax becomes the gradient in place (so backward runs once per forward), in the logits' dtype (not
        # float32, which autograd would cast in one more pass); at the targets p - 1 from the float32 p: a bf16 p
        # near 1 would leave mostly rounding error. (A float32 factor would make a float32 copy of the whole.)
        scale = grad_nats * labelled
        grad = probs.mul_(scale[:, None].to(probs.dtype))
        grad[torch.arange(len(grad), device=grad.device), safe_targets] = ((target_probs - 1) * scale).to(grad.dtype)
        return grad, None


def softmax_float32(logits, targets):
    """(softmax(logits, dim=-1), its entries at targets (rows,) in float32), computed in float32 a block of rows at a
    time (13 GB for a float32 copy of bf16 logits at 64 x 1024 tokens; small blocks stay in a CPU's cache, large ones
    keep a GPU's launches few). Kept in bf16 for bf16 logits (half the memory and traffic; the gradient is bf16
    anyway), in float32 for fp16 ones (fp16 flushes the small probabilities that GradScaler's factor keeps)."""
    if logits.dtype == torch.float32:
        probs = torch.softmax(logits, dim=-1)
        return probs, probs.gather(1, targets[:, None]).squeeze(1)
    probs = torch.empty_like(logits, dtype=torch.float32 if logits.dtype == torch.float16 else logits.dtype)
    target_probs = torch.empty(len(logits), dtype=torch.float32, device=logits.device)
    rows = max(1, (2**20 if logits.device.type == "cpu" else 2**25) // logits.size(-1))
    for block in (slice(start, start + rows) for start in range(0, len(logits), rows)):
        probs[block] = softmax = torch.softmax(logits[block].float(), dim=-1)
        target_probs[block] = softmax.gather(1, targets[block, None]).squeeze(1)
    return probs, target_probs


def cross_entropy(logits, targets, reduction="mean"):
    """CrossEntropy's nats per row (reduction "none"), or their mean over the labelled rows ("mean")."""
    nats = CrossEntropy.apply(logits, targets)
    if reduction == "none":
        return nats
    return nats.sum() / (targets != IGNORE_INDEX).sum()


class KVCache:
    """The keys and values of the positions so far: a new token costs one position's work, not the whole prefix's.
    Preallocated to the model's context on first use (no copy per token)."""

    def __init__(self, config):
        self.size = config.block_size
        self.keys, self.values = [None] * config.n_layer, [None] * config.n_layer
        self.length = 0  # positions stored; GPT.forward advances it after all layers have written

    def update(self, layer, k, v):
        """Store the new keys and values (B, n_head, T, head_size) of one layer; return all of them so far."""
        if self.keys[layer] is None:  # (B, n_head, block_size, head_size)
            self.keys[layer], self.values[layer] = (t.new_empty(*t.shape[:2], self.size, t.size(3)) for t in (k, v))
        end = self.length + k.size(2)
        self.keys[layer][:, :, self.length : end], self.values[layer][:, :, self.length : end] = k, v
        return self.keys[layer][:, :, :end], self.values[layer][:, :, :end]


class MLP(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.c_fc = nn.Linear(config.n_embd, 4 * config.n_embd, bias=config.bias)
        self.c_proj = nn.Linear(4 * config.n_embd, config.n_embd, bias=config.bias)
        self.c_proj.RESIDUAL_PROJECTION = True
        self.dropout = nn.Dropout(config.dropout)

    def forward(self, x):
        # (B, T, C) -> (B, T, 4C) -> (B, T, C), in GELU's tanh approximation: GPT-2 was trained with it
        return self.dropout(self.c_proj(F.gelu(self.c_fc(x), approximate="tanh")))


class Block(nn.Module):
    def __init__(self, config, layer_index):
        super().__init__()
        self.ln_1 = nn.LayerNorm(config.n_embd, bias=config.bias)
        self.attn = CausalSelfAttention(config, layer_index)
        self.ln_2 = nn.LayerNorm(config.n_embd, bias=config.bias)
        self.mlp = MLP(config)

    def forward(self, x, cache=None, packed=None):
        # pre-LayerNorm: the residual stream itself is never normalised, which keeps deep stacks trainable
        x = x + self.attn(self.ln_1(x), cache, packed)
        return x + self.mlp(self.ln_2(x))


class GPT(nn.Module):
    def __init__(self, config: GPTConfig):
        super().__init__()
        self.config = config
        self.transformer = nn.ModuleDict(dict(
            wte=nn.Embedding(config.vocab_size, config.n_embd),
            wpe=nn.Embedding(config.block_size, config.n_embd),
            drop=nn.Dropout(config.dropout),
            h=nn.ModuleList([Block(config, i) for i in range(config.n_layer)]),
            ln_f=nn.LayerNorm(config.n_embd, bias=config.bias),
        ))
        self.lm_head = nn.Linear(config.n_embd, config.vocab_size, bias=False)
        # Weight tying (as in GPT-2): the output layer scores each token by its similarity to the token's input
        # embedding. One Parameter, two uses: it saves vocab_size * n_embd parameters and both uses train it.
        self.lm_head.weight = self.transformer.wte.weight
        self.apply(self._init_weights)
        # Recompute each block's activations in backward (train.py's --activation_checkpointing, a setting of the
        # run): about a third more compute for one block's activations in memory at a time instead of all of them.
        self.activation_checkpointing = False

    def _init_weights(self, module):
        if isinstance(module, nn.Linear):
            # each block adds two projections to the residual stream, whose variance so grows with depth: GPT-2
            # scales their initial weights by 1/sqrt(2 * n_layer) to keep it constant
            std = 0.02 * ((2 * self.config.n_layer) ** -0.5 if getattr(module, "RESIDUAL_PROJECTION", False) else 1)
            nn.init.normal_(module.weight, mean=0.0, std=std)
            if module.bias is not None:
                nn.init.zeros_(module.bias)
        elif isinstance(module, nn.Embedding):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)

    def forward(self, idx, targets=None, cache=None, loss_reduction="mean", positions=None, return_logits=True):
        """idx: (B, T) token ids. With targets (B, T), returns (logits (B, T, vocab), loss): the mean cross-entropy
        over the targets that are not IGNORE_INDEX, or with loss_reduction="none" each position's (B, T), 0 where
        ignored; (None, loss) with return_logits=False. Without targets, (the last position's logits (B, 1, vocab),
        None): all generation needs, at 1/T of the cost. With a KVCache, idx continues the positions in it. positions
        (B, T) of a packed batch: each token's position in its example, attention staying within each (PackedRows)."""
        B, T = idx.shape
        past = 0 if cache is None else cache.length
        if past + T > (context := self.config.block_size):
            raise ValueError(f"sequence of length {past + T} is longer than the model's context ({context})")
        if positions is not None and cache is not None:
            raise ValueError("positions are for packed batches, which generation with a KVCache does not take")
        packed = None if positions is None else PackedRows(positions)
        if positions is None:
            positions = torch.arange(past, past + T, dtype=torch.long, device=idx.device)
        x = self.transformer.drop(self.transformer.wte(idx) + self.transformer.wpe(positions))  # (B, T, n_embd)
        for block in self.transformer.h:
            if self.activation_checkpointing and torch.is_grad_enabled():
                # non-reentrant: works with FSDP and torch.compile; dropout draws the same masks the second time
                x = torch.utils.checkpoint.checkpoint(block, x, cache, packed, use_reentrant=False)
            else:
                x = block(x, cache, packed)
        if cache is not None:
            cache.length += T
        x = self.transformer.ln_f(x)
        if targets is None:
            return self.output_layer(x[:, [-1], :]), None
        # The output layer and its softmax are most of a small model's step: without the logits, on a CPU (a GPU would
        # wait for the rows) and uncompiled (fixed shapes), they skip the rows with no target: prompts, padding.
        targets, rows = targets.reshape(B * T), None
        if not return_logits and x.device.type == "cpu" and not torch.compiler.is_compiling():
            labelled = (targets != IGNORE_INDEX).nonzero().squeeze(1)
            if len(labelled) < B * T:
                rows, x, targets = labelled, x.reshape(B * T, -1)[labelled], targets[labelled]
        logits = self.output_layer(x)  # under autocast in bf16/fp16; the loss takes their softmax in fp32
        loss = cross_entropy(logits.reshape(targets.numel(), -1), targets, loss_reduction)
        if loss_reduction == "none":  # 0 where there is no target
            loss = (loss if rows is None else loss.new_zeros(B * T).index_copy(0, rows, loss)).view(B, T)
        return logits if return_logits else None, loss

    def output_layer(self, x):
        """lm_head(x), (B, T, n_embd) -> (B, T, vocab). GPU tensor cores need sizes that are multiples of 8 (and are
        fastest at 64), and GPT-2's 50,257 is odd: the weight is padded by zero rows to a multiple of 64 and the
        logits sliced back, so the parameter, checkpoints and exports keep 50,257 rows (microseconds on a GPU; CPUs
        gain nothing from it: bench.py). On a CPU in fp32 the product goes through oneDNN (see OneDNNLinear)."""
        if x.is_cuda:
            return padded_linear(x, self.lm_head.weight, multiple=64)
        # (under autocast the matmul runs in bf16 anyway; under torch.compile, inductor picks its own kernels)
        if (ONEDNN_LINEAR is not None and x.device.type == "cpu" and x.dtype == torch.float32
                and not torch.is_autocast_enabled("cpu") and not torch.compiler.is_compiling()):
            return OneDNNLinear.apply(x, self.lm_head.weight)
        return self.lm_head(x)

    def num_params(self, non_embedding=False):
        """Parameters, each once (the tied head is the token embedding); non_embedding: without the embeddings."""
        embeddings = self.transformer.wte.weight.numel() + self.transformer.wpe.weight.numel()
        return sum(p.numel() for p in self.parameters()) - (embeddings if non_embedding else 0)

    def flops_per_token(self, seq_len, output_layer=True):
        """Training FLOPs (forward + backward) per token: 6 per matmul weight, 4 per frozen one, the output layer
        included (output_layer=False: not, as for a token without a target), plus attention's QK^T and AV, 12 *
        n_layer * n_embd * seq_len (PaLM, appendix B, without its causal halving, as nanoGPT and most MFU figures)."""
        # a frozen weight (LoRA's base) costs its forward and the gradient of its input, 4, and no weight gradient
        matmuls = sum((6 if m.weight.requires_grad else 4) * m.weight.numel() for m in self.modules()
                      if isinstance(m, nn.Linear) and (output_layer or m is not self.lm_head))
        return matmuls + 12 * self.config.n_layer * self.config.n_embd * seq_len

    # ------------------------------------------------------------------------------------------------------------
    # Generation: one generator, which sample.py, train.py's end-of-run sample and the tests all use.

    @torch.no_grad()
    def generate_stream(self, idx, max_new_tokens, temperature=1.0, top_k=None, top_p=None, generator=None,
                        stop_token=None, use_cache=True, cache=None):
        """Yield the next token of each row, (B, 1), max_new_tokens times, continuing idx (B, T). temperature 0 is
        greedy; top_k keeps the k most likely tokens, top_p the fewest whose probability adds up to top_p. Rows that
        have produced stop_token keep producing it; the stream ends when all have. A full context slides by half
        (the newest block_size // 2 tokens fed again from position 0: GPT-2's positions are absolute). The cache only
        saves work: use_cache=False gives the same tokens. cache: a KVCache the caller keeps from call to call
        (sample.py --chat's turns); idx is then only the tokens after the cache's, and nothing slides: the caller
        keeps cache.length + T + max_new_tokens - 1 within block_size. The last token yielded is not fed."""
        kept = cache is not None
        if kept and cache.length + idx.size(1) + max_new_tokens - 1 > self.config.block_size:
            raise ValueError(f"{cache.length} cached + {idx.size(1)} new + {max_new_tokens} generated tokens exceed "
                             f"the model's context ({self.config.block_size})")
        use_cache = use_cache or kept
        window = idx if kept else idx[:, -self.config.block_size :]
        if not kept:
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
            window, new_tokens = torch.cat([window, next_token], dim=1), next_token
            if window.size(1) > self.config.block_size and not kept:
                window = window[:, -(self.config.block_size // 2) :]
                new_tokens, cache = window, KVCache(self.config) if use_cache else None

    def generate(self, idx, max_new_tokens, **kwargs):  # idx (B, T) and generate_stream's tokens after it
        return torch.cat([idx, *self.generate_stream(idx, max_new_tokens, **kwargs)], dim=1)


# oneDNN's linear kernel (the one torch.compile uses on CPUs), where this build of PyTorch has it
ONEDNN_LINEAR = getattr(torch.ops.mkldnn, "_linear_pointwise", None) if torch.backends.mkldnn.is_available() else None


class OneDNNLinear(torch.autograd.Function):
    """F.linear(x, weight) without bias, forward through oneDNN. For the output layer on a CPU in fp32: MKL, which
    F.linear calls, runs this thin, wide product ((tokens x n_embd) by (n_embd x 50,257)) well below the machine's
    peak, oneDNN much closer to it (README.md, Performance); backward's two products are MKL's best already."""

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
    return F.linear(x, F.pad(weight, (0, 0, 0, -weight.size(0) % multiple)))[..., : weight.size(0)]


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

"""
GPT-2 in the Hugging Face format, in and out: a directory with config.json and model.safetensors as transformers'
GPT2LMHeadModel reads and writes it, and GPT-2's tokenizer files (vocab.json, merges.txt) for its AutoTokenizer.

Its Conv1D layers store Linear weights transposed, (in, out); ours are nn.Linear's (out, in). Problems raise
ValueError with one line to show. safetensors (the weights' format) and huggingface_hub (downloads) are optional.
"""

import json
import os
import re
from dataclasses import replace

import torch

from model import GPT, GPTConfig
from tokenizer import EOT_TOKEN, chat_template, get_tokenizer

HF_TRANSPOSED = ("attn.c_attn.weight", "attn.c_proj.weight", "mlp.c_fc.weight", "mlp.c_proj.weight")
HUB_NAMES = ("gpt2", "gpt2-medium", "gpt2-large", "gpt2-xl")


def from_pretrained(name_or_dir, dropout=0.0):
    """GPT-2 weights from a Hugging Face directory, or the hub names gpt2, gpt2-medium, gpt2-large and gpt2-xl
    (downloaded with huggingface_hub, or found in its cache). Problems raise ValueError with one line to show."""
    directory = name_or_dir if os.path.isdir(name_or_dir) else _download(name_or_dir)
    config_path = os.path.join(directory, "config.json")
    if not os.path.exists(config_path):
        raise ValueError(f"{directory} has no config.json: not a Hugging Face model directory")
    with open(config_path) as f:
        config = replace(_config_from_hf(json.load(f), directory), dropout=dropout)
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
    model = GPT(config)
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


def save_pretrained(model, directory):
    """Write config.json and model.safetensors that transformers' GPT2LMHeadModel.from_pretrained loads."""
    try:
        from safetensors import SafetensorError
        from safetensors.torch import save_file
    except ImportError:
        raise ValueError("writing Hugging Face weights needs safetensors: pip install safetensors")
    cfg = model.config
    if not cfg.bias:
        raise ValueError("GPT-2 in the Hugging Face format has biases; a model with bias=False cannot be saved")
    if any(".lora_A." in key for key in model.state_dict()):  # (lora.py's; not imported: it imports nothing of ours)
        raise ValueError("the model has LoRA adapters, which GPT-2's format has no place for: lora.merge_adapters "
                         "first, or lora.save_peft for the adapters alone")
    tensors = {}
    for key, tensor in model.state_dict().items():
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
    weights = os.path.join(directory, "model.safetensors.tmp")
    try:
        save_file(tensors, weights, metadata={"format": "pt"})
    except SafetensorError as e:  # how safetensors reports a failed write: "I/O error: ... (os error 28)"
        code = re.search(r"\(os error (\d+)\)", str(e))
        if code is None:
            raise
        raise OSError(int(code[1]), os.strerror(int(code[1])), weights) from None
    # safetensors writes through a private temporary file of its own (mode 0600): give the weights the mode the
    # umask gives the other files, so whoever can read config.json can read them too
    os.chmod(weights, 0o666 & ~current_umask())
    with open(os.path.join(directory, "config.json.tmp"), "w") as f:
        json.dump(hf_config, f, indent=2)
    for name in ("model.safetensors", "config.json"):
        os.replace(os.path.join(directory, name + ".tmp"), os.path.join(directory, name))


def current_umask():
    """The process umask, which only os.umask reports, by setting it: it is set back at once."""
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


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


def _config_from_hf(hf_config, directory):
    """GPTConfig from a transformers config.json, refusing the variants this model does not implement."""
    if hf_config.get("model_type") != "gpt2":
        raise ValueError(f"{directory} holds a {hf_config.get('model_type')!r} model, not GPT-2 (model_type 'gpt2')")
    unsupported = {
        "activation_function": (hf_config.get("activation_function", "gelu_new"), ("gelu_new", "gelu_pytorch_tanh")),
        "n_inner": (hf_config.get("n_inner"), (None, 4 * hf_config.get("n_embd", 0))),
        "layer_norm_epsilon": (hf_config.get("layer_norm_epsilon", 1e-5), (1e-5,)),
        "scale_attn_weights": (hf_config.get("scale_attn_weights", True), (True,)),
        "scale_attn_by_inverse_layer_idx": (hf_config.get("scale_attn_by_inverse_layer_idx", False), (False,)),
        "tie_word_embeddings": (hf_config.get("tie_word_embeddings", True), (True,)),
        "add_cross_attention": (hf_config.get("add_cross_attention", False), (False,)),
    }
    for field, (value, allowed) in unsupported.items():
        if value not in allowed:
            raise ValueError(f"{directory}: config.json has {field}={value!r}, which this GPT-2 does not implement")
    try:
        return GPTConfig(block_size=hf_config["n_positions"], vocab_size=hf_config["vocab_size"],
                         n_layer=hf_config["n_layer"], n_head=hf_config["n_head"], n_embd=hf_config["n_embd"])
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


def bytes_to_unicode():
    """GPT-2's byte-level BPE writes each byte as a printable character in vocab.json and merges.txt: printable
    bytes stand for themselves, the others are shifted past 255 (the mapping of OpenAI's encoder.py)."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    shifted = [b for b in range(256) if b not in printable]
    return {**{b: chr(b) for b in printable}, **{b: chr(256 + i) for i, b in enumerate(shifted)}}


def save_tokenizer(directory, model_max_length, chat=False):
    """vocab.json, merges.txt and tokenizer_config.json (with the chat template if chat) for transformers'
    GPT2Tokenizer, from tiktoken's ranks. A token's rank is its merge's priority, so its merge is the last step of
    BPE run on its own bytes with the lower-ranked merges only."""
    ranks = get_tokenizer()._mergeable_ranks
    byte_char = bytes_to_unicode()

    def text(token):
        return "".join(byte_char[b] for b in token)

    merges = []
    for token, rank in sorted(ranks.items(), key=lambda item: item[1]):
        if len(token) == 1:
            continue
        parts = [bytes([b]) for b in token]
        while len(parts) > 2:
            pairs = [(ranks.get(a + b, rank), i) for i, (a, b) in enumerate(zip(parts, parts[1:]))]
            best, i = min(pairs)
            if best >= rank:
                raise ValueError(f"token {rank} is not a merge of two earlier tokens")
            parts[i : i + 2] = [parts[i] + parts[i + 1]]
        merges.append(f"{text(parts[0])} {text(parts[1])}")
    vocab = {text(token): rank for token, rank in ranks.items()}
    vocab["<|endoftext|>"] = EOT_TOKEN
    files = {
        "vocab.json": json.dumps(vocab, ensure_ascii=False),
        "merges.txt": "#version: 0.2\n" + "\n".join(merges) + "\n",
        "tokenizer_config.json": json.dumps({
            "tokenizer_class": "GPT2Tokenizer", "model_max_length": model_max_length, "add_prefix_space": False,
            "bos_token": "<|endoftext|>", "eos_token": "<|endoftext|>", "unk_token": "<|endoftext|>",
            # the template train.py's chat data is rendered in: only for a model fine-tuned on it
            **({"chat_template": chat_template()} if chat else {})}, indent=2),
    }
    for name, content in files.items():
        with open(os.path.join(directory, name + ".tmp"), "w", encoding="utf-8") as f:
            f.write(content)
        os.replace(os.path.join(directory, name + ".tmp"), os.path.join(directory, name))

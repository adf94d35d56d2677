"""
What a run leaves in its --out_dir, and the one way back to a model:

    ckpt.pt         save_checkpoint / load_checkpoint: the model, the optimizer, the GradScaler, the step, the configs
    metrics.jsonl   MetricsLog: one JSON object per log line
    load_model(X)   a GPT from a checkpoint, an out_dir, a Hugging Face directory or a hub name

A LoRA run's ckpt.pt (train.py --lora_rank) holds the adapters in place of the model's weights, and under "lora"
their settings and what identifies the base they go on: its source (--init_from's, absolute; None for the random
initialisation of the run's --seed) and lora.base_checksum. load_model loads that base, checks it, and returns the
model with the adapters merged: a LoRA checkpoint is read like any other.

Batches and dropout masks are functions of (seed, step) (data.py, step.train_step), so the step is all the
position a checkpoint needs to resume exactly.
"""

import dataclasses
import json
import os
import zlib

import torch

import hf
import lora
from files import HOST, WriteError, describe_write_failure, parse_json, write_atomically
from model import GPT, GPTConfig
from cli import UserError
from parallel import training_state

CHECKPOINT = "ckpt.pt"
METRICS = "metrics.jsonl"
LOCK = ".lock"  # held by the run writing to the out_dir (claim_out_dir)
# the checkpoint's key for {part: checksum(part)} (one int for the whole in the version that introduced it; absent
# in checkpoints written before it)
CHECKSUM = "crc32"


def save_checkpoint(path, model, optimizer, scaler, step, args, write=True, lora_base=None):
    """Everything resuming needs: the model's state dict (never a compiled or DDP-wrapped module's), the optimizer's
    and the GradScaler's, the step, the model's config and the run's (args). A sharded (FSDP) model's states are
    gathered first, in full: one format, whatever the run. Every rank calls this (gathering is a collective); the
    one with write=True writes. Written to a temporary file and renamed, so a crash never leaves half a checkpoint.
    With the CRC32 of its tensors (checksum): torch.load checks the file's structure but not the tensors' bytes, so
    without it a bit flipped on disk or in a copy would load and be trained or sampled from. A model with LoRA
    adapters saves them alone (parallel.training_state), with their settings and lora_base (base_identity's)."""
    model_state, optimizer_state = training_state(model, optimizer)
    if not write:
        return
    state = {
        "model": model_state,
        "model_config": dataclasses.asdict(model.config),
        "optimizer": optimizer_state,
        "scaler": scaler.state_dict(),
        "step": step,
        "config": vars(args),
    }
    if lora.adapted(model):
        state["lora"] = {**lora.adapter_settings(model), **lora_base}
    # one checksum a part: a script that needs the weights alone (sample.py, export.py) verifies them alone, and
    # does not read the optimizer state (twice the weights, under AdamW) from a memory-mapped file
    state[CHECKSUM] = {part: checksum(value) for part, value in state.items()}
    write_atomically(path, lambda f: torch.save(state, f), size=tensor_bytes(state))


def tensor_bytes(state):
    """The bytes of the tensors in a nest of dicts and lists: about what saving it writes."""
    if isinstance(state, torch.Tensor):
        return state.numel() * state.element_size()
    values = state.values() if isinstance(state, dict) else state if isinstance(state, (list, tuple)) else []
    return sum(tensor_bytes(value) for value in values)


def checksum(state, crc=0):
    """The CRC32 of the bytes of every tensor in a nest of dicts, lists and tuples, dicts in the order of their keys
    (sorted as strings) so that it does not depend on how the nest was built. Other values (the step, the configs)
    are not covered: kilobytes of the file against its megabytes or gigabytes of tensors. About 3 GB/s on one core."""
    if isinstance(state, torch.Tensor):
        if state.numel():  # (the bytes of a bf16 or 0-dim tensor too: viewed as uint8, never converted)
            crc = zlib.crc32(state.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy(), crc)
    elif isinstance(state, dict):
        for key in sorted(state, key=str):
            crc = checksum(state[key], crc)
    elif isinstance(state, (list, tuple)):
        for value in state:
            crc = checksum(value, crc)
    return crc


def damaged(ckpt, saved, parts):
    """Whether the checkpoint's tensors (of `parts`, or all) differ from the checksums saved with them: one a part,
    or, from the version that introduced them, one int for the whole."""
    if isinstance(saved, int):
        return checksum(ckpt) != saved
    return any(checksum(ckpt.get(part)) != crc for part, crc in saved.items() if parts is None or part in parts)


def load_checkpoint(path, mmap=False, verify=True, parts=None):
    """A checkpoint's dict, from its path or its out_dir, its model config checked against its weights (see
    checked_model). Tensors only: a checkpoint cannot run code when loaded. mmap: map the file instead of reading
    it, so that only what is used is read, and the processes of a node share one copy in the page cache. verify:
    the tensors' checksum recomputed and compared with the one saved with them, so that a damaged file is refused
    in one line before anything trains on it or overwrites it (checkpoints from before the checksum load
    unchecked); it reads every tensor verified, so a look at the config alone passes verify=False to stay cheap
    however big the model. parts: the parts verified (default: all), e.g. ("model",) for the weights alone."""
    if os.path.isdir(path):
        path = os.path.join(path, CHECKPOINT)
    if not os.path.exists(path):
        raise UserError(f"no checkpoint at {path}: train one first, or check --out_dir")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True, mmap=mmap)
        if not isinstance(ckpt, dict) or not {"model", "model_config", "step", "config"} <= set(ckpt):
            raise ValueError("keys missing")
    except Exception as e:
        raise UserError(f"cannot read checkpoint {path} ({type(e).__name__}): it is damaged or not a checkpoint")
    saved = ckpt.pop(CHECKSUM, None)
    if verify and saved is not None and damaged(ckpt, saved, parts):
        raise UserError(f"checkpoint {path} is damaged: its tensors do not match the checksum written with them (a "
                        f"bad disk or an incomplete copy); use another copy or an earlier checkpoint")
    ckpt["model"], ckpt["model_config"] = checked_model(ckpt["model"], ckpt["model_config"], path, ckpt.get("lora"))
    if verify:  # (train.py never writes such a checkpoint; an older version could, from a diverged run)
        not_finite = next((name for name, t in ckpt["model"].items() if not torch.isfinite(t).all()), None)
        if not_finite:
            raise UserError(f"checkpoint {path} holds weights that are not finite (NaN or inf, e.g. {not_finite}): "
                            f"it was saved from a diverged run; use an earlier checkpoint")
    return ckpt


# what a model's weights say of its shape (the head count they cannot tell)
SHAPE_OF_WEIGHTS = {"vocab_size": ("transformer.wte.weight", 0), "n_embd": ("transformer.wte.weight", 1),
                    "block_size": ("transformer.wpe.weight", 0)}


def checked_model(weights, model_config, path, lora_settings=None):
    """The checkpoint's weights and model config, made to fit each other where that is unambiguous, else refused
    with one line: the prefixes of a compiled (_orig_mod.) or DDP-wrapped (module.) model are stripped; a field the
    config lacks is taken from the weights where they tell it (sizes, layers, biases); a field this version does not
    know, a size the weights contradict, or weights that are missing or extra for the config are refused. A LoRA
    checkpoint's weights are its adapters: checked against those its settings put on a model of its config."""
    if not isinstance(weights, dict) or not isinstance(model_config, dict):
        raise UserError(f"checkpoint {path} has no model config or no weights: it was not written by train.py")
    weights = {strip_prefixes(name): tensor for name, tensor in weights.items()}
    if lora_settings is not None:
        return checked_adapters(weights, model_config, path, lora_settings)
    told = {name: weights[key].shape[dim] for name, (key, dim) in SHAPE_OF_WEIGHTS.items() if key in weights}
    told["n_layer"] = len({name.split(".")[2] for name in weights if name.startswith("transformer.h.")})
    told["bias"] = "transformer.ln_f.bias" in weights
    fields = {field.name for field in dataclasses.fields(GPTConfig)}
    unknown = sorted(set(model_config) - fields)
    if unknown:
        raise UserError(f"checkpoint {path} has model settings this version does not know ({', '.join(unknown)}): "
                        f"it was written by another version of this repo")
    config = {**{k: v for k, v in told.items() if k not in model_config}, **model_config}
    if "n_head" not in config:
        raise UserError(f"checkpoint {path} does not say its number of heads (n_head), which its weights cannot "
                        f"tell: it was not written by train.py")
    for name, value in told.items():
        if config[name] != value:
            raise UserError(f"checkpoint {path} is damaged: its config says {name}={config[name]}, its weights "
                            f"have {value}")
    try:
        with torch.device("meta"):  # the names a model of this config has, for no memory
            expected = set(GPT(GPTConfig(**config)).state_dict())
    except (TypeError, ValueError) as e:
        raise UserError(f"checkpoint {path} has an impossible model config: {e}")
    if set(weights) != expected:
        wrong = sorted(set(weights) ^ expected)
        raise UserError(f"checkpoint {path} is damaged: its weights do not fit its config ({len(wrong)} names "
                        f"missing or extra, e.g. {wrong[0]})")
    return weights, config


def checked_adapters(weights, model_config, path, settings):
    """checked_model for a LoRA checkpoint: its config complete (it was written whole by train.py), its adapters
    those that its LoRA settings put on a model of that config."""
    try:
        with torch.device("meta"):
            model = GPT(GPTConfig(**model_config))
            lora.add_adapters(model, settings["rank"], settings["alpha"], settings["dropout"], settings["targets"])
        expected = lora.adapter_state_dict(model)
    except (TypeError, ValueError, KeyError) as e:
        raise UserError(f"checkpoint {path} has an impossible model or LoRA config ({e}): it was written by another "
                        f"version of this repo, or damaged")
    wrong = sorted(set(weights) ^ set(expected)) or [name for name in weights if
                                                      weights[name].shape != expected[name].shape]
    if wrong:
        raise UserError(f"checkpoint {path} is damaged: its LoRA adapters do not fit its settings (e.g. {wrong[0]})")
    return weights, model_config


def strip_prefixes(name):
    for prefix in ("_orig_mod.", "module."):
        while name.startswith(prefix):
            name = name[len(prefix):]
    return name


def is_checkpoint(source):
    """Whether source names a checkpoint (a ckpt.pt, or an out_dir holding one) rather than Hugging Face weights."""
    return os.path.isfile(source) or os.path.isfile(os.path.join(source, CHECKPOINT))


def load_model(source, dropout=0.0):
    """The one way to get a trained model, for --init_from and the scripts: from a checkpoint (a ckpt.pt, or the
    out_dir holding one), a Hugging Face GPT-2 directory (config.json + model.safetensors), or a hub name (gpt2,
    gpt2-medium, gpt2-large, gpt2-xl). Returns the GPT in float32 on the CPU; a LoRA checkpoint's with its adapters
    merged into the base's weights (load_adapted has them apart)."""
    if is_checkpoint(source):
        ckpt = load_checkpoint(source, mmap=True, parts=("model",))  # only the weights are read
        if "lora" in ckpt:
            model = adapted_model(ckpt, source, dropout)
            lora.merge_adapters(model)
            return model
        model = GPT(GPTConfig(**{**ckpt["model_config"], "dropout": dropout}))
        model.load_state_dict(ckpt["model"])
        return model
    if os.path.isdir(source) and not os.path.isfile(os.path.join(source, "config.json")):
        raise UserError(f"{source} holds neither a {CHECKPOINT} nor a Hugging Face config.json: pass a checkpoint, "
                        f"an out_dir, a Hugging Face GPT-2 directory or a hub name ({', '.join(hf.HUB_NAMES)})")
    try:
        return hf.from_pretrained(source, dropout=dropout)
    except ValueError as e:
        raise UserError(str(e))


def load_adapted(source, dropout=0.0):
    """A LoRA checkpoint's model with its adapters apart (float32, on the CPU), and its "lora" record; for another
    checkpoint, or weights that are not one, (the model, None)."""
    if is_checkpoint(source):
        ckpt = load_checkpoint(source, mmap=True, parts=("model",))
        if "lora" in ckpt:
            return adapted_model(ckpt, source, dropout), ckpt["lora"]
    return load_model(source, dropout), None


def adapted_model(ckpt, path, dropout=0.0):
    """A LoRA checkpoint's base (load_base), with its adapters on it, loaded."""
    model = load_base(ckpt["lora"], ckpt["model_config"], path, dropout)
    settings = ckpt["lora"]
    lora.add_adapters(model, settings["rank"], settings["alpha"], settings["dropout"], settings["targets"])
    lora.load_adapter_state_dict(model, ckpt["model"])
    return model


def base_identity(init_from, model, seed):
    """What a LoRA checkpoint records of its base, so that loading it finds the same weights or says why not: the
    --init_from source (a path made absolute, so that the checkpoint loads from any directory; a hub name as is;
    None for a run from scratch, whose base is the random initialisation of --seed), and lora.base_checksum of the
    float32 base as loaded (before lora.cast_base)."""
    source = os.path.abspath(init_from) if init_from and os.path.exists(init_from) else init_from
    return {"base": source, "base_seed": None if init_from else seed, "base_checksum": lora.base_checksum(model)}


def load_base(record, model_config, path, dropout=0.0):
    """The base of a LoRA checkpoint at path (its "lora" record: base_identity's), float32 on the CPU, checked to
    be the weights the adapters were trained on; else one line saying what is wrong and what to do."""
    source = record["base"]
    if source is None:  # the random initialisation of the run's seed, as train.py makes it
        torch.manual_seed(record["base_seed"])
        model = GPT(GPTConfig(**{**model_config, "dropout": dropout}))
        where = f"the random initialisation of --seed {record['base_seed']}"
    else:
        where = source
        try:
            model = load_model(source, dropout)
        except UserError as e:
            raise UserError(f"LoRA checkpoint {path}: its base {source} cannot be loaded ({e}): put the base weights "
                            f"back there, or train the adapters anew from where they are now")
    if lora.base_checksum(model) != record["base_checksum"]:
        raise UserError(f"LoRA checkpoint {path}: its base {where} is not the weights its adapters were trained on "
                        f"(their checksum differs): restore those weights there, or train the adapters anew on these")
    return model


def trained_with(source):
    """The optimizer the weights at source were trained with: a checkpoint's --optimizer ("adamw" for checkpoints from
    before there was a choice), else "adamw" (OpenAI trained GPT-2 with Adam). Fine-tuning goes on with it."""
    if not is_checkpoint(source):
        return "adamw"
    # a look at the config: the weights are verified when load_model reads them next
    return load_checkpoint(source, mmap=True, verify=False)["config"].get("optimizer", "adamw")


def trained_on(source):
    """The --dataset_type the weights at source were last trained on: a checkpoint's ("text", "alpaca", "chat",
    "shards"), "text" for OpenAI's GPT-2 by its hub name (web text), else None (unknown: a Hugging Face directory)."""
    if is_checkpoint(source):
        return load_checkpoint(source, mmap=True, verify=False)["config"].get("dataset_type")
    return "text" if source in hf.HUB_NAMES else None


def claim_out_dir(out_dir):
    """--out_dir for this run alone: created if needed, locked for as long as this process lives, and checked to be
    writable before the first step (a run that could not save would lose its training at the first checkpoint).
    The lock is advisory (flock on out_dir/.lock): a second run into the same out_dir is refused, whatever the
    timing, and the operating system releases it when the process ends, however it ends, so a killed run never
    leaves a lock that blocks --resume. Returns the lock's open file: closing it releases the lock."""
    try:
        os.makedirs(out_dir, exist_ok=True)
        lock = open(os.path.join(out_dir, LOCK), "a+")
    except OSError as e:
        raise UserError(f"cannot create --out_dir {out_dir}: {e.strerror}")
    try:
        import fcntl  # POSIX; on Windows runs are not locked
        fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except ImportError:
        pass
    except OSError:
        lock.seek(0)
        holder = lock.read().strip() or "another process"
        lock.close()
        raise UserError(f"--out_dir {out_dir} is in use by another run ({holder}): wait for it to end, or choose "
                        f"another --out_dir")
    try:
        lock.seek(0)
        lock.truncate()
        lock.write(f"process {os.getpid()} on {HOST}\n")
        lock.flush()
        for name in (CHECKPOINT, METRICS):
            path = os.path.join(out_dir, name)
            if os.path.exists(path) and not os.path.isfile(path):
                raise UserError(f"{path} is not a file (a directory?): move it away or choose another --out_dir")
        probe = os.path.join(out_dir, ".write-test")
        write_atomically(probe, lambda f: f.write(b"ok"))
        os.remove(probe)
    except OSError as e:
        lock.close()
        raise WriteError(describe_write_failure(os.path.join(out_dir, LOCK), e))
    except UserError:
        lock.close()
        raise
    return lock


class MetricsLog:
    """metrics.jsonl: one JSON object per log line, flushed as it is written. On resume, records past the
    checkpoint's step (logged by the interrupted run after its last save) are dropped, so the file reads as one run.
    A context manager: the file is closed on leaving it. path None writes nothing (the ranks other than 0)."""

    def __init__(self, path, resume_step=None):
        self.file = None
        if path is None:
            return
        records = []
        if resume_step is not None and os.path.exists(path):
            with open(path) as f:
                for line in f:
                    try:
                        if parse_json(line)["step"] <= resume_step:
                            records.append(line)
                    except (ValueError, KeyError, TypeError):
                        pass  # a line cut short by the crash that interrupted the run
        write_atomically(path, lambda f: f.writelines(records), mode="w")
        self.path = path
        try:
            self.file = open(path, "a")
        except OSError as e:
            raise WriteError(describe_write_failure(path, e))

    def write(self, record):
        if self.file is not None:
            try:
                self.file.write(json.dumps(record) + "\n")
                self.file.flush()
            except OSError as e:
                raise WriteError(describe_write_failure(self.path, e))

    def close(self):
        if self.file is not None:
            self.file.close()
            self.file = None

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

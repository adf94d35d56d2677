"""LoRA through train.py (--lora_rank): only the adapters train, checkpoints hold them and the base's identity, a run
resumes exactly and runs under torchrun, load_model and export.py read its checkpoints, and bad input is one line."""

import contextlib
import io
import json
import math
import os
import sys
import types

import pytest
import torch

import bench
import eval as eval_script
import export
import lora
import options
import sample
import train
from checkpoint import load_adapted, load_checkpoint, load_model
from cli import UserError
from conftest import REPO, TINY, losses, read_metrics, run_script, run_train, without_model_flag
from model import preset_config

LORA = ["--lora_rank", "4"]


def one_line_refusal(capsys, argv):
    """train.main(argv) refused: exit 2, one line on stderr, returned."""
    capsys.readouterr()  # (what came before)
    with pytest.raises(SystemExit) as exit_info:
        train.main(argv)
    err = capsys.readouterr().err
    assert exit_info.value.code == 2 and err.count("\n") == 1 and "error: " in err, err
    return err


def run_from(dataset, base, out_dir, *flags):
    """train.py from base's weights (TINY's flags less --model: the shape is the base's)."""
    train.main(["--dataset_path", dataset, "--out_dir", str(out_dir), *without_model_flag(TINY), "--init_from", base,
                *flags])
    return read_metrics(out_dir)


def files_in(path):
    return {name: os.path.getmtime(os.path.join(path, name)) for name in os.listdir(path)}


@pytest.fixture
def base_run(small_text, tmp_path):
    """A tiny model trained 3 steps (the base LoRA runs start from), in tmp_path/base."""
    run_train(small_text, tmp_path / "base", "--max_steps", "3")
    return str(tmp_path / "base")


def test_lora_defaults_are_adamw_without_weight_decay_at_lora_s_learning_rate_and_flags_given_win(tmp_path):
    args = options.resolve(["--out_dir", str(tmp_path), "--lora_rank", "8"]).args
    assert (args.optimizer, args.max_lr, args.weight_decay, args.lora_alpha) == \
        ("adamw", options.DEFAULTS["max_lr"]["lora"], 0.0, 16.0)
    args = options.resolve(["--out_dir", str(tmp_path), "--lora_rank", "8", "--max_lr", "1e-4", "--weight_decay",
                            "0.01", "--lora_alpha", "8"]).args
    assert (args.max_lr, args.weight_decay, args.lora_alpha) == (1e-4, 0.01, 8.0)


def test_a_lora_run_trains_only_the_adapters_and_its_checkpoint_holds_them_not_the_base(small_text, base_run,
                                                                                         tmp_path):
    out = tmp_path / "lora"
    run_from(small_text, base_run, out, *LORA, "--max_steps", "3")
    model, record = load_adapted(str(out))
    base = load_model(base_run)
    for name, tensor in base.state_dict().items():  # bit-identical: the base never moved
        assert torch.equal(model.state_dict()[name], tensor), name
    assert all(p.abs().sum() > 0 for name, p in model.named_parameters() if name.endswith("lora_B.weight"))
    assert record["base"] == os.path.abspath(base_run) and record["rank"] == 4
    # adapters and their AdamW state alone: a fraction of the base's checkpoint
    assert os.path.getsize(out / "ckpt.pt") * 20 < os.path.getsize(os.path.join(base_run, "ckpt.pt"))
    # and load_model reads it like any other: the adapters merged into the base
    merged = load_model(str(out))
    idx = torch.randint(0, 50257, (2, 16))
    assert torch.allclose(merged(idx, idx)[0], model(idx, idx)[0], atol=1e-5)


def test_an_interrupted_and_resumed_lora_run_gives_the_losses_of_a_straight_run(small_text, tmp_path):
    # a constant learning rate: the first part's schedule, to step 3, is then the straight run's
    flags = [*LORA, "--lora_dropout", "0.1", "--warmup_steps", "0", "--min_lr", "3e-3"]
    straight = run_train(small_text, tmp_path / "straight", *flags, "--max_steps", "6")
    run_train(small_text, tmp_path / "resumed", *flags, "--max_steps", "3")
    resumed = run_train(small_text, tmp_path / "resumed", "--resume", "--max_steps", "6")
    assert losses(resumed) == losses(straight)


def test_export_writes_the_merged_model_and_a_peft_adapter_directory_that_give_our_logits(small_text, base_run,
                                                                                          tmp_path, capsys):
    transformers = pytest.importorskip("transformers")
    peft = pytest.importorskip("peft")
    out = tmp_path / "lora"
    run_from(small_text, base_run, out, *LORA, "--max_steps", "2")
    model, _ = load_adapted(str(out))
    model.eval()
    idx = torch.randint(0, 50257, (2, 16))
    ours = model(idx, idx)[0]
    export.main(["--init_from", str(out), "--out_dir", str(tmp_path / "merged")])
    export.main(["--init_from", str(out), "--out_dir", str(tmp_path / "peft"), "--peft"])
    merged = transformers.GPT2LMHeadModel.from_pretrained(str(tmp_path / "merged")).eval()
    # the base is our checkpoint, which transformers cannot read: exported beside the adapters, in base/
    base = transformers.GPT2LMHeadModel.from_pretrained(str(tmp_path / "peft" / "base"))
    adapted = peft.PeftModel.from_pretrained(base, str(tmp_path / "peft")).eval()
    with torch.no_grad():
        assert torch.allclose(merged(idx).logits, ours, atol=1e-4)
        assert torch.allclose(adapted(idx).logits, ours, atol=1e-4)
    # over an existing directory: one line, nothing changed
    before = files_in(tmp_path / "peft")
    capsys.readouterr()
    with pytest.raises(SystemExit) as exit_info:
        export.main(["--init_from", str(out), "--out_dir", str(tmp_path / "peft"), "--peft"])
    err = capsys.readouterr().err
    assert exit_info.value.code == 2 and err.count("\n") == 1 and "already holds files" in err
    assert files_in(tmp_path / "peft") == before
    # a Hugging Face directory is a base like a checkpoint: a LoRA run on the merged export, read back through it
    again = tmp_path / "lora-on-hf"
    run_from(small_text, str(tmp_path / "merged"), again, *LORA, "--max_steps", "2")
    model, record = load_adapted(str(again))
    assert record["base"] == os.path.abspath(tmp_path / "merged")
    assert torch.allclose(load_model(str(again))(idx, idx)[0], model(idx, idx)[0], atol=1e-5)


def eval_json(capsys, *flags):
    """eval.py's JSON line."""
    capsys.readouterr()
    eval_script.main(["--device", "cpu", "--dtype", "float32", *flags])
    return json.loads(capsys.readouterr().out.strip().splitlines()[-1])


def test_a_lora_chat_run_with_activation_checkpointing_is_read_by_sample_eval_and_bench_as_any_run(
        base_run, tmp_path, monkeypatch, capsys):
    # what a LoRA user combines: chat data, packed rows (the default), activation checkpointing; then the checkpoint,
    # adapters only, read like any other by sample.py --chat, eval.py (its run's split, and --tasks), bench.py
    chat = os.path.join(REPO, "chat_sample.json")
    out = tmp_path / "lora"
    records = run_from(chat, base_run, out, *LORA, "--dataset_type", "chat", "--seq_len", "64",
                       "--activation_checkpointing", "--max_steps", "3")
    assert load_checkpoint(str(out))["config"]["packing"] and all(math.isfinite(r["loss"]) for r in records)
    # sample.py --chat: a reply, and no note that the weights were not fine-tuned on the chat template
    monkeypatch.setattr(sys, "stdin", io.StringIO("Hello there.\n"))
    capsys.readouterr()
    sample.main(["--init_from", str(out), "--chat", "--temperature", "0", "--max_new_tokens", "8", "--device", "cpu",
                 "--dtype", "float32"])
    captured = capsys.readouterr()
    assert captured.out and "note:" not in captured.err and "error" not in captured.err
    # eval.py: the run's own chat split by default, the fine-tuned adapters better on it than the base they are on
    tuned = eval_json(capsys, "--init_from", str(out))
    base = eval_json(capsys, "--init_from", base_run, "--dataset_type", "chat", "--dataset_path", chat,
                     "--seq_len", "64")
    assert tuned["dataset"] == base["dataset"] == f"chat:{chat}" and tuned["val_loss"] < base["val_loss"]
    eval_json(capsys, "--init_from", str(out), "--dataset_path", "none", "--tasks", "shakespeare_val", "--limit", "2")
    assert "shakespeare_val" in json.loads((out / "lm_eval.json").read_text())
    # bench.py decodes from it, with and without the KV cache, as transformers does from its merged export
    result = run_bench_json(["--sample", "--init_from", str(out), "--prompt_tokens", "8", "--new_tokens", "8",
                             "--device", "cpu", "--dtype", "float32"])
    assert result["same_tokens_with_and_without_cache"] and result.get("same_tokens_as_transformers", True)


def run_bench_json(argv):
    stdout = io.StringIO()
    with contextlib.redirect_stdout(stdout):
        bench.main(argv)
    return json.loads(stdout.getvalue().strip().splitlines()[-1])


def test_a_lora_checkpoint_whose_base_is_different_or_missing_is_refused_in_one_line(small_text, base_run, tmp_path,
                                                                                     capsys):
    out = tmp_path / "lora"
    run_from(small_text, base_run, out, *LORA, "--max_steps", "2")
    checkpoint = files_in(out)
    run_train(small_text, base_run, "--max_steps", "2", "--seed", "7", "--overwrite")  # other weights, same place
    with pytest.raises(UserError, match="not the weights its adapters were trained on"):
        load_model(str(out))
    err = one_line_refusal(capsys, ["--out_dir", str(out), "--resume", "--max_steps", "4"])
    assert "not the weights its adapters were trained on" in err
    os.rename(base_run, base_run + "-moved")
    with pytest.raises(UserError, match="cannot be loaded"):
        load_model(str(out))
    assert files_in(out) == checkpoint  # the refused resume changed nothing


@pytest.mark.parametrize("flags, message", [
    (["--lora_rank", "-1"], "must be an integer, 0 or more, got -1"),
    (["--lora_rank", "33"], "larger than the model's width (32)"),  # gpt2-nano: 32 wide
    (["--lora_rank", "4", "--lora_targets", "attn,qkv"], "unknown LoRA target 'qkv'"),
    (["--lora_rank", "4", "--optimizer", "muon"], "--optimizer muon with --lora_rank"),
])
def test_bad_lora_flags_are_one_line_and_write_nothing(flags, message, small_text, tmp_path, capsys):
    argv = ["--dataset_path", small_text, "--out_dir", str(tmp_path / "out"), *TINY, *flags]
    err = one_line_refusal(capsys, argv)
    assert message in err and not os.path.exists(tmp_path / "out")


def test_fsdp_with_lora_is_refused_saying_to_use_ddp(tmp_path):
    with pytest.raises(UserError, match="drop --fsdp and let DDP"):
        options.resolve(["--out_dir", str(tmp_path), *TINY, *LORA, "--fsdp"], world_size=2)


def test_resume_keeps_the_checkpoint_s_lora_settings_and_refuses_others(small_text, tmp_path, capsys):
    run_train(small_text, tmp_path / "full", "--max_steps", "2")
    run_train(small_text, tmp_path / "lora", *LORA, "--max_steps", "2")
    for out, flags, message in [("full", LORA, "trained all the weights, not LoRA adapters"),
                                ("lora", ["--lora_rank", "8"], "adapters of rank 4, whose state cannot go on"),
                                ("lora", ["--lora_targets", "attn"], "--lora_targets all")]:
        before = files_in(tmp_path / out)
        err = one_line_refusal(capsys, ["--out_dir", str(tmp_path / out), "--resume", "--max_steps", "4", *flags])
        assert message in err and files_in(tmp_path / out) == before


def test_the_memory_check_refuses_full_fine_tuning_of_gpt2_xl_on_24_gb_and_lets_lora_run(monkeypatch, tmp_path):
    monkeypatch.setattr(train, "device_memory_bytes", lambda rt: 25.3e9)  # this machine's 24 GB
    rt = types_runtime()
    for lora_rank, refused in [(0, True), (16, False)]:
        args = options.resolve(["--out_dir", str(tmp_path), "--model", "gpt2-xl", "--batch_size", "1", "--seq_len",
                                "512", "--lora_rank", str(lora_rank)]).args
        if refused:
            with pytest.raises(UserError, match="--lora_rank"):
                train.check_memory(preset_config("gpt2-xl"), args, rt, 1)
        else:
            train.check_memory(preset_config("gpt2-xl"), args, rt, 1)


def types_runtime():
    return types.SimpleNamespace(device_type="cpu", dtype=torch.bfloat16, world_size=1)


def test_lora_s_memory_estimate_for_gpt2_xl_is_under_40_percent_of_full_fine_tuning_s():
    from measure import memory_estimate
    cfg = preset_config("gpt2-xl")
    full = sum(memory_estimate(cfg, 512, 1, False).values())
    adapters = lora.adapter_count(cfg, 16)
    assert adapters == sum(p.numel() for p in adapter_params(16))
    assert sum(memory_estimate(cfg, 512, 1, False, adapters=adapters).values()) < 0.4 * full


def adapter_params(rank):
    from model import GPT
    with torch.device("meta"):
        model = GPT(preset_config("gpt2-xl"))
        lora.add_adapters(model, rank, 2 * rank)
    return [p for p in model.parameters() if p.requires_grad]


@pytest.mark.slow  # two launches of train.py, one under torchrun: ~30 s
def test_torchrun_lora_with_two_processes_equals_one_process_with_double_accumulation(small_text, tmp_path):
    # DDP averages the adapters' gradients alone (the base has none)
    flags = ["--dataset_path", small_text, *TINY, *LORA, "--max_steps", "3", "--batch_size", "2",
             "--total_batch_size", str(4 * 2 * 32)]
    run_script("train.py", *flags, "--out_dir", str(tmp_path / "one"))
    run_script("train.py", *flags, "--out_dir", str(tmp_path / "two"), torchrun=True)
    one, two = read_metrics(tmp_path / "one"), read_metrics(tmp_path / "two")
    assert losses(two) == pytest.approx(losses(one), abs=1e-4)
    a, b = load_checkpoint(str(tmp_path / "one"))["model"], load_checkpoint(str(tmp_path / "two"))["model"]
    assert all(torch.allclose(a[name], b[name], atol=1e-4) for name in a)


def test_train_alpaca_sh_passes_lora_s_flags_through_and_leaves_its_recipe_to_train_py(tmp_path):
    import subprocess
    from conftest import REPO
    fake = tmp_path / "bin" / "python"  # a `python` that prints what it would run
    fake.parent.mkdir()
    fake.write_text('#!/bin/sh\necho "$@"\n')
    fake.chmod(0o755)
    env = {**os.environ, "PATH": f"{fake.parent}:{os.environ['PATH']}", "INIT_FROM": "gpt2", "LORA_RANK": "16",
           "LORA_ALPHA": "8", "LORA_TARGETS": "attn"}
    result = subprocess.run(["bash", os.path.join(REPO, "train_alpaca.sh")], capture_output=True, text=True, env=env)
    flags = result.stdout.split()
    assert " ".join(flags[flags.index("--lora_rank"):]).startswith("--lora_rank 16 --lora_alpha 8 --lora_targets attn")
    assert not {"--max_lr", "--optimizer", "--weight_decay", "--lora_dropout"} & set(flags)


@pytest.mark.slow  # two launches of train.py, one compiling: ~1 min on a CPU
def test_a_compiled_lora_run_gives_the_eager_run_s_losses(base_run, tmp_path):
    chat = os.path.join(REPO, "chat_sample.json")
    flags = [*LORA, "--dataset_type", "chat", "--seq_len", "64", "--max_steps", "3"]
    eager = run_from(chat, base_run, tmp_path / "eager", *flags)
    compiled = run_from(chat, base_run, tmp_path / "compiled", *flags, "--compile")
    # the same math in another order of operations: equal to float rounding
    assert losses(compiled) == pytest.approx(losses(eager), rel=1e-3)

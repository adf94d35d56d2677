import argparse
import os
import re
import types

import pytest
import torch

import bench
import eval as eval_script
import options
import train
from checkpoint import save_checkpoint
from cli import UserError
from conftest import REPO, TINY, without_model_flag
from files import DataError
from model import GPT, GPTConfig, preset_config
from options import resolve
from step import get_lr


def resolved(tmp_path, *flags, **kwargs):
    """options.resolve on TINY's flags and flags, into tmp_path/out: what train.py would run, without running it."""
    return resolve(["--out_dir", str(tmp_path / "out"), *TINY, *flags], **kwargs)


def save_run(out_dir, *flags, step=2, world_size=None):
    """A checkpoint of step `step` in out_dir, of the run that TINY's flags and flags resolve to, as train.py saves
    one; its weights freshly initialised (resolving never reads them)."""
    opts = resolve(["--out_dir", str(out_dir), *TINY, *flags], world_size=world_size)
    torch.manual_seed(0)
    model = GPT(opts.cfg)
    out_dir.mkdir(parents=True, exist_ok=True)
    save_checkpoint(str(out_dir / "ckpt.pt"), model, torch.optim.AdamW(model.parameters()),
                    torch.amp.GradScaler("cpu", enabled=False), step, opts.args)
    return opts.args


def save_weights(path, optimizer=None, block_size=48):
    """A checkpoint of a small model of no preset's shape, trained (it says) with `optimizer` (None: saying nothing,
    as checkpoints from before there was a choice)."""
    torch.manual_seed(0)
    model = GPT(GPTConfig(n_layer=1, n_head=2, n_embd=24, block_size=block_size))
    config = argparse.Namespace(model="x", **({"optimizer": optimizer} if optimizer else {}))
    save_checkpoint(str(path), model, torch.optim.AdamW(model.parameters()), torch.amp.GradScaler("cpu", enabled=False),
                    7, config)
    return model


# ----------------------------------------------------------------------------------------------------------------
# The flags and --help


def help_entries(parser, monkeypatch):
    """{option: its --help entry, the lines joined}: wide, so that no default is cut across lines."""
    monkeypatch.setenv("COLUMNS", "200")
    entries, name = {}, None
    for line in parser.format_help().splitlines():
        match = re.match(r"  (--\w+)", line)
        if match:
            name = match.group(1)
            entries[name] = line.strip()
        elif name and line.startswith("      "):
            entries[name] += " " + line.strip()
        else:
            name = None
    return entries


def test_help_lists_every_option_with_its_default(monkeypatch):
    out = "\n".join(help_entries(options.build_parser(), monkeypatch).values())
    for option in ["--dataset_type", "--dataset_path", "--model", "--n_layer", "--n_head", "--n_embd", "--batch_size",
                   "--seq_len", "--total_batch_size", "--max_steps", "--warmup_steps", "--max_lr", "--min_lr",
                   "--weight_decay", "--grad_clip", "--dtype", "--device", "--compile", "--seed", "--out_dir",
                   "--log_interval", "--eval_interval", "--eval_steps", "--save_interval", "--resume"]:
        assert option in out
    assert "(default: input.txt)" in out and "(default: out)" in out


def test_help_shows_one_default_an_option_and_the_flags_shared_with_bench_and_eval_alike(monkeypatch):
    helps = {name: help_entries(module.build_parser(), monkeypatch) for name, module in
             [("train", options), ("bench", bench), ("eval", eval_script)]}
    for name, entries in helps.items():
        for option, entry in entries.items():
            assert entry.count("default") <= 1 and "(default: None)" not in entry, (name, entry)
    train_help = helps["train"]
    assert "0.002 with adamw, 0.004 with muon" in train_help["--max_lr"]
    shared = {"bench": ["--model", "--n_layer", "--n_head", "--n_embd", "--dropout", "--dataset_type", "--dataset_path",
                        "--packing", "--batch_size", "--seq_len", "--total_batch_size", "--optimizer", "--compile",
                        "--reduce_dtype", "--fsdp", "--activation_checkpointing", "--seed", "--device", "--dtype"],
              "eval": ["--dataset_type", "--dataset_path", "--packing", "--device", "--dtype"]}
    for name, flags in shared.items():
        for flag in flags:
            assert helps[name][flag] == train_help[flag], (name, flag)
    description = options.build_parser().description
    assert all(kind in description for kind in ("text", "Alpaca", "chat", "shards"))


def test_given_flags_are_those_typed_whatever_their_kind_or_value():
    parser = options.build_parser()
    assert options.given_flags(parser, []) == set()
    argv = ["--batch_size", "4", "--no-packing", "--fsdp", "--resume", "--max_l", "1e-3", "--seed=1337", "--compile"]
    # a value equal to the default is given too; --no-x and --x alike; an abbreviation names its option
    assert options.given_flags(parser, argv) == {"batch_size", "packing", "fsdp", "resume", "max_lr", "seed",
                                                 "compile"}
    assert options.given_flags(parser, ["--packing"]) == {"packing"}


# ----------------------------------------------------------------------------------------------------------------
# Defaults: the optimizer's, fine-tuning's, derived; the batch geometry


def test_the_optimizer_decides_max_lr_and_beta2_and_min_lr_follows_max_lr(tmp_path):
    flags = without_model_flag(TINY)
    flags = flags[: flags.index("--max_lr")] + flags[flags.index("--max_lr") + 2 :]  # (TINY gives --max_lr)
    flags = flags[: flags.index("--optimizer")] + flags[flags.index("--optimizer") + 2 :]
    out = ["--out_dir", str(tmp_path)]
    muon = resolve([*out, *flags]).args
    assert (muon.optimizer, muon.max_lr, muon.beta2, muon.min_lr, muon.warmup_steps) == ("muon", 4e-3, 0.99, 4e-4, 2)
    adamw = resolve([*out, *flags, "--optimizer", "adamw"]).args
    assert (adamw.max_lr, adamw.beta2, adamw.min_lr) == (2e-3, 0.95, pytest.approx(2e-4))
    given = resolve([*out, *flags, "--max_lr", "1e-2", "--beta2", "0.9", "--min_lr", "0"]).args
    assert (given.max_lr, given.beta2, given.min_lr) == (1e-2, 0.9, 0.0)


def test_the_batch_geometry_fills_seq_len_and_total_batch_size_and_counts_micro_steps(tmp_path):
    plain = resolved(tmp_path, "--seq_len", "64")
    assert plain.accum_steps == 1 and plain.args.total_batch_size == 4 * 64 and plain.cfg.block_size == 64
    assert resolved(tmp_path, "--batch_size", "2", "--total_batch_size", "256").accum_steps == 4
    assert resolved(tmp_path, "--batch_size", "2", "--total_batch_size", "256", world_size=2).accum_steps == 2
    assert resolved(tmp_path, world_size=2).args.total_batch_size == 2 * 4 * 32  # no accumulation
    assert resolve(["--out_dir", str(tmp_path)]).args.seq_len == preset_config(options.DEFAULT_MODEL).block_size


def test_from_scratch_a_seq_len_beyond_the_preset_s_context_extends_it(tmp_path):
    assert resolved(tmp_path, "--seq_len", "80").cfg.block_size == 80  # gpt2-nano's context is 64


def test_init_from_defaults_to_a_fine_tuning_recipe_and_flags_given_win(tmp_path):
    # the from-scratch defaults (Muon at 4e-3, warmup, decay) would undo trained weights in a few steps
    save_weights(tmp_path / "start.pt")
    common = ["--seq_len", "32", "--batch_size", "2", "--max_steps", "2", "--device", "cpu", "--dtype", "float32"]

    def settings(*flags):
        opts = resolve([*common, "--out_dir", str(tmp_path / "out"), *flags])
        args = opts.args
        return args.optimizer, args.max_lr, args.min_lr, args.warmup_steps, [get_lr(s, args) for s in (1, 2)]

    # weights trained with AdamW (or not saying: before there was a choice) go on with AdamW, at a small constant rate
    init = ["--init_from", str(tmp_path / "start.pt")]
    assert settings(*init) == ("adamw", 3e-5, 3e-5, 0, [3e-5, 3e-5])
    notes = resolve([*common, "--out_dir", str(tmp_path / "out"), *init]).notes
    assert "--init_from: fine-tuning defaults --optimizer adamw --max_lr 3e-05 --warmup_steps 0" in notes[0]
    assert settings(*init, "--optimizer", "muon", "--max_lr", "1e-3", "--warmup_steps", "1") == \
        ("muon", 1e-3, 1e-3, 1, [1e-3, 1e-3])
    # a run trained with Muon (the default from scratch) is fine-tuned with Muon
    assert settings("--model", "gpt2-nano")[:4] == ("muon", 4e-3, 4e-4, 20)
    save_weights(tmp_path / "scratch.pt", optimizer="muon")
    assert settings("--init_from", str(tmp_path / "scratch.pt"))[:4] == ("muon", 3e-5, 3e-5, 0)


def test_init_from_resolves_its_defaults_without_loading_the_weights(tmp_path):
    # GPT-2's own weights (a hub name: a download) are never fetched to resolve the options: the loader is a stand-in
    loaded = []

    def stand_in(source, dropout):
        loaded.append(source)
        return types.SimpleNamespace(config=preset_config("gpt2"))

    opts = resolve(["--out_dir", str(tmp_path), "--init_from", "gpt2", "--batch_size", "1"], load_weights=stand_in)
    assert loaded == ["gpt2"] and opts.cfg.n_embd == 768 and opts.args.seq_len == 1024
    assert (opts.args.optimizer, opts.args.max_lr, opts.args.min_lr) == ("adamw", 3e-5, 3e-5)


def test_init_from_refuses_shape_flags_and_unknown_sources(tmp_path):
    save_weights(tmp_path / "trained.pt", block_size=64)  # weights whose context is 64
    for flags, message in [(["--init_from", str(tmp_path), "--model", "gpt2-nano"], "drop --model"),
                           (["--init_from", str(tmp_path / "trained.pt"), "--seq_len", "65"],
                            "--seq_len 65 is longer than the model's context (64)"),
                           (["--init_from", str(tmp_path)], "neither a ckpt.pt nor a Hugging Face config.json"),
                           (["--init_from", "no-such-model"], "no such file or directory")]:
        with pytest.raises(UserError) as error:
            resolve(["--out_dir", str(tmp_path / "out"), *without_model_flag(TINY), *flags])
        assert "\n" not in str(error.value) and message in str(error.value), error.value


# ----------------------------------------------------------------------------------------------------------------
# Resuming: the checkpoint's config, and what may change


def test_a_fresh_run_refuses_to_replace_an_existing_checkpoint(tmp_path):
    save_run(tmp_path / "out")
    before = (tmp_path / "out" / "ckpt.pt").read_bytes()
    with pytest.raises(UserError, match="--resume"):
        resolved(tmp_path)
    assert (tmp_path / "out" / "ckpt.pt").read_bytes() == before
    assert resolved(tmp_path, "--overwrite").ckpt is None


def test_resume_keeps_the_checkpoint_s_config_but_for_the_resumable_options_given(tmp_path):
    saved = save_run(tmp_path / "out", "--max_lr", "3e-3", "--dropout", "0.1", step=2)
    opts = resolve(["--resume", "--out_dir", str(tmp_path / "out"), "--max_lr", "1", "--seed", "7", "--batch_size",
                    "2", "--max_steps", "9", "--eval_interval", "4"])
    args = opts.args
    assert (args.max_lr, args.seed, args.dropout) == (saved.max_lr, saved.seed, 0.1)  # what the run computes: kept
    assert (args.batch_size, args.max_steps, args.eval_interval) == (2, 9, 4)  # how long and how it goes on
    assert opts.notes[0] == "--resume: keeping the checkpoint's max_lr, seed"
    assert opts.ckpt["step"] == 2 and opts.accum_steps == 2 and args.total_batch_size == saved.total_batch_size


def test_resuming_with_another_max_steps_says_what_the_schedule_becomes(tmp_path):
    save_run(tmp_path, "--max_steps", "4", step=4)
    notes = resolve(["--resume", "--out_dir", str(tmp_path), "--max_steps", "10"]).notes
    assert "decays to 3.00e-04 at step 10 instead of 4: 3.00e-04 at step 4, 2.17e-03 at step 5" in notes[0]
    for max_steps in ("4", "3"):  # at or below the checkpoint's step: nothing to train
        with pytest.raises(UserError, match=f"is at step 4, and --max_steps {max_steps} is not beyond it: nothing to "
                           f"train; to go on, give a larger one, e.g. --resume --max_steps 8"):
            resolve(["--resume", "--out_dir", str(tmp_path), "--max_steps", max_steps])


def test_resume_can_switch_tensorboard_off(tmp_path):
    save_run(tmp_path, "--tensorboard", "--max_steps", "4")
    assert resolve(["--resume", "--out_dir", str(tmp_path), "--max_steps", "6"]).args.tensorboard
    off = resolve(["--resume", "--out_dir", str(tmp_path), "--max_steps", "6", "--no-tensorboard"])
    assert not off.args.tensorboard


def test_a_checkpoint_of_one_optimizer_resumed_with_the_other_is_one_line(tmp_path):
    save_run(tmp_path / "out", "--max_steps", "2")
    with pytest.raises(UserError) as error:
        resolve(["--resume", "--out_dir", str(tmp_path / "out"), "--max_steps", "4", "--optimizer", "muon"])
    message = str(error.value)
    assert "\n" not in message and "trained with --optimizer adamw" in message and "--init_from" in message
    # what it advises: its weights, afresh, with the other optimizer
    fresh = resolve(["--out_dir", str(tmp_path / "fresh"), *without_model_flag(TINY), "--init_from",
                     str(tmp_path / "out"), "--optimizer", "muon", "--max_steps", "2"])
    assert fresh.args.optimizer == "muon" and fresh.ckpt is None and fresh.init_model is not None


def test_resume_with_fsdp_in_one_process_is_one_line_and_no_notes(tmp_path, capsys):
    save_run(tmp_path, "--max_steps", "2")
    with pytest.raises(SystemExit):
        train.main(["--resume", "--out_dir", str(tmp_path), "--fsdp", "--max_steps", "4", "--seed", "7"])
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("error: --fsdp shards the model")  # not the notes first


def test_a_sharded_run_resumed_in_one_process_goes_on_with_the_whole_model(tmp_path):
    save_run(tmp_path, "--fsdp", world_size=2)
    one = resolve(["--resume", "--out_dir", str(tmp_path)])
    assert not one.args.fsdp
    assert one.notes == ["--resume: the run was sharded (--fsdp); this one process goes on with the whole model"]
    assert resolve(["--resume", "--out_dir", str(tmp_path)], world_size=2).args.fsdp


def test_resuming_on_more_processes_names_the_batch_size_that_splits_the_global_batch(tmp_path):
    save_run(tmp_path)  # 1 process x 4 sequences a step
    with pytest.raises(UserError) as error:
        resolve(["--resume", "--out_dir", str(tmp_path), "--max_steps", "6"], world_size=2)
    assert str(error.value).startswith("--resume on 2 processes: the checkpoint's global batch of 4 sequences")
    assert "pass --batch_size 2 " in str(error.value)
    with pytest.raises(UserError, match="resume on a number of processes that divides 4"):
        resolve(["--resume", "--out_dir", str(tmp_path), "--max_steps", "6"], world_size=3)
    assert resolve(["--resume", "--out_dir", str(tmp_path), "--max_steps", "6", "--batch_size", "2"],
                   world_size=2).accum_steps == 1


# ----------------------------------------------------------------------------------------------------------------
# Refusals: one line, before anything is written


BAD_OPTIONS = {
    "batch arithmetic": (["--total_batch_size", "100"], "not a multiple"),
    "unknown preset": (["--model", "gpt5"], "unknown --model"),
    "n_embd not divisible by n_head": (["--n_embd", "30", "--n_head", "4"], "divisible"),
    "resume without checkpoint": (["--resume"], "no checkpoint"),
    "resume of another shape": (["--resume", "--n_embd", "64"], "shape"),
    "zero batch size": (["--batch_size", "0"], "must be a positive integer"),
    "negative steps": (["--max_steps", "-5"], "must be a positive integer"),
    "zero layers": (["--n_layer", "0"], "must be a positive integer"),
    "not a number": (["--max_lr", "fast"], "must be a positive number"),
    "nan": (["--max_lr", "nan"], "must be a positive number"),
    "beta beyond 1": (["--beta2", "1.5"], "must be a number in [0, 1)"),
    "fsdp without torchrun": (["--fsdp"], "launch it with torchrun"),
    "negative seed": (["--seed", "-1"], "must be an integer from 0 to 2**63 - 1"),
    "seed too large": (["--seed", str(10**21)], "must be an integer from 0 to 2**63 - 1"),
    "warmup beyond the run": (["--warmup_steps", "5"], "--warmup_steps 5 is beyond --max_steps 2"),
    "min_lr above max_lr": (["--min_lr", "1e-2"], "--min_lr 0.01 is above --max_lr 0.003"),
}


@pytest.mark.parametrize("case", BAD_OPTIONS)
def test_bad_input_gets_one_line_and_leaves_out_dir_untouched(case, tmp_path, capsys):
    flags, message = BAD_OPTIONS[case]
    out_dir = tmp_path / "out"
    if case == "resume of another shape":
        save_run(out_dir, "--n_embd", "16")
    before = {p: p.read_bytes() for p in out_dir.glob("*")} if out_dir.exists() else None
    capsys.readouterr()
    with pytest.raises((UserError, DataError, SystemExit)) as error:
        resolve(["--out_dir", str(out_dir), *TINY, "--max_steps", "2", *flags])
    if error.type is SystemExit:  # argparse's: one line on stderr, exit 2
        err = capsys.readouterr().err
        assert error.value.code == 2 and err.count("\n") == 1 and message in err, err
    else:
        assert "\n" not in str(error.value) and message in str(error.value), error.value
    after = {p: p.read_bytes() for p in out_dir.glob("*")} if out_dir.exists() else None
    assert after == before


def test_fsdp_under_torchrun_is_accepted_on_any_number_of_processes(tmp_path):
    assert resolved(tmp_path, "--fsdp", world_size=1).args.fsdp  # torchrun --nproc_per_node=1 included


def readme_option_table():
    """{flag: the default column} of README's table of train.py's options (the one under "## Training"), a row of
    several flags giving each its own of the comma-separated defaults."""
    with open(os.path.join(REPO, "README.md"), encoding="utf-8") as f:
        text = f.read()
    table = text[text.index("## Training"):].split("\n\n")[2]  # (after the heading and its sentence)
    rows = {}
    for line in table.splitlines()[2:]:
        flags_cell, default_cell = [cell.strip() for cell in line.strip("|").split("|")[:2]]
        flags = re.findall(r"(--\w+)", flags_cell)
        defaults = [d.strip() for d in default_cell.split(",")] if len(flags) > 1 else [default_cell]
        if len(defaults) != len(flags):  # one default for them all ("off", "from the preset")
            defaults = defaults[:1] * len(flags)
        rows.update(zip(flags, defaults))
    return rows


def test_readme_s_option_table_gives_the_defaults_help_gives():
    parser, rows = options.build_parser(), readme_option_table()
    defaults = {action.option_strings[0]: action.default for action in parser._get_optional_actions()
                if action.option_strings}  # (a test may read argparse's list; the code never does)
    assert len(rows) >= 25 and set(rows) <= set(defaults), set(rows) - set(defaults)
    for flag, readme in rows.items():
        value = defaults[flag]
        name = flag.removeprefix("--")
        if value is None and name in options.DEFAULTS:  # the optimizer's: README's figure is the default optimizer's
            value = options.DEFAULTS[name][options.DEFAULTS["optimizer"]["argparse"]]
        shown = readme.strip("`").split(" ")[0]
        if isinstance(value, bool):
            assert shown == ("on" if value else "off"), (flag, readme)
        elif isinstance(value, (int, float)):
            assert float(shown) == value, (flag, readme, value)
        elif isinstance(value, str):
            assert shown == value, (flag, readme, value)
        else:  # None: no value; README says what stands in for it (derived from other options, or none)
            assert not re.fullmatch(r"[\d.e+-]+", shown), (flag, readme)

import glob
import json
import os
import shutil

import pytest

import tracking
import train
from conftest import TINY, losses, read_metrics, run_train

SCALARS = ("loss", "lr", "grad_norm", "val_loss", "val_bpb")


def tensorboard_scalars(out_dir):
    """{name: [(step, value), ...]} as TensorBoard's own reader sees out_dir/tensorboard, every event (duplicates
    included)."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    reader = EventAccumulator(str(out_dir / "tensorboard"), purge_orphaned_data=True).Reload()
    return {name: [(e.step, e.value) for e in reader.Scalars(name)] for name in reader.Tags()["scalars"]}


def assert_tensorboard_holds_metrics_jsonl(out_dir):
    scalars = tensorboard_scalars(out_dir)
    for name in SCALARS:
        expected = [(r["step"], r[name]) for r in read_metrics(out_dir) if name in r]
        assert [step for step, _ in scalars[name]] == [step for step, _ in expected], name
        assert [value for _, value in scalars[name]] == pytest.approx([value for _, value in expected], rel=1e-6)
    return scalars


def test_tensorboard_holds_metrics_jsonl_s_records_once_each_across_a_resume(small_text, tmp_path):
    pytest.importorskip("tensorboard")
    flags = ["--tensorboard", "--min_lr", "3e-3"]
    run_train(small_text, tmp_path / "run", *flags, "--max_steps", "3")
    shutil.copy(tmp_path / "run" / "ckpt.pt", tmp_path / "ckpt_step3.pt")
    assert_tensorboard_holds_metrics_jsonl(tmp_path / "run")
    # the run goes on to step 5, then is "interrupted": its checkpoint of step 3 is the last one saved
    run_train(small_text, tmp_path / "run", *flags, "--resume", "--max_steps", "5")
    shutil.copy(tmp_path / "ckpt_step3.pt", tmp_path / "run" / "ckpt.pt")
    run_train(small_text, tmp_path / "run", *flags, "--resume", "--max_steps", "6")
    scalars = assert_tensorboard_holds_metrics_jsonl(tmp_path / "run")
    assert [step for step, _ in scalars["loss"]] == [1, 2, 3, 4, 5, 6]  # steps 4 and 5 once: the later run's
    # a new run in the same out_dir (--overwrite) starts the curves afresh, as it does metrics.jsonl
    run_train(small_text, tmp_path / "run", *flags, "--overwrite", "--max_steps", "2")
    scalars = assert_tensorboard_holds_metrics_jsonl(tmp_path / "run")
    assert [step for step, _ in scalars["loss"]] == [1, 2]


def wandb_records(path):
    """The records of a W&B run file (its .wandb: a header of 7 bytes, then LevelDB's log format, each record a
    protobuf), read here so that the test needs no network."""
    from wandb.proto import wandb_internal_pb2

    data, pos, block, pending = open(path, "rb").read(), 7, 32768, b""
    while pos + 7 <= len(data):
        space = block - pos % block
        length, kind = int.from_bytes(data[pos + 4:pos + 6], "little"), data[pos + 6]
        if space < 7 or (length == 0 and kind == 0):  # the rest of a block is padding
            pos += space
            continue
        pending += data[pos + 7:pos + 7 + length]
        pos += 7 + length
        if kind in (1, 4):  # a whole record, or the last piece of one
            record = wandb_internal_pb2.Record()
            record.ParseFromString(pending)
            yield record
            pending = b""


def wandb_run(out_dir, run_id):
    """(config, history) of the offline W&B run files of run_id in out_dir, all of its sessions."""
    config, history = {}, []
    for path in sorted(glob.glob(str(out_dir / "wandb" / f"offline-run-*-{run_id}" / "*.wandb"))):
        for record in wandb_records(path):
            kind = record.WhichOneof("record_type")
            if kind == "run":
                config.update({item.key: json.loads(item.value_json) for item in record.run.config.update})
            elif kind == "history":
                history.append({item.nested_key[0]: json.loads(item.value_json) for item in record.history.item
                                if not item.nested_key[0].startswith("_")})
    return config, history


def test_wandb_offline_holds_the_history_and_config_and_a_resume_keeps_the_run(small_text, tmp_path, monkeypatch):
    pytest.importorskip("wandb")
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    out_dir = tmp_path / "run"
    run_train(small_text, out_dir, "--wandb", "gpt2-tests", "--max_steps", "3")
    run_id = (out_dir / tracking.WANDB_RUN_ID).read_text()
    run_train(small_text, out_dir, "--wandb", "gpt2-tests", "--resume", "--max_steps", "5")
    assert (out_dir / tracking.WANDB_RUN_ID).read_text() == run_id  # the same run, continued
    config, history = wandb_run(out_dir, run_id)
    assert config["max_lr"] == 3e-3 and config["model"] == "gpt2-nano" and config["wandb"] == "gpt2-tests"
    expected = [{k: v for k, v in r.items() if k != "step"} for r in read_metrics(out_dir)]
    # (record by record: pytest.approx takes no list of dicts since pytest 9.2)
    assert [sorted(record) for record in history] == [sorted(record) for record in expected]
    for logged, written in zip(history, expected):
        assert logged == pytest.approx(written)


def test_a_tracker_that_fails_warns_once_and_the_run_goes_on_with_the_same_losses(small_text, tmp_path, capsys,
                                                                                  monkeypatch):
    pytest.importorskip("tensorboard")
    plain = run_train(small_text, tmp_path / "plain", "--max_steps", "3")

    def broken(self, record):
        raise ConnectionError("the tracker's server went away")

    monkeypatch.setattr(tracking.TensorBoard, "log", broken)
    capsys.readouterr()
    tracked = run_train(small_text, tmp_path / "tracked", "--tensorboard", "--max_steps", "3")
    warnings = [line for line in capsys.readouterr().err.splitlines() if line.startswith("warning:")]
    assert warnings == ["warning: TensorBoard failed (the tracker's server went away); training goes on without it "
                        "(metrics.jsonl has every record)"]
    assert losses(tracked) == losses(plain)


@pytest.mark.parametrize("flag, package", [(["--tensorboard"], "tensorboard"), (["--wandb", "p"], "wandb")])
def test_a_tracker_whose_package_is_missing_is_one_line_before_anything_is_written(flag, package, small_text,
                                                                                   tmp_path, capsys, monkeypatch):
    real = tracking.importlib.util.find_spec
    monkeypatch.setattr(tracking.importlib.util, "find_spec", lambda name: None if name == package else real(name))
    with pytest.raises(SystemExit):
        train.main(["--dataset_path", small_text, "--out_dir", str(tmp_path / "out"), *TINY, *flag])
    err = capsys.readouterr().err
    assert err == f"error: {flag[0]} needs the {package} package: pip install {package} (or drop {flag[0]})\n"
    assert not os.path.exists(tmp_path / "out")


def test_a_tensorboard_folder_that_cannot_be_written_is_one_warning_and_no_traceback(small_text, tmp_path, capfd,
                                                                                     monkeypatch):
    pytest.importorskip("tensorboard")
    plain = run_train(small_text, tmp_path / "plain", "--max_steps", "3")
    # out_dir/tensorboard read-only (as root, chmod cannot make it so): every file opened in it is refused
    read_only = str(tmp_path / "tracked" / "tensorboard")

    def refusing(real):
        def open_(path, *args, **kwargs):
            if str(path).startswith(read_only):
                raise PermissionError(13, "Permission denied", str(path))
            return real(path, *args, **kwargs)
        return open_

    monkeypatch.setattr("builtins.open", refusing(open))
    monkeypatch.setattr(os, "open", refusing(os.open))
    capfd.readouterr()
    tracked = run_train(small_text, tmp_path / "tracked", "--tensorboard", "--max_steps", "3")
    err = capfd.readouterr().err
    [warning] = [line for line in err.splitlines() if line.startswith("warning:")]
    assert warning.startswith("warning: TensorBoard could not start ([Errno 13] Permission denied")
    assert "Traceback" not in err and "Exception in thread" not in err
    assert losses(tracked) == losses(plain)

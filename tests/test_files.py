import argparse
import json
import os
import subprocess
import sys

import pytest
import torch

import files
from checkpoint import load_checkpoint, save_checkpoint
from cli import UserError
from files import DataError, WriteError, parse_json, read_text, write_atomically
from model import GPT, GPTConfig


@pytest.fixture
def small_disk(tmp_path):
    """A 1 MB filesystem (tmpfs), to fill up: needs the right to mount, as root has on Linux."""
    disk = tmp_path / "disk"
    disk.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(disk)], capture_output=True).returncode:
        pytest.skip("cannot mount a small filesystem here (needs root on Linux)")
    yield disk
    subprocess.run(["umount", str(disk)])


def test_a_full_disk_is_one_line_and_keeps_the_old_file_whole_with_no_temporary_left(small_disk):
    path = str(small_disk / "data.bin")
    write_atomically(path, lambda f: f.write(b"old"))
    with pytest.raises(WriteError, match=r"cannot write .*data\.bin: the disk is full") as error:
        write_atomically(path, lambda f: f.write(b"x" * 2_000_000))
    assert "\n" not in str(error.value)
    assert open(path, "rb").read() == b"old" and os.listdir(small_disk) == ["data.bin"]


def test_a_checkpoint_too_big_for_the_disk_is_one_line_and_the_previous_one_is_kept(small_disk):
    path = str(small_disk / "ckpt.pt")
    small = GPT(GPTConfig(n_layer=1, n_head=1, n_embd=8, block_size=8, vocab_size=64))
    scaler = torch.amp.GradScaler("cpu", enabled=False)
    save_checkpoint(path, small, torch.optim.AdamW(small.parameters()), scaler, 1, argparse.Namespace())
    big = GPT(GPTConfig(n_layer=1, n_head=1, n_embd=64, block_size=8, vocab_size=4096))  # 1 MB of weights alone
    with pytest.raises(WriteError, match=r"the disk is full \(it needs about 2\.\d MB, 1\.0 MB free"):
        save_checkpoint(path, big, torch.optim.AdamW(big.parameters()), scaler, 2, argparse.Namespace())
    assert load_checkpoint(path)["step"] == 1 and os.listdir(small_disk) == ["ckpt.pt"]


def test_temporaries_of_dead_writers_are_removed_and_live_ones_kept(tmp_path):
    path = str(tmp_path / "cache.npz")
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    stale = [f"{path}.{files.HOST}.{dead.pid}.tmp", f"{path}.{dead.pid}.tmp"]  # (the second: earlier versions' name)
    kept = [f"{path}.{files.HOST}.{os.getppid()}.tmp", f"{path}.other-host.{dead.pid}.tmp"]
    for name in stale + kept:
        open(name, "w").close()
    write_atomically(path, lambda f: f.write(b"new"))
    assert sorted(os.listdir(tmp_path)) == sorted(os.path.basename(p) for p in [path, *kept])


# ----------------------------------------------------------------------------------------------------------------
# Reading the user's files

@pytest.mark.parametrize(
    "content, message",
    [(None, "does not exist"), (b"", "is empty"), (b"  \n", "is empty"), (b"caf\xe9 latin-1", "not UTF-8"),
     ("To be, or not to be".encode("utf-16-le"), "UTF-16"),  # no byte-order mark: valid UTF-8, NULs between letters
     ("To be, or not to be".encode("utf-16"), "UTF-16"), (b"\0" * 1000 + b"text", "NUL bytes")],
)
def test_unusable_dataset_files_are_named(tmp_path, content, message):
    path = tmp_path / "data.txt"
    if content is not None:
        path.write_bytes(content)
    with pytest.raises(DataError, match=message):
        read_text(str(path))


def test_a_utf8_byte_order_mark_is_not_part_of_the_text(tmp_path):
    path = tmp_path / "notepad.txt"  # as Notepad and PowerShell write UTF-8
    path.write_bytes(b"\xef\xbb\xbfTo be")
    assert read_text(str(path)) == (b"\xef\xbb\xbfTo be", "To be")


def test_json_nested_too_deeply_is_invalid_json_not_a_recursion_error():
    assert parse_json('{"a": [1, 2]}') == {"a": [1, 2]}
    with pytest.raises(json.JSONDecodeError, match="nested too deeply"):
        parse_json("[" * 100_000 + "]" * 100_000)


def test_a_data_error_is_a_user_error_so_every_script_reports_it_in_one_line():
    assert issubclass(DataError, UserError)

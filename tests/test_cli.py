import argparse
import ast
import os
import subprocess
import sys

import pytest

from cli import OneLineParser, fraction, positive_int
from conftest import REPO


def test_a_bad_number_is_refused_in_one_line_as_the_command_line_is_read():
    parser = OneLineParser(prog="train.py")
    parser.add_argument("--seq_len", type=positive_int)
    parser.add_argument("--dropout", type=fraction)
    assert parser.parse_args(["--seq_len", "8", "--dropout", "0.5"]) == argparse.Namespace(seq_len=8, dropout=0.5)
    for argv, why in [(["--seq_len", "-5"], "must be a positive integer, got -5"),
                      (["--seq_len", "x"], "must be a positive integer, got 'x'"),
                      (["--dropout", "nan"], "must be a number in [0, 1), got nan")]:
        result = subprocess.run([sys.executable, "-c", "import sys; from cli import *; p = OneLineParser(prog='t'); "
                                 "p.add_argument('--seq_len', type=positive_int); p.add_argument('--dropout', "
                                 "type=fraction); p.parse_args(sys.argv[1:])", *argv],
                                cwd=REPO, capture_output=True, text=True)
        assert result.returncode == 2 and result.stderr.count("\n") == 1 and why in result.stderr


def test_the_command_line_conventions_load_without_torch():
    # the bottom of the imports: plot.py, which runs without torch, uses them too
    check = "import sys, cli, plot; assert 'torch' not in sys.modules"
    assert subprocess.run([sys.executable, "-c", check], cwd=REPO).returncode == 0


@pytest.mark.parametrize("name", ["data.py", "records.py", "tokenizer.py", "files.py", "cli.py"])
def test_data_and_files_know_nothing_of_devices_or_processes(name):
    tree = ast.parse(open(os.path.join(REPO, name), encoding="utf-8").read())
    imported = {alias.name for node in ast.walk(tree) if isinstance(node, ast.Import) for alias in node.names}
    imported |= {node.module for node in ast.walk(tree) if isinstance(node, ast.ImportFrom)}
    assert not imported & {"runtime", "parallel", "optim", "torch.distributed"}, f"{name} imports {imported}"

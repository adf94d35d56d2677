"""
The conventions every script shares on the command line, at the bottom of the imports (no torch): a problem the user
can fix is one line on stderr, never a traceback; a bad flag is refused as the command line is read.

    parser = OneLineParser(...)
    parser.add_argument("--seq_len", type=positive_int)     # "argument --seq_len: must be a positive integer, got -5"
    try:
        ...
    except UserError as e:
        print_error(e)                                       # "error: ..." from rank 0 only
        sys.exit(2)
"""

import argparse
import math
import os
import sys


class UserError(Exception):
    """A problem the user can fix (options, a device, a checkpoint, a diverging run): one line, no traceback.
    from_this_rank: a problem of this process alone under torchrun (print_error prints it whatever its rank)."""

    def __init__(self, message, from_this_rank=False):
        super().__init__(message)
        self.from_this_rank = from_this_rank


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """--help with each option's default, once: argparse's where the flag has one; a flag whose default is None
    either has none (it is off) or depends on other options, and then its help says what it is. (argparse's own
    formatter appends "(default: None)" to those: two defaults where the help names one.)"""

    def _get_help_string(self, action):  # (the hook argparse's formatters override)
        return action.help if action.default is None else super()._get_help_string(action)


class OneLineParser(argparse.ArgumentParser):
    def error(self, message):  # argparse's default prints the whole usage first; one line says it better
        self.exit(2, f"{self.prog}: error: {message} (see --help)\n")


# Types for numeric flags, so that a bad value is refused as the command line is read, in argparse's one line
# ("argument --seq_len: must be a positive integer, got -5"), in every script alike.


def number_type(kind, check, wanted):
    def parse(text):
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"must be {wanted}, got {text!r}")
        if not (math.isfinite(value) and check(value)):  # nan and inf are floats too
            raise argparse.ArgumentTypeError(f"must be {wanted}, got {text}")
        return value
    return parse


positive_int = number_type(int, lambda v: v > 0, "a positive integer")
non_negative_int = number_type(int, lambda v: v >= 0, "an integer, 0 or more")
positive_float = number_type(float, lambda v: v > 0, "a positive number")
non_negative_float = number_type(float, lambda v: v >= 0, "a number, 0 or more")
fraction = number_type(float, lambda v: 0 <= v < 1, "a number in [0, 1)")
probability = number_type(float, lambda v: 0 < v <= 1, "a number in (0, 1]")
# what both numpy's and torch's generators take: a negative seed or one past 2**63 fails only once a run has begun
seed = number_type(int, lambda v: 0 <= v < 2**63, "an integer from 0 to 2**63 - 1")


def add_device_flags(parser):
    """--device and --dtype, which every script that runs the model takes (setup_runtime's arguments)."""
    parser.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda", "mps"],
                        help="auto: cuda, then mps, then cpu")
    parser.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16", "float16"],
                        help="autocast dtype; auto: bfloat16 where the device runs it faster than float32, float16 "
                        "on older GPUs")


def first_line(error, limit=200):
    """An exception's message cut to its first line (at most `limit` characters), or its type's name if it has none:
    the reason inside a one-line error."""
    text = str(error).strip()
    return text.splitlines()[0][:limit] if text else type(error).__name__


def print_error(error):
    """`error: ...` on stderr, from rank 0 only: under torchrun every rank fails alike, and one line is enough (a
    UserError from_this_rank is printed by the rank it happened on)."""
    if os.environ.get("RANK", "0") == "0" or getattr(error, "from_this_rank", False):
        print(f"error: {error}", file=sys.stderr)


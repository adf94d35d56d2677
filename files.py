"""
Files in and out, at the bottom of the data stack (it imports only cli.py, so every module that reads users' data
can raise its DataError).

Writing files so that what is already on disk is never lost: every file the runs write (checkpoints, metrics, token
caches) goes through here.

    write_atomically(path, lambda f: torch.save(state, f))

The new content goes to a temporary file of this process's own, is flushed to the disk (fsync), and only then
renamed over the old file: a crash, a kill or a full disk at any moment leaves the old file or the new one, whole.
A failed write removes its temporary file and raises WriteError, one line saying which file, why and what to do.
Temporaries left by a killed process (whose pid is gone) are removed by the next write of the same file.

Reading the user's files: read_text refuses a missing, empty or non-UTF-8 file with a DataError naming the fix, and
parse_json makes JSON nested too deeply one more JSONDecodeError, which every reader reports in its one line.
"""

import errno
import glob
import json
import os
import shutil
import socket

from cli import UserError

HOST = socket.gethostname()


class DataError(UserError):
    """A problem with the user's data (a text, records, shards, HellaSwag's file): one line, without a traceback."""


class WriteError(UserError):
    """A file could not be written (disk full, read-only, permission, quota): one line, the old file kept."""


def temporary_path(path):
    """Where this process writes path's next version: named by host and pid, so that two processes writing the same
    file (two jobs, or ranks sharing a filesystem) never share a temporary, and a stale one can be told from a live
    one."""
    return f"{path}.{HOST}.{os.getpid()}.tmp"


def write_atomically(path, write, mode="wb", size=None):
    """Replace path's content with what write(file) writes, all or nothing (see the module's docstring). size: about
    how many bytes it writes, for the message when they don't fit."""
    remove_stale_temporaries(path)
    tmp_path = temporary_path(path)
    try:
        with open(tmp_path, mode) as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())  # on the disk before the rename makes it the file: a power cut keeps one whole
        os.replace(tmp_path, path)
        fsync_directory(os.path.dirname(path) or ".")
    except BaseException as e:  # also KeyboardInterrupt: the temporary never outlives a failed write
        if os.path.exists(tmp_path):
            os.remove(tmp_path)
        if isinstance(e, Exception):
            raise WriteError(describe_write_failure(path, e, size)) from e
        raise


def describe_write_failure(path, error, size=None):
    """One line on why path could not be written. torch.save reports a failed write as a RuntimeError of its own,
    raised while handling the OSError that says why: found in the chain of exceptions."""
    os_error = error
    while os_error is not None and not isinstance(os_error, OSError):
        os_error = os_error.__cause__ or os_error.__context__
    free = free_bytes(os.path.dirname(path) or ".")
    if os_error is not None and os_error.errno in (errno.ENOSPC, errno.EDQUOT):
        needed = f"it needs about {amount(size)}, " if size else ""
        reason = f"the disk is full ({needed}{amount(free)} free without it)"
    elif os_error is not None:
        reason = os_error.strerror or str(os_error)
    else:
        reason = (str(error).strip().splitlines() or [type(error).__name__])[-1][:200]
    return f"cannot write {path}: {reason}; free some space or write elsewhere (the previous version, if any, is kept)"


def amount(size):
    return f"{size / 1e9:.1f} GB" if size >= 1e9 else f"{size / 1e6:.1f} MB"


def free_bytes(directory):
    try:
        return shutil.disk_usage(directory).free
    except OSError:
        return -1


def fsync_directory(directory):
    """The rename itself on the disk too (POSIX; elsewhere there is nothing to open)."""
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def remove_stale_temporaries(path):
    """Remove path's temporaries whose writer is dead: written on this host by a pid that no longer runs. Those of
    other hosts (a shared filesystem) are left alone: their writers cannot be asked here."""
    for tmp_path in glob.glob(glob.escape(path) + ".*.tmp"):
        host, _, pid = tmp_path[len(path) + 1 : -len(".tmp")].rpartition(".")
        # (no host: the PATH.<pid>.tmp of earlier versions, written here)
        if host in (HOST, "") and pid.isdigit() and not process_alive(int(pid)):
            try:
                os.remove(tmp_path)
            except OSError:
                pass


def process_alive(pid):
    if os.name == "nt":  # Windows' os.kill would end the process: assume it lives
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's process
        return True
    return True


# ----------------------------------------------------------------------------------------------------------------
# Reading the user's files

def read_text(path, kind="text file"):
    """(bytes, text) of the file; a missing, empty or non-UTF-8 file is a DataError naming the fix (a `kind` of
    file)."""
    try:
        with open(path, "rb") as f:
            raw = f.read()
    except FileNotFoundError:
        raise DataError(f"dataset file {path} does not exist: pass an existing {kind} with --dataset_path")
    except IsADirectoryError:
        raise DataError(f"dataset path {path} is a directory: pass a {kind} with --dataset_path")
    except OSError as e:
        raise DataError(f"cannot read dataset file {path}: {e.strerror}")
    if not raw.strip():
        raise DataError(f"dataset file {path} is empty: it needs some text to train on")
    # UTF-16 (Windows' "Unicode") is valid UTF-8 byte for byte when it is ASCII text with a NUL after each
    # character: it would train, on noise. Text has no NUL bytes; a few percent of them is another encoding.
    if raw.startswith((b"\xff\xfe", b"\xfe\xff")) or raw.count(b"\0") > len(raw) // 100:
        raise DataError(f"dataset file {path} is not UTF-8 text (UTF-16, or binary: it has NUL bytes): convert it to "
                        f"UTF-8, e.g. iconv -f UTF-16 -t UTF-8")
    try:
        # a UTF-8 byte-order mark (Notepad, PowerShell) is not text: dropped
        return raw, raw.decode("utf-8").removeprefix("\ufeff")
    except UnicodeDecodeError as e:
        raise DataError(f"dataset file {path} is not UTF-8 text (bad byte at offset {e.start}): convert it to UTF-8")


def parse_json(text):
    """json.loads(text), with JSON nested too deeply for Python's parser ([[[[...]]]]: a RecursionError) reported as
    the invalid JSON it is here, a JSONDecodeError, so that every reader's one-line message covers it too."""
    try:
        return json.loads(text)
    except RecursionError:
        raise json.JSONDecodeError("nested too deeply", text, 0) from None

"""Durable writes: a file that replaces another is written beside it, fsynced and renamed, so a
kill, a power loss or a full disk leaves the old file or the new one, never a torn one.

`WriteError` is the one error a failed write becomes (the CLIs exit with status 4 on it): its
message says where, why (a full disk is named as such) and what was kept.
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import shutil
import struct
import tempfile
from pathlib import Path


class WriteError(RuntimeError):
    """An output could not be written (disk full, I/O error); the message names the path and
    what was kept."""


def fsync_path(path: Path) -> None:
    """Flush one file's or directory's data (a directory: its entries) to disk."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_tree(root: Path) -> None:
    """Flush every file under `root`, then the directories, so a rename publishes durable data."""
    for dirpath, _, files in os.walk(root):
        for name in files:
            fsync_path(Path(dirpath) / name)
        fsync_path(Path(dirpath))


def default_mode(directory: bool = False) -> int:
    """The mode `open`/`mkdir` would give under the current umask (mkstemp/mkdtemp make private
    0600/0700 entries; a published output must be as readable as any other)."""
    mask = os.umask(0)
    os.umask(mask)
    return (0o777 if directory else 0o666) & ~mask


def atomic_write(path: str | Path, data: str | bytes) -> None:
    """Replace `path` by `data` (str: UTF-8) atomically and durably: a temporary file in the same
    folder, fsynced, renamed over `path`, then the folder fsynced. Raises WriteError (the old
    file kept, the temporary one removed) when it cannot be written."""
    path = Path(path)
    raw = data.encode("utf-8") if isinstance(data, str) else data
    tmp = None
    try:
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
        with os.fdopen(fd, "wb") as f:
            f.write(raw)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, default_mode())
        os.replace(tmp, path)
        tmp = None
        fsync_path(path.parent)
    except OSError as e:
        kept = "the previous version is kept" if path.exists() else "nothing was written"
        raise WriteError(f"cannot write {path}: {why_write_failed(e, path.parent)}; {kept}") from e
    finally:
        if tmp is not None:
            Path(tmp).unlink(missing_ok=True)


def is_disk_full(error: BaseException) -> bool:
    """Whether `error` (or an error it was raised from) reports a full disk or quota. safetensors
    and torch.save wrap the OSError into their own types, so their text is read too."""
    while error is not None:
        if isinstance(error, OSError) and error.errno in (errno.ENOSPC, errno.EDQUOT):
            return True
        if "No space left" in str(error) or "StorageFull" in str(error):
            return True
        error = error.__cause__ or error.__context__
    return False


# Below this much free space a failed write is put down to a full disk: torch.save's error
# ("file write failed") carries no errno. Ask before removing the partial output.
NEARLY_FULL_BYTES = 16 * 2**20


def why_write_failed(error: BaseException, where: Path) -> str:
    """The reason a write under `where` failed, for a message: a full disk with its free space,
    else the error itself."""
    try:
        free = shutil.disk_usage(where).free
    except OSError:
        free = None
    if is_disk_full(error) or (free is not None and free < NEARLY_FULL_BYTES):
        room = "free space unknown" if free is None else f"{free / 2**20:.1f} MiB free"
        return f"the disk holding {where} is full ({room})"
    return f"{type(error).__name__}: {getattr(error, 'strerror', None) or error}"


def file_sha256(path: Path) -> str:
    """Hex sha256 of a file's bytes, read in 16 MiB blocks."""
    digest = hashlib.sha256()
    with path.open("rb") as f:
        while block := f.read(16 * 2**20):
            digest.update(block)
    return digest.hexdigest()


def safetensors_problem(path: Path) -> str | None:
    """Why the .safetensors file `path` is unusable (unreadable header, truncated), or None when
    its header parses and the data it describes is all there. Reads the header only."""
    try:
        with path.open("rb") as f:
            (n,) = struct.unpack("<Q", f.read(8))
            if n > path.stat().st_size:
                raise ValueError(f"header length {n} exceeds the file")
            header = json.loads(f.read(n))
        end = max((v["data_offsets"][1] for k, v in header.items() if k != "__metadata__"), default=0)
    except (OSError, ValueError, KeyError, TypeError, AttributeError, struct.error) as e:
        return f"{path.name} is unreadable ({type(e).__name__}: {e})"
    if path.stat().st_size != 8 + n + end:
        return f"{path.name} is truncated ({path.stat().st_size} of {8 + n + end} bytes)"
    return None

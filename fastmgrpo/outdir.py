"""Who may write where: one run per output folder at a time (a lock file naming its owner), and
no output path that is, holds or lies inside a path the command reads."""

from __future__ import annotations

import atexit
import json
import os
import socket
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path

LOCK_NAME = "fastmgrpo.lock"


class OutputDirError(ValueError):
    """An output path that must not be written now; the message names it and what to do."""


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's process: alive
        return True
    return True


def _owner(path: Path) -> dict | None:
    """The lock's {pid, host, started}; None when it is gone, or unreadable."""
    try:
        owner = json.loads(path.read_text(encoding="utf-8"))
        return owner if isinstance(owner.get("pid"), int) and isinstance(owner.get("host"), str) else None
    except FileNotFoundError:
        return {}
    except (OSError, ValueError, AttributeError):
        return None


_held: dict[Path, Path] = {}  # folder -> its lock file, for the locks this process holds


def lock_output_dir(folder: Path) -> None:
    """Take `folder`'s lock for this process (again: no-op), until `unlock_output_dir` or exit.

    The lock file is published whole (hard-linked from a complete temporary file). One held by
    a live process is refused; one whose process is gone (same host) is taken over, saying so;
    one from another host is refused, since its process cannot be checked from here.
    """
    folder = Path(folder).resolve()
    if folder in _held:
        return
    path = folder / LOCK_NAME
    me = {"pid": os.getpid(), "host": socket.gethostname(), "started": time.strftime("%Y-%m-%d %H:%M:%S")}
    fd, tmp = tempfile.mkstemp(dir=folder, prefix=f".{LOCK_NAME}.")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            json.dump(me, f)
        for _ in range(10):  # retried when the lock changes under us (another run takes or frees it)
            try:
                os.link(tmp, path)
                break
            except FileExistsError:
                pass
            owner = _owner(path)
            if owner == {}:
                continue
            if owner is None:
                raise OutputDirError(f"output directory {folder} has an unreadable lock file {path}: "
                                     "delete it if no run is using the folder")
            who = f"pid {owner['pid']} on {owner['host']}, started {owner.get('started', '?')}"
            if owner["host"] != me["host"]:
                raise OutputDirError(f"output directory {folder} is in use by a run on another machine "
                                     f"({who}); if that run has ended, delete {path}")
            if owner["pid"] != me["pid"] and _alive(owner["pid"]):  # our own pid: a dead run's, reused
                raise OutputDirError(f"output directory {folder} is in use by another run ({who}): wait "
                                     "for it to end or pick another --output-dir")
            print(f"note: taking over the lock of {folder} from a run that is gone ({who})", file=sys.stderr)
            path.unlink(missing_ok=True)
        else:
            raise OutputDirError(f"output directory {folder}: cannot take its lock {path} (it keeps changing)")
    finally:
        os.unlink(tmp)
    _held[folder] = path


def unlock_output_dir(folder: Path) -> None:
    """Give `folder`'s lock back, if this process holds it."""
    path = _held.pop(Path(folder).resolve(), None)
    if path is not None and (_owner(path) or {}).get("pid") == os.getpid():
        path.unlink(missing_ok=True)


@atexit.register
def _unlock_all() -> None:
    for folder in list(_held):
        unlock_output_dir(folder)


def _within(inner: Path, outer: Path) -> bool:
    return inner == outer or outer in inner.parents


def check_outputs_apart(outputs: Sequence[tuple[str, Path]], inputs: Sequence[tuple[str, str | Path | None]]) -> None:
    """Raise OutputDirError when a path a command writes (a file, or a folder it writes or
    deletes in) is a path it reads, lies inside a folder it reads, or holds an input; or when two
    outputs are the same. Paths compare resolved (links, `..`) and by identity (hard links).

    outputs, inputs: (what: an option name, for the message; path) pairs; inputs that are None
    or do not exist are skipped (they fail on their own).
    """
    inputs = [(k, Path(v)) for k, v in inputs if v and Path(v).exists()]
    outs = [(k, Path(v)) for k, v in outputs]
    for i, (what, out) in enumerate(outs):
        o = out.resolve()
        for other, path in [*inputs, *outs[i + 1:]]:
            p = path.resolve()
            same = o == p or (o.exists() and p.exists() and os.path.samefile(o, p))
            if same or _within(o, p) or _within(p, o):
                verb = "is" if same else "lies inside" if _within(o, p) else "holds"
                raise OutputDirError(f"{what} {out} {verb} {other} {path}: it would be overwritten; "
                                     "write somewhere else")

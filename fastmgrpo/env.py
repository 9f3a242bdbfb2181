"""Every environment variable fastmgrpo reads, in one place (read when called, never at import).

| variable               | read by                        | meaning                                        |
|------------------------|--------------------------------|------------------------------------------------|
| FASTMGRPO_CACHE        | `cache_dir`                    | converted-model cache (default ~/.cache/fastmgrpo) |
| WORLD_SIZE, LOCAL_RANK | `world_size`, `local_rank`     | set by torchrun: the job size, this rank's GPU |
| FASTMGRPO_SEED_SHIFT   | `seed_shift` (tests/conftest)  | shifts every test's seed, for seed sweeps      |
| FASTMGRPO_BACKEND      | `fastmgrpo.kernels.dispatch`   | loss kernel backend: auto, triton or torch     |
| OMP_NUM_THREADS        | `cpu_threads`                  | CPU threads; unset: the cores this process may use |

FASTMGRPO_BACKEND stays read in `kernels/dispatch.resolve_backend`: the kernels package is also
used on its own and must not import the rest of fastmgrpo. The FASTMGRPO_BENCH_* knobs belong to
the benchmark scripts in bench/ and are read there.
"""

from __future__ import annotations

import os
from pathlib import Path


def cache_dir() -> Path:
    """Directory holding converted models: `$FASTMGRPO_CACHE` or `~/.cache/fastmgrpo`."""
    return Path(os.environ.get("FASTMGRPO_CACHE", Path.home() / ".cache" / "fastmgrpo"))


def world_size() -> int:
    """Processes in the torchrun job (`$WORLD_SIZE`); 1 outside torchrun."""
    return int(os.environ.get("WORLD_SIZE", "1"))


def local_rank() -> int:
    """This process's device index on its node (`$LOCAL_RANK`, set by torchrun)."""
    return int(os.environ["LOCAL_RANK"])


def seed_shift() -> int:
    """`$FASTMGRPO_SEED_SHIFT` (default 0): added to every test's fixed seed for seed sweeps."""
    return int(os.environ.get("FASTMGRPO_SEED_SHIFT", "0"))


def cpu_threads() -> int:
    """Intra-op CPU threads for torch: `$OMP_NUM_THREADS` if set, else the cores this process may
    run on (its affinity mask: a container's or `taskset`'s share, not the machine's count)."""
    if os.environ.get("OMP_NUM_THREADS", "").isdigit() and int(os.environ["OMP_NUM_THREADS"]) > 0:
        return int(os.environ["OMP_NUM_THREADS"])
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)

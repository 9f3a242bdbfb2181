"""Atomic checkpoints: a run can be killed at any moment and still resume from the last one.

Layout under `<output_dir>/checkpoints/`:
    step-000004/        model.safetensors, config.json, tokenizer files (loads with from_pretrained)
                        trainer_state.pt  (optimizer keyed by parameter name, scheduler, torch RNG
                                           state; weights_only-safe)
                        trainer_state.json (step, bad-step count, run config)
    latest              name of the newest complete checkpoint
A checkpoint is written to a hidden temporary directory and renamed into place, and `latest` is
replaced atomically after that, so a crash mid-save leaves the previous checkpoint untouched.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path

import torch


def _atomic_write_text(path: Path, text: str) -> None:
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    with os.fdopen(fd, "w", encoding="utf-8") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def checkpoint_dir(output_dir: str | Path, step: int) -> Path:
    """Where checkpoint `step` goes."""
    return Path(output_dir) / "checkpoints" / f"step-{step:06d}"


def save_checkpoint(output_dir: str | Path, step: int, model, tokenizer, tensors: dict,
                    state: dict, keep: int = 2, weights: dict | None = None) -> Path:
    """Write checkpoint `step-{step:06d}` atomically and prune all but the newest `keep`.

    Args:
        weights: the model's full state dict when `model` holds only a shard (FSDP2).
        tensors: torch-serialisable state (optimizer/scheduler state dicts, RNG ByteTensors);
            reloaded with `torch.load(weights_only=True)`.
        state: JSON-serialisable trainer state (step, bad-step count, config).
    Returns:
        The final checkpoint directory.
    """
    final = checkpoint_dir(output_dir, step)
    root, name = final.parent, final.name
    root.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=root, prefix=f".tmp-{name}-"))
    model.save_pretrained(tmp, state_dict=weights, safe_serialization=True)
    tokenizer.save_pretrained(tmp)
    torch.save(tensors, tmp / "trainer_state.pt")
    (tmp / "trainer_state.json").write_text(json.dumps(state, indent=1), encoding="utf-8")
    if final.exists():  # re-saving the same step after a resume: replace it
        shutil.rmtree(final)
    os.replace(tmp, final)
    _atomic_write_text(root / "latest", name)
    for old in sorted(p for p in root.glob("step-*") if p.is_dir())[:-keep]:
        shutil.rmtree(old, ignore_errors=True)
    for stale in root.glob(".tmp-*"):  # leftovers of a save that was killed
        shutil.rmtree(stale, ignore_errors=True)
    return final


def latest_checkpoint(output_dir: str | Path) -> Path | None:
    """The newest complete checkpoint directory, or None."""
    root = Path(output_dir) / "checkpoints"
    pointer = root / "latest"
    if not pointer.is_file():
        return None
    path = root / pointer.read_text(encoding="utf-8").strip()
    return path if (path / "trainer_state.json").is_file() else None


def load_trainer_state(path: str | Path) -> tuple[dict, dict]:
    """(tensors, state) of a checkpoint written by `save_checkpoint`."""
    path = Path(path)
    tensors = torch.load(path / "trainer_state.pt", map_location="cpu", weights_only=True)
    state = json.loads((path / "trainer_state.json").read_text(encoding="utf-8"))
    return tensors, state

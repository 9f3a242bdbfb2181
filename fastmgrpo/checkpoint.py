"""Atomic checkpoints: a run can be killed at any moment and still resume from the last one.

Layout under `<output_dir>/checkpoints/`:
    step-000004/        model.safetensors, config.json, tokenizer files (loads with from_pretrained);
                        under LoRA adapter_model.safetensors + adapter_config.json instead
                        (PEFT's format: PeftModel.from_pretrained(base, path) loads it)
                        trainer_state.pt  (optimizer keyed by parameter name, scheduler, torch RNG
                                           state; weights_only-safe)
                        trainer_state.json (step, bad-step count, run config)
    latest              name of the newest complete checkpoint
A checkpoint is written to a hidden temporary directory, fsynced (files and directory) and
renamed into place, and `latest` is replaced atomically after that, so a crash or power loss
mid-save leaves the previous checkpoint untouched. When `latest` names a missing or damaged
checkpoint, `latest_checkpoint` falls back to the newest complete one.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import struct
import tempfile
import warnings
import zipfile
from pathlib import Path

import torch
from torch.distributed.checkpoint.state_dict import (StateDictOptions, get_model_state_dict,
                                                     get_optimizer_state_dict, set_optimizer_state_dict)

from .lora import ADAPTER_WEIGHTS, is_lora

# What a run leaves in its output directory (and --overwrite deletes); nothing else is touched.
RUN_FILES = ("metrics.jsonl", "config.json", "summary.json", "checkpoints", "tensorboard")
_STEP_RE = re.compile(r"(?:\.prev-)?step-(\d+)")  # .prev-*: a checkpoint being replaced


class CheckpointError(RuntimeError):
    """A checkpoint or output directory that cannot be used; the message names the path."""


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _fsync_tree(root: Path) -> None:
    """Flush every file under `root`, then the directories, so a rename publishes durable data."""
    for dirpath, _, files in os.walk(root):
        for name in files:
            _fsync(Path(dirpath) / name)
        _fsync(Path(dirpath))


def _atomic_write_text(path: Path, text: str) -> None:
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    with os.fdopen(fd, "w", encoding="utf-8") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    _fsync(path.parent)


def check_writable_dir(path: Path) -> None:
    """Create `path` if needed and prove a file can be written in it (raises CheckpointError)."""
    if path.exists() and not path.is_dir():
        raise CheckpointError(f"output directory {path} is a file")
    try:
        path.mkdir(parents=True, exist_ok=True)
        tempfile.TemporaryFile(dir=path).close()
    except OSError as e:
        raise CheckpointError(f"output directory {path} is not writable ({e.strerror or e})") from e


def check_writable_file(path: Path) -> None:
    """Fail now, not after the work, if `path` cannot be written (its folder is created)."""
    if path.is_dir():
        raise CheckpointError(f"{path} is a directory, expected a file name")
    check_writable_dir(path.parent)
    if path.exists() and not os.access(path, os.W_OK):
        raise CheckpointError(f"{path} is not writable")


def prepare_output_dir(out: Path, *, resume: bool, overwrite: bool) -> None:
    """Make `out` ready for a run: refuse to mix a new run into an old one.

    A directory holding a run (any of RUN_FILES) needs --resume (continue it) or --overwrite
    (delete those files first); other files in it are left alone.
    """
    check_writable_dir(out)
    held = [name for name in RUN_FILES if (out / name).exists()]
    if held and not (resume or overwrite):
        raise CheckpointError(f"output directory {out} holds a run ({', '.join(held)}): pass --resume "
                              "to continue it, --overwrite to delete it, or another --output-dir")
    if overwrite:
        for name in held:
            target = out / name
            shutil.rmtree(target) if target.is_dir() else target.unlink()


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
    for stale in root.glob(".tmp-*"):  # leftovers of a save that was killed
        shutil.rmtree(stale, ignore_errors=True)
    for prev in root.glob(".prev-*"):  # killed mid-replace: the old copy may be the only one
        if (root / prev.name.removeprefix(".prev-")).is_dir():
            shutil.rmtree(prev, ignore_errors=True)
    tmp = Path(tempfile.mkdtemp(dir=root, prefix=f".tmp-{name}-"))
    # A PEFT model writes its adapter only; whether the embeddings changed it would otherwise find
    # out by reading the base model's config (from the Hub when it is not a local folder).
    adapter = {"save_embedding_layers": False} if is_lora(model) else {}
    model.save_pretrained(tmp, state_dict=weights, safe_serialization=True, **adapter)
    tokenizer.save_pretrained(tmp)
    torch.save(tensors, tmp / "trainer_state.pt")
    (tmp / "trainer_state.json").write_text(json.dumps(state, indent=1), encoding="utf-8")
    _fsync_tree(tmp)
    prev = root / f".prev-{name}"
    if final.exists():  # re-saving a step: keep the old copy loadable (as .prev-) until the new one is in
        shutil.rmtree(prev, ignore_errors=True)
        os.replace(final, prev)
    os.replace(tmp, final)
    _fsync(root)
    _atomic_write_text(root / "latest", name)
    shutil.rmtree(prev, ignore_errors=True)
    # Newer steps than this one are the abandoned future of a run resumed from an older
    # checkpoint; they must not outrank (and prune) the run's own checkpoints.
    steps = sorted((int(m.group(1)), p) for p in root.glob("step-*") if (m := _STEP_RE.fullmatch(p.name)))
    ours = [p for n, p in steps if n <= step]
    for old in ours[:-keep] + [p for n, p in steps if n > step]:
        shutil.rmtree(old, ignore_errors=True)
    return final


def _safetensors_complete(path: Path) -> bool:
    """Whether the header parses and the data it describes is all there (truncation check)."""
    with path.open("rb") as f:
        (n,) = struct.unpack("<Q", f.read(8))
        header = json.loads(f.read(n))
    end = max((v["data_offsets"][1] for k, v in header.items() if k != "__metadata__"), default=0)
    return path.stat().st_size == 8 + n + end


def checkpoint_problem(path: Path) -> str | None:
    """Why checkpoint `path` cannot be loaded (missing or damaged file), or None if it looks whole.

    Cheap: reads headers (safetensors offsets, the zip directory of trainer_state.pt), not data.
    """
    if not path.is_dir():
        return "missing"
    weights = sorted(path.glob("*.safetensors"))
    if not weights:
        return "no model weights (*.safetensors)"
    try:
        for w in weights:
            if not _safetensors_complete(w):
                return f"{w.name} is truncated"
        json.loads((path / "trainer_state.json").read_text(encoding="utf-8"))["step"]
        zipfile.ZipFile(path / "trainer_state.pt").close()
    except (OSError, ValueError, KeyError, TypeError, struct.error, zipfile.BadZipFile) as e:
        return f"unreadable ({type(e).__name__}: {e})"
    return None


def latest_checkpoint(output_dir: str | Path) -> Path | None:
    """The checkpoint `latest` names or, if that one is missing or damaged, the newest complete
    one (with a warning); None when there is none."""
    root = Path(output_dir) / "checkpoints"
    pointer = root / "latest"
    named = root / pointer.read_text(encoding="utf-8").strip() if pointer.is_file() else None
    if named is not None and checkpoint_problem(named) is None:
        return named
    found = [(int(m.group(1)), p) for p in root.glob("*step-*")
             if (m := _STEP_RE.fullmatch(p.name)) and p != named]
    for _, path in sorted(found, reverse=True):
        if checkpoint_problem(path) is None:
            if named is not None:
                warnings.warn(f"{named}: {checkpoint_problem(named)}; using {path} instead", stacklevel=2)
            return path
    return None


def load_trainer_state(path: str | Path) -> tuple[dict, dict]:
    """(tensors, state) of a checkpoint written by `save_checkpoint`."""
    path = Path(path)
    tensors = torch.load(path / "trainer_state.pt", map_location="cpu", weights_only=True)
    state = json.loads((path / "trainer_state.json").read_text(encoding="utf-8"))
    return tensors, state


# Options that may differ between a checkpoint and the run resuming it: where and how it runs,
# how long, and what it logs. Any other difference changes the run (--allow-config-change).
RESUMABLE_CHANGES = frozenset({
    "resume", "overwrite", "allow_config_change", "output_dir", "max_steps", "save_every",
    "keep_checkpoints", "eval_dataset", "eval_every", "eval_limit", "tensorboard", "max_bad_steps",
    "device", "precision", "micro_batch_tokens", "rollout_batch_size", "gradient_checkpointing",
    "fsdp", "strict_data",
})


def config_changes(saved: dict, now: dict) -> list[str]:
    """'key: old -> new' for every run-changing option where the config `now` differs from `saved`."""
    return [f"{k}: {saved[k]!r} -> {now[k]!r}" for k in sorted(now.keys() & saved.keys())
            if k not in RESUMABLE_CHANGES and saved[k] != now[k]]


def checkpoint_to_resume(output_dir: str | Path, config: dict, allow_config_change: bool) -> Path:
    """The checkpoint --resume continues from, its config checked against this run's `config`
    (a `to_dict()`); raises CheckpointError when there is none or the run would change."""
    path = latest_checkpoint(output_dir)
    if path is None:
        raise CheckpointError(f"--resume: no complete checkpoint in {Path(output_dir) / 'checkpoints'}")
    saved = json.loads((path / "trainer_state.json").read_text(encoding="utf-8")).get("config", {})
    changes = config_changes(saved, config)
    if changes and not allow_config_change:
        raise CheckpointError(f"--resume from {path}: options differ from the checkpoint's run "
                              f"({'; '.join(changes)}); pass --allow-config-change to accept them")
    return path


def gather_state(model, optimizer, scheduler) -> tuple[dict, dict]:
    """(weights, tensors) to save: the full model and optimizer state gathered from every rank
    (FSDP2 shards included; call it on every rank), the scheduler state and the torch RNG. Tied
    weights (gathered into separate copies) come back once, under the model's own name. Under
    LoRA the weights are the adapters' only: the frozen base is the run's --model."""
    full = StateDictOptions(full_state_dict=True, cpu_offload=True, ignore_frozen_params=is_lora(model))
    named = {n for n, _ in model.named_parameters()} | {n for n, _ in model.named_buffers()}
    weights = {k: v for k, v in get_model_state_dict(model, options=full).items() if k in named}
    tensors = {"optimizer": get_optimizer_state_dict(model, optimizer, options=full),
               "scheduler": scheduler.state_dict(), "torch_rng": torch.get_rng_state()}
    return weights, tensors


def load_weights(model, path: Path, device: torch.device) -> None:
    """Load a checkpoint's model.safetensors into `model` (before FSDP2 shards it), or its
    adapter_model.safetensors into a PEFT model's adapters."""
    from safetensors.torch import load_file

    lora = is_lora(model)
    name = ADAPTER_WEIGHTS if lora else "model.safetensors"
    if lora != (path / ADAPTER_WEIGHTS).is_file():
        raise CheckpointError(f"{path}: holds {'full weights' if lora else 'a LoRA adapter'}, but this "
                              f"run trains {'LoRA adapters' if lora else 'every weight'} (--lora-rank)")
    try:
        weights = load_file(str(path / name), device=str(device))
    except Exception as e:  # noqa: BLE001 - safetensors raises its own error types
        raise CheckpointError(f"{path}: cannot load {name} ({e})") from e
    if lora:
        from peft import set_peft_model_state_dict

        mismatch = f"{path}: the adapter does not match this run's --lora-targets / --lora-rank"
        try:
            result = set_peft_model_state_dict(model, weights)
        except RuntimeError as e:  # shapes differ: another rank
            raise CheckpointError(f"{mismatch} ({str(e).splitlines()[-1].strip()})") from e
        missing = [k for k in result.missing_keys if "lora_" in k]
        if missing or result.unexpected_keys:
            raise CheckpointError(f"{mismatch} (missing {missing[:3]}, unexpected {result.unexpected_keys[:3]})")
        return
    missing, unexpected = model.load_state_dict(weights, strict=False)
    if unexpected or any(not k.endswith("lm_head.weight") for k in missing):
        raise CheckpointError(f"{path}: checkpoint does not match the model "
                              f"(missing {missing[:3]}, unexpected {unexpected[:3]})")


def load_state(path: Path, model, optimizer, scheduler) -> dict:
    """Restore the optimizer (sharded again under FSDP2), scheduler and torch RNG of a checkpoint;
    return its JSON state (step, bad_steps, config)."""
    try:
        tensors, state = load_trainer_state(path)
        set_optimizer_state_dict(model, optimizer, tensors["optimizer"],
                                 options=StateDictOptions(full_state_dict=True))
        scheduler.load_state_dict(tensors["scheduler"])
        torch.set_rng_state(tensors["torch_rng"])
    except Exception as e:  # noqa: BLE001 - torch.load / state-dict errors come in many types
        raise CheckpointError(f"{path}: cannot load the trainer state ({type(e).__name__}: {e})") from e
    return state

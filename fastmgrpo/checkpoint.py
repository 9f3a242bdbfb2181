"""Atomic checkpoints: a run can be killed at any moment and still resume from the last one.

Layout under `<output_dir>/checkpoints/`:
    step-000004/        model.safetensors, config.json, tokenizer files (loads with from_pretrained);
                        under LoRA adapter_model.safetensors + adapter_config.json instead
                        (PEFT's format: PeftModel.from_pretrained(base, path) loads it)
                        trainer_state.pt  (optimizer keyed by parameter name, scheduler, torch RNG
                                           state; weights_only-safe)
                        trainer_state.json (step, bad-step count, run config)
                        manifest.json      (size and sha256 of every other file)
    latest              name of the newest complete checkpoint
A checkpoint is written to a hidden temporary directory, fsynced (files and directory) and
renamed into place, and `latest` is replaced atomically after that, so a crash, power loss or
full disk mid-save leaves the previous checkpoint untouched (a failed save removes its partial
copy). When `latest` names a missing or damaged checkpoint (a file missing, truncated or not
matching its checksum), `latest_checkpoint` falls back to the newest intact one.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import tempfile
import warnings
import zipfile
from pathlib import Path

import torch
from torch.distributed.checkpoint.state_dict import (StateDictOptions, get_model_state_dict,
                                                     get_optimizer_state_dict, set_optimizer_state_dict)

from . import files
from .files import WriteError, atomic_write, file_sha256, safetensors_problem, why_write_failed
from .lora import ADAPTER_WEIGHTS, is_lora
from .outdir import LOCK_NAME, lock_output_dir, unlock_output_dir

# What a run leaves in its output directory (and --overwrite deletes); nothing else is touched.
RUN_FILES = ("metrics.jsonl", "evals.jsonl", "reward.png", "config.json", "summary.json", "checkpoints",
             "tensorboard")
_STEP_RE = re.compile(r"(?:\.prev-)?step-(\d+)")  # .prev-*: a checkpoint being replaced
MANIFEST = "manifest.json"


class CheckpointError(RuntimeError):
    """A checkpoint or output directory that cannot be used; the message names the path."""


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


def _is_run_config(path: Path) -> bool:
    """Whether `path` (a config.json) is a run's resolved config, not a model's."""
    try:
        values = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False
    return isinstance(values, dict) and {"layers", "max_steps", "output_dir"} <= values.keys()


def _run_owned(name: str) -> bool:
    """Whether a directory entry is one a run writes (RUN_FILES, the lock, their temporary files)."""
    return any(name == own or name.startswith(f".{own}.") for own in (*RUN_FILES, LOCK_NAME))


def prepare_output_dir(out: Path, *, resume: bool, overwrite: bool) -> None:
    """Make `out` ready for a run and lock it for this process (`outdir.unlock_output_dir` or the
    process's exit frees it): refuse to mix a new run into an old one or into another's files.

    A directory holding a run (any of RUN_FILES) needs --resume (continue it) or --overwrite
    (delete those files first). Other files in it are left alone, but --overwrite refuses a
    folder holding any, and every run refuses a RUN_FILES name held by something else (a
    model's config.json).
    """
    if resume and not out.is_dir():
        raise CheckpointError(f"--resume: output directory {out} does not exist")
    check_writable_dir(out)
    lock_output_dir(out)
    try:
        if (out / "config.json").is_file() and not _is_run_config(out / "config.json"):
            raise CheckpointError(f"output directory {out} holds a config.json that is not a run's (a "
                                  "model's?): a run would replace it; pick another --output-dir")
        held = [name for name in RUN_FILES if (out / name).exists()]
        if held and not (resume or overwrite):
            way = ("--resume to continue it, --overwrite to delete it" if any((out / "checkpoints").glob("step-*"))
                   else "--overwrite to delete it (no checkpoint yet: --resume cannot continue it)")
            raise CheckpointError(f"output directory {out} holds a run ({', '.join(held)}): pass {way}, "
                                  "or another --output-dir")
        if overwrite:
            foreign = sorted(p.name for p in out.iterdir() if not _run_owned(p.name))
            if foreign:
                raise CheckpointError(f"--overwrite: {out} holds files that are not a run's "
                                      f"({', '.join(foreign[:5])}); it deletes only a run's files, so "
                                      "pick another --output-dir or move them")
            for name in held:
                target = out / name
                shutil.rmtree(target) if target.is_dir() else target.unlink()
    except BaseException:
        unlock_output_dir(out)
        raise


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
    Raises:
        WriteError (disk full, I/O error): the partial copy removed, earlier checkpoints kept.
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
    try:
        tmp.chmod(files.default_mode(directory=True))  # mkdtemp's 0700 would outlive the rename
        model.save_pretrained(tmp, state_dict=weights, safe_serialization=True, **adapter)
        tokenizer.save_pretrained(tmp)
        torch.save(tensors, tmp / "trainer_state.pt")
        (tmp / "trainer_state.json").write_text(json.dumps(state, indent=1), encoding="utf-8")
        (tmp / MANIFEST).write_text(json.dumps(_manifest(tmp), indent=1), encoding="utf-8")
        files.fsync_tree(tmp)
    except Exception as e:  # noqa: BLE001 - safetensors and torch.save wrap OSError in their own types
        why = why_write_failed(e, root)  # while the partial copy still fills the disk
        shutil.rmtree(tmp, ignore_errors=True)
        kept = latest_checkpoint(output_dir)
        kept = f"checkpoint {kept} is kept" if kept else "there is no earlier checkpoint"
        raise WriteError(f"cannot write checkpoint {final}: {why}; the partial copy was removed and "
                         f"{kept}") from e
    prev = root / f".prev-{name}"
    if final.exists():  # re-saving a step: keep the old copy loadable (as .prev-) until the new one is in
        shutil.rmtree(prev, ignore_errors=True)
        os.replace(final, prev)
    os.replace(tmp, final)
    files.fsync_path(root)
    atomic_write(root / "latest", name)
    shutil.rmtree(prev, ignore_errors=True)
    # Newer steps than this one are the abandoned future of a run resumed from an older
    # checkpoint; they must not outrank (and prune) the run's own checkpoints.
    steps = sorted((int(m.group(1)), p) for p in root.glob("step-*") if (m := _STEP_RE.fullmatch(p.name)))
    ours = [p for n, p in steps if n <= step]
    for old in ours[:-keep] + [p for n, p in steps if n > step]:
        shutil.rmtree(old, ignore_errors=True)
    return final


def _manifest(folder: Path) -> dict:
    """{relative path: {size, sha256}} of every file under `folder`."""
    return {p.relative_to(folder).as_posix(): {"size": p.stat().st_size, "sha256": file_sha256(p)}
            for p in sorted(folder.rglob("*")) if p.is_file() and p.name != MANIFEST}


def _manifest_problem(path: Path) -> str | None:
    """Which file of checkpoint `path` is missing or differs from its manifest entry (sizes
    first, then checksums); None when all match. Checkpoints from before manifests pass."""
    if not (path / MANIFEST).exists():
        return None
    listed = json.loads((path / MANIFEST).read_text(encoding="utf-8"))
    for rel, want in listed.items():
        f = path / rel
        if not f.is_file():
            return f"{rel} is missing"
        if f.stat().st_size != want["size"]:
            return f"{rel} has {f.stat().st_size} bytes, not the {want['size']} saved (damaged)"
    for rel, want in listed.items():
        if file_sha256(path / rel) != want["sha256"]:
            return f"{rel} does not match its checksum (damaged)"
    return None


def checkpoint_problem(path: Path) -> str | None:
    """Why checkpoint `path` cannot be loaded (missing, truncated or damaged file), or None.

    Reads every file once (the manifest's checksums) on top of the headers (safetensors offsets,
    the zip directory of trainer_state.pt).
    """
    if not path.is_dir():
        return "missing"
    weights = sorted(path.glob("*.safetensors"))
    if not weights:
        return "no model weights (*.safetensors)"
    try:
        for w in weights:
            if problem := safetensors_problem(w):
                return problem
        json.loads((path / "trainer_state.json").read_text(encoding="utf-8"))["step"]
        zipfile.ZipFile(path / "trainer_state.pt").close()
        return _manifest_problem(path)
    except (OSError, ValueError, KeyError, TypeError, AttributeError, zipfile.BadZipFile) as e:
        return f"unreadable ({type(e).__name__}: {e})"


def _named_latest(root: Path) -> Path | None:
    """The checkpoint `root/latest` names; None when it is missing or does not name a step."""
    try:
        name = (root / "latest").read_text(encoding="utf-8").strip()
    except (OSError, ValueError):
        return None
    return root / name if re.fullmatch(r"step-\d+", name) else None


def latest_checkpoint(output_dir: str | Path) -> Path | None:
    """The checkpoint `latest` names or, if that one is missing or damaged, the newest intact
    one (with a warning); None when there is none."""
    root = Path(output_dir) / "checkpoints"
    named = _named_latest(root)
    if named is not None and checkpoint_problem(named) is None:
        return named
    found = [(int(m.group(1)), p) for p in root.glob("*step-*")
             if (m := _STEP_RE.fullmatch(p.name)) and p != named]
    for _, path in sorted(found, reverse=True):
        if checkpoint_problem(path) is None:
            if (root / "latest").exists():
                damaged = f"{named}: {checkpoint_problem(named)}" if named else f"{root / 'latest'} is damaged"
                warnings.warn(f"{damaged}; using {path} instead", stacklevel=2)
            return path
    return None


def load_trainer_state(path: str | Path) -> tuple[dict, dict]:
    """(tensors, state) of a checkpoint written by `save_checkpoint`."""
    path = Path(path)
    tensors = torch.load(path / "trainer_state.pt", map_location="cpu", weights_only=True)
    state = json.loads((path / "trainer_state.json").read_text(encoding="utf-8"))
    return tensors, state


# Options that may differ between a checkpoint and the run resuming it: where and how it runs,
# how long (max_steps, unless it sets the learning-rate schedule: see `config_changes`), and what
# it logs. Any other difference changes the run (--allow-config-change).
RESUMABLE_CHANGES = frozenset({
    "resume", "overwrite", "allow_config_change", "output_dir", "max_steps", "save_every",
    "keep_checkpoints", "eval_dataset", "eval_every", "eval_limit", "tensorboard", "max_bad_steps",
    "device", "precision", "micro_batch_tokens", "rollout_batch_size", "gradient_checkpointing",
    "fsdp", "strict_data", "release_kv",
})


def config_changes(saved: dict, now: dict) -> list[str]:
    """'key: old -> new' for every run-changing option where the config `now` differs from `saved`.

    max_steps counts as one while the learning rate depends on it (warm-up and decay are
    fractions of it): a new length would recompute the schedule mid-run."""
    changes = [f"{k}: {saved[k]!r} -> {now[k]!r}" for k in sorted(now.keys() & saved.keys())
               if k not in RESUMABLE_CHANGES and saved[k] != now[k]]
    if saved.get("max_steps", now["max_steps"]) != now["max_steps"] and (
            now["lr_schedule"] != "constant" or now["warmup_ratio"] > 0):
        changes.append(f"max_steps: {saved['max_steps']} -> {now['max_steps']} (the {now['lr_schedule']} "
                       "learning-rate schedule spans max_steps: it would be recomputed for the new length)")
    return changes


def checkpoint_to_resume(output_dir: str | Path, config: dict, allow_config_change: bool) -> Path:
    """The checkpoint --resume continues from, its config checked against this run's `config`
    (a `to_dict()`); raises CheckpointError when there is none or the run would change."""
    path = latest_checkpoint(output_dir)
    if path is None:
        root = Path(output_dir) / "checkpoints"
        damaged = "".join(f"; {p.name}: {checkpoint_problem(p)}" for p in sorted(root.glob("step-*")))
        raise CheckpointError(f"--resume: no intact checkpoint in {root}{damaged}; start the run again "
                              "with --overwrite (or use another --output-dir)")
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

"""`python -m fastmgrpo.export --merge CKPT OUT`: a checkpoint as a plain Hugging Face model folder.

A LoRA checkpoint (adapter_model.safetensors + adapter_config.json) is merged into its base
model (the run's --model) in fp32, base + B·A·scale; a full checkpoint is written as it is. OUT
loads with `AutoModelForCausalLM.from_pretrained` and `fastmgrpo.eval --model OUT`, with no
peft installed. It is written to a temporary folder beside OUT and renamed into place.
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
from pathlib import Path

import torch

from .checkpoint import CheckpointError, check_writable_dir
from .files import default_mode, fsync_tree
from .models import ModelError, load_model


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m fastmgrpo.export",
        description="Write a fastmgrpo checkpoint as a plain Hugging Face model folder (safetensors, "
        "config, tokenizer). Exit status 2: unusable input (the message names the path).")
    parser.add_argument("--merge", nargs=2, metavar=("CKPT", "OUT"), required=True,
                        help="CKPT: a checkpoint folder written by fastmgrpo.train (checkpoints/step-N); a "
                        "LoRA adapter is merged into its base model in fp32. OUT: the new model folder "
                        "(must not exist, or be empty).")
    parser.add_argument("--dtype", choices=("fp32", "bf16"), default="fp32",
                        help="Weights' dtype in OUT (default: 'fp32').")
    return parser


def export(checkpoint: str | Path, out: str | Path, dtype: torch.dtype = torch.float32) -> Path:
    """Write `checkpoint` (merged, when it is a LoRA adapter) as a model folder `out`; return it.
    Raises CheckpointError when `out` holds files, ModelError / FileNotFoundError for a bad
    checkpoint."""
    out = Path(out)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise CheckpointError(f"{out} exists and is not an empty folder")
    model, tokenizer = load_model(str(checkpoint), dtype=torch.float32, device="cpu")
    check_writable_dir(out.parent)
    tmp = Path(tempfile.mkdtemp(dir=out.parent, prefix=f".{out.name}-"))
    tmp.chmod(default_mode(directory=True))  # mkdtemp makes it private; OUT is an ordinary folder
    try:
        model.to(dtype).save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
        fsync_tree(tmp)  # the rename publishes durable files, as a checkpoint's does
        if out.exists():
            out.rmdir()
        os.replace(tmp, out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out


def main(argv: list[str] | None = None) -> int:
    """CLI entry point; returns the exit status (2 for unusable input)."""
    args = build_parser().parse_args(argv)
    checkpoint, out = args.merge
    try:
        export(checkpoint, out, torch.bfloat16 if args.dtype == "bf16" else torch.float32)
    except (CheckpointError, ModelError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"merged model: {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

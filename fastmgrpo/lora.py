"""LoRA on PEFT: adapters train, the base stays frozen, and nothing else is copied.

`apply_lora` wraps the policy with `peft.get_peft_model`: only the adapters train (fp32, with
AdamW state); the base is frozen in the compute dtype (bf16 on GPU: 2 bytes a parameter, no
gradient, no optimizer state), its LM head included, so the fused loss computes no d_W.
The reference policy is the base itself with the adapters switched off (`reference_weights`):
beta > 0 costs one forward pass, not a second model. The sampler reads merged weights,
base + B·A·scale, written into its decode copy before each rollout (`merged_weights`,
decode_weights.py). Checkpoints hold the adapter in PEFT's format (adapter_model.safetensors +
adapter_config.json: `PeftModel.from_pretrained` loads it); `load_merged` turns one into a
plain model for eval and export.
"""

from __future__ import annotations

import contextlib
import json
import sys
from collections.abc import Iterator
from pathlib import Path

import torch

ADAPTER_WEIGHTS = "adapter_model.safetensors"
ADAPTER_CONFIG = "adapter_config.json"
ALL_LINEAR = "all-linear"  # PEFT's name for every Linear of the model but the output layer


def is_lora(model: torch.nn.Module) -> bool:
    """Whether `model` is a PEFT-wrapped model (without importing peft when nothing uses it)."""
    peft = sys.modules.get("peft")
    return peft is not None and isinstance(model, peft.PeftModel)


def apply_lora(model: torch.nn.Module, cfg, dtype: torch.dtype) -> torch.nn.Module:
    """`model` (a Hugging Face causal LM) with LoRA adapters of cfg.lora_rank / lora_alpha /
    lora_dropout on cfg.lora_targets, as a PEFT model. The base is cast to `dtype` and frozen;
    the adapters are fp32 and the only trainable parameters. Raises ConfigError when peft is
    missing or a target matches no module."""
    from .config import ConfigError

    try:
        from peft import LoraConfig, get_peft_model
    except ImportError:
        raise ConfigError('--lora-rank needs peft: pip install -e ".[lora]"') from None
    targets = cfg.lora_targets
    config = LoraConfig(r=cfg.lora_rank, lora_alpha=cfg.lora_alpha, lora_dropout=cfg.lora_dropout,
                        target_modules=ALL_LINEAR if targets == [ALL_LINEAR] else list(targets),
                        bias="none", task_type="CAUSAL_LM")
    model.requires_grad_(False).to(dtype)
    try:  # autocast_adapter_dtype: a 16-bit base's adapters are created in fp32
        return get_peft_model(model, config, autocast_adapter_dtype=True)
    except ValueError as e:
        raise ConfigError(f"--lora-targets {' '.join(targets)}: {str(e).splitlines()[0]}") from None


@contextlib.contextmanager
def reference_weights(model: torch.nn.Module) -> Iterator[torch.nn.Module]:
    """`model` as the reference policy: a PEFT model with its adapters off and in eval mode (the
    frozen base, exactly); any other model (a separate reference copy) as it is."""
    if not is_lora(model):
        yield model
        return
    training = model.training
    model.eval()
    try:
        with model.disable_adapter():
            yield model
    finally:
        model.train(training)


@torch.no_grad()
def merged_weights(model: torch.nn.Module) -> Iterator[tuple[str, torch.Tensor]]:
    """(name in the plain model, base + B·A·scale) for every adapted weight of a PEFT model,
    the sum in fp32 (one rounding when copied into a 16-bit decode weight)."""
    from peft.tuners.lora import LoraLayer

    for name, module in model.get_base_model().named_modules():
        if isinstance(module, LoraLayer):
            base = module.get_base_layer().weight
            delta = sum(module.get_delta_weight(a).float() for a in module.active_adapters)
            yield f"{name}.weight", base.float() + delta


def base_model_spec(path: Path) -> str:
    """The base model an adapter checkpoint was trained on: the run's --model (its
    trainer_state.json), else adapter_config.json's base_model_name_or_path."""
    from .models import ModelError

    state = path / "trainer_state.json"
    if state.is_file():
        spec = json.loads(state.read_text(encoding="utf-8")).get("config", {}).get("model")
    else:
        spec = json.loads((path / ADAPTER_CONFIG).read_text(encoding="utf-8")).get("base_model_name_or_path")
    if not spec:
        raise ModelError(f"{path}: a LoRA adapter that does not name its base model")
    return spec


def load_merged(path: Path, *, dtype: torch.dtype, device, attn_implementation: str | None = None):
    """(model, tokenizer) of an adapter checkpoint: its base loaded by `models.load_model`, the
    adapter merged into it in fp32, then cast to `dtype`. Raises ModelError without peft."""
    from .models import ModelError, load_model

    try:
        from peft import PeftModel
    except ImportError:
        raise ModelError(f'{path}: a LoRA adapter; loading it needs peft: pip install -e ".[lora]"') from None
    base, tokenizer = load_model(base_model_spec(path), dtype=torch.float32, device=device,
                                 attn_implementation=attn_implementation)
    try:
        merged = PeftModel.from_pretrained(base, path).merge_and_unload()
    except Exception as e:  # noqa: BLE001 - peft raises many types for mismatched adapters
        raise ModelError(f"{path}: cannot apply this adapter to its base ({type(e).__name__}: {e})") from e
    return merged.to(dtype).eval(), tokenizer

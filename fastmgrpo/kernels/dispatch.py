"""Validation, backend choice and the forward-only log-prob pass (``token_logprobs``).

Backends are modules with the row-pass contract of ``torch_backend`` (``row_stats_``,
``dlogits_``, ``extra_bytes_per_row``); the Triton one is imported lazily so a missing or broken
Triton never breaks the PyTorch path.
"""

import math
import os

import torch

from . import fused, torch_backend

_BACKENDS = ("auto", "triton", "torch")


def _triton_module():
    """The Triton backend module, or raise ImportError (with the cause) when unavailable."""
    from . import triton_backend

    return triton_backend


def resolve_backend(backend, hidden: torch.Tensor):
    """Backend module: `backend` arg, else $FASTMGRPO_BACKEND, else auto (Triton for CUDA tensors)."""
    name = backend if backend is not None else os.environ.get("FASTMGRPO_BACKEND", "auto")
    name = str(name).strip().lower()
    if name not in _BACKENDS:
        source = "backend" if backend is not None else "FASTMGRPO_BACKEND"
        raise ValueError(f"{source}={name!r} is not one of {list(_BACKENDS)}")
    if name == "torch":
        return torch_backend
    if name == "triton":
        try:
            mod = _triton_module()
        except ImportError as err:
            raise ImportError(f"backend='triton' requested but the Triton backend is unavailable: {err}") from err
        if not (hidden.is_cuda or mod.interpreting()):  # the interpreter runs CPU tensors (tests)
            raise ValueError("backend='triton' needs CUDA tensors (or TRITON_INTERPRET=1); hidden is on "
                             + str(hidden.device))
        return mod
    if hidden.is_cuda:  # auto
        try:
            return _triton_module()
        except ImportError:
            pass
    return torch_backend


def _validate(hidden, weight, targets, bias, temperature, names, check_values: bool = True):
    """Raise TypeError/ValueError naming the argument (as the caller knows it: `names` maps ours to theirs).
    check_values=False skips the value checks (targets in range, hidden finite) and their host sync."""
    hn, wn, tn, bn = (names.get(k, k) for k in ("hidden", "weight", "targets", "bias"))
    for name, t in ((hn, hidden), (wn, weight), (tn, targets)):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if hidden.dim() != 2:
        raise ValueError(f"{hn} must be 2-D (N, H), got shape {tuple(hidden.shape)}")
    if weight.dim() != 2 or weight.shape[1] != hidden.shape[1]:
        raise ValueError(f"{wn} must be (V, H={hidden.shape[1]}), got shape {tuple(weight.shape)}")
    if not hidden.is_floating_point():
        raise TypeError(f"{hn} must be a floating tensor, got {hidden.dtype}")
    if weight.dtype != hidden.dtype and not (weight.dtype == torch.float32 and hidden.dtype.itemsize == 2):
        raise TypeError(f"{wn} dtype {weight.dtype} must match {hn} dtype {hidden.dtype} (or be the "
                        "fp32 master of 16-bit hidden states)")
    if targets.dtype not in (torch.int64, torch.int32, torch.int16, torch.uint8, torch.int8):
        raise TypeError(f"{tn} must be an integer tensor, got {targets.dtype}")
    if targets.shape != hidden.shape[:1]:
        raise ValueError(f"{tn} must have shape ({hidden.shape[0]},), got {tuple(targets.shape)}")
    if bias is not None:
        if not isinstance(bias, torch.Tensor) or bias.shape != weight.shape[:1]:
            raise ValueError(f"{bn} must be a tensor of shape ({weight.shape[0]},)")
        if not bias.is_floating_point():
            raise TypeError(f"{bn} must be a floating tensor, got {bias.dtype}")
    devices = {t.device for t in (hidden, weight, targets) + ((bias,) if bias is not None else ())}
    if len(devices) != 1:
        raise ValueError(f"{hn}, {wn}, {tn} and {bn} must be on one device, got {sorted(map(str, devices))}")
    if isinstance(temperature, bool) or not isinstance(temperature, (int, float)):
        raise TypeError(f"temperature must be a float, got {type(temperature).__name__}")
    if not (math.isfinite(temperature) and temperature > 0):
        raise ValueError(f"temperature must be a finite float > 0, got {temperature}")
    if hidden.shape[0] == 0 or not check_values:
        return
    # One host sync (a .tolist()) for both data checks.
    bad_targets, bad_hidden = torch.stack(
        [((targets < 0) | (targets >= weight.shape[0])).any(), ~torch.isfinite(hidden).all()]
    ).tolist()
    if bad_targets:
        raise ValueError(f"{tn} must lie in [0, V={weight.shape[0]})")
    if bad_hidden:
        raise ValueError(f"{hn} contains NaN or Inf")


def check_memory_budget(value) -> int:
    """The fused loss's chunk budget in bytes (a positive int), or raise ValueError naming it."""
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        raise ValueError(f"memory_budget must be a positive int (bytes), got {value!r}")
    return value


def token_logprobs(hidden, weight, targets, temperature=1.0, bias=None, return_entropy=False, backend=None,
                   memory_budget=fused.DEFAULT_MEMORY_BUDGET, check_values=True):
    """Per-token log-probs (and entropy) of `targets` under softmax((hidden·Wᵀ + b) / T), no gradients.

    For old / reference / rollout log-probs; never holds the N×V logits (Triton: one matmul with
    the log-sum-exp fused in; torch: row chunks of at most `memory_budget` bytes of logits).
    Gradients come from the losses (``packed_grpo_loss``, ``fused_linear_grpo_loss``), which
    compute them in their forward pass; calling this with inputs that require grad while grad
    mode is on raises, so a missing gradient cannot go unnoticed.

    Args:
        hidden: (..., H) fp32/bf16/fp16, e.g. (N, H) or (B, T, H). weight: (V, H), same dtype or fp32.
        targets: (...) int token ids in [0, V). temperature: float > 0. bias: (V,) or None.
        return_entropy: also return each row's entropy. backend: "torch", "triton" or "auto"
            (default $FASTMGRPO_BACKEND, else Triton for CUDA tensors when importable).
        check_values: raise on out-of-range targets / non-finite hidden (one host sync); False
            for inputs valid by construction (a trainer's hot path: NaN still shows in the result).

    Returns:
        logp (...) fp32, or (logp, entropy) both (...) fp32 when return_entropy.
    """
    if not isinstance(hidden, torch.Tensor) or hidden.dim() < 1:
        raise ValueError("hidden must be a (..., H) tensor")
    lead = hidden.shape[:-1]
    if not isinstance(targets, torch.Tensor) or targets.shape != lead:
        raise ValueError(f"targets must have shape {tuple(lead)} (hidden's leading dims)")
    if torch.is_grad_enabled() and any(isinstance(t, torch.Tensor) and t.requires_grad for t in (hidden, weight, bias)):
        raise ValueError("token_logprobs computes no gradients: call it under torch.no_grad() (old / ref "
                         "log-probs), or train through packed_grpo_loss / fused_linear_grpo_loss")
    logp, entropy = forward_logprobs(hidden.reshape(-1, hidden.shape[-1]), weight, targets.reshape(-1), bias,
                                     temperature, bool(return_entropy), backend, {}, memory_budget, check_values)
    return (logp.reshape(lead), entropy.reshape(lead)) if return_entropy else logp.reshape(lead)


@torch.no_grad()
def forward_logprobs(hidden, weight, targets, bias, temperature, with_entropy, backend, names,
                     memory_budget=fused.DEFAULT_MEMORY_BUDGET, check_values=True):
    """Validated (N,) logp and entropy (or None) of 2-D inputs; errors use the caller's `names`."""
    _validate(hidden, weight, targets, bias, temperature, names, check_values)
    mod = resolve_backend(backend, hidden)
    targets, weight = targets.long(), fused.compute_head(weight, hidden.dtype)
    if mod is not torch_backend:
        return mod.linear_logprob_fwd(hidden.contiguous(), weight.contiguous(),
                                      None if bias is None else bias.contiguous(), targets.contiguous(),
                                      float(temperature), with_entropy)
    n = hidden.shape[0]
    plan = fused.Plan(targets, [0, n], with_entropy, float(temperature), None, mod, check_memory_budget(memory_budget))
    logp = torch.empty(n, device=hidden.device, dtype=torch.float32)
    entropy = torch.empty_like(logp) if with_entropy else None
    chunks, _ = fused.chunk_rows(plan, weight.shape[0], hidden.dtype)
    for r0, r1, z in fused.row_chunks(plan, hidden, weight, bias, chunks):
        mod.row_stats_(z, targets[r0:r1], with_entropy, (logp[r0:r1], None if entropy is None else entropy[r0:r1]),
                       inv_t=1.0 / plan.temperature)
    return logp, entropy

"""Validation and backend choice for the fused linear-logprob primitive.

Both backends implement ``apply(hidden, weight, bias, targets, temperature, with_entropy) ->
(logp, entropy_or_empty)``; the Triton one is imported lazily so a missing or broken Triton never
breaks the PyTorch path.
"""

import math
import os

import torch

from .linear_logprob_torch import LinearLogprobTorch

_BACKENDS = ("auto", "triton", "torch")


def _triton_function():
    """The Triton autograd Function, or raise ImportError (with the cause) when unavailable."""
    from .linear_logprob_triton import LinearLogprobTriton

    return LinearLogprobTriton


def _resolve_backend(backend, hidden: torch.Tensor):
    """Pick the autograd Function: `backend` arg, else $FASTMGRPO_BACKEND, else auto."""
    name = backend if backend is not None else os.environ.get("FASTMGRPO_BACKEND", "auto")
    name = str(name).strip().lower()
    if name not in _BACKENDS:
        source = "backend" if backend is not None else "FASTMGRPO_BACKEND"
        raise ValueError(f"{source}={name!r} is not one of {list(_BACKENDS)}")
    if name == "torch":
        return LinearLogprobTorch
    if name == "triton":
        if not hidden.is_cuda:
            raise ValueError("backend='triton' needs CUDA tensors; hidden is on " + str(hidden.device))
        try:
            return _triton_function()
        except ImportError as err:
            raise ImportError(f"backend='triton' requested but the Triton backend is unavailable: {err}") from err
    if hidden.is_cuda:  # auto
        try:
            return _triton_function()
        except ImportError:
            pass
    return LinearLogprobTorch


def _validate(hidden, weight, targets, bias, temperature, names):
    """Raise TypeError/ValueError naming the argument (as the caller knows it: `names` maps ours to theirs)."""
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
    if weight.dtype != hidden.dtype:
        raise TypeError(f"{wn} dtype {weight.dtype} must match {hn} dtype {hidden.dtype}")
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
    if hidden.shape[0] == 0:
        return
    # One host sync (a .tolist()) for both data checks.
    bad_targets, bad_hidden = torch.stack(
        [((targets < 0) | (targets >= weight.shape[0])).any(), ~torch.isfinite(hidden).all()]
    ).tolist()
    if bad_targets:
        raise ValueError(f"{tn} must lie in [0, V={weight.shape[0]})")
    if bad_hidden:
        raise ValueError(f"{hn} contains NaN or Inf")


def linear_logprobs(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    targets: torch.Tensor,
    bias: torch.Tensor | None = None,
    temperature: float = 1.0,
    with_entropy: bool = False,
    backend: str | None = None,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Per-token log-prob (and entropy) of `targets` under softmax((hidden @ weight.T + bias) / T).

    Differentiable w.r.t. hidden, weight and bias; never materialises the (N, V) logits.

    Args:
        hidden: (N, H) fp32/bf16/fp16 rows; row i predicts targets[i].
        weight: (V, H) LM head, same dtype as hidden.
        targets: (N,) integer token ids in [0, V).
        bias: optional (V,) floating LM-head bias.
        temperature: float > 0 dividing the logits.
        with_entropy: also return the entropy of each row's distribution.
        backend: "torch", "triton" or "auto"; default $FASTMGRPO_BACKEND or "auto"
            (Triton for CUDA tensors when importable, else the chunked PyTorch backend).

    Returns:
        logp: (N,) fp32.
        entropy: (N,) fp32, or None when with_entropy is False.

    Raises:
        TypeError / ValueError naming the offending argument. Checks data (targets range,
        NaN/Inf in hidden) with one host sync.
    """
    return _linear_logprobs(hidden, weight, targets, bias, temperature, with_entropy, backend, {})


def _linear_logprobs(hidden, weight, targets, bias, temperature, with_entropy, backend, names):
    """linear_logprobs whose errors call the tensors by the caller's names (e.g. "_input")."""
    _validate(hidden, weight, targets, bias, temperature, names)
    fn = _resolve_backend(backend, hidden)
    logp, entropy = fn.apply(hidden, weight, bias, targets.long(), float(temperature), bool(with_entropy))
    return logp, (entropy if with_entropy else None)

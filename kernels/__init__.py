"""Fused LM-head + log-prob primitive and GRPO-family losses (installed as ``fastmgrpo.kernels``).

The O(N x V) work is one differentiable primitive (``linear_logprobs``: Triton on CUDA, chunked
PyTorch elsewhere; ``FASTMGRPO_BACKEND=triton|torch|auto``); the losses are O(N) PyTorch on top.
"""

from .dispatch import linear_logprobs
from .grpo_loss import (
    FusedLinearGRPOLoss,
    GRPOLossConfig,
    fused_linear_grpo_loss,
    packed_grpo_loss,
    token_logprobs,
)
from .trl_patch import use_in_trl

__all__ = [
    "FusedLinearGRPOLoss",
    "GRPOLossConfig",
    "fused_linear_grpo_loss",
    "linear_logprobs",
    "packed_grpo_loss",
    "token_logprobs",
    "use_in_trl",
]

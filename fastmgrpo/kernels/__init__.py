"""Fused LM-head GRPO losses and log-probs (installed as ``fastmgrpo.kernels``).

Training losses (``packed_grpo_loss``, ``fused_linear_grpo_loss``, ``FusedLinearGRPOLoss``)
compute the loss and the gradients of hidden, weight and bias in one forward pass of three
matmuls per chunk of rows (``fused.py``), never holding the N x V logits; ``token_logprobs`` is
the forward-only pass for old / reference log-probs. Triton on CUDA, chunked PyTorch elsewhere
(``FASTMGRPO_BACKEND=triton|torch|auto``).
"""

from .dispatch import token_logprobs
from .grpo_loss import FusedLinearGRPOLoss, GRPOLossConfig, fused_linear_grpo_loss, packed_grpo_loss
from .trl_patch import use_in_trl

__all__ = [
    "FusedLinearGRPOLoss",
    "GRPOLossConfig",
    "fused_linear_grpo_loss",
    "packed_grpo_loss",
    "token_logprobs",
    "use_in_trl",
]

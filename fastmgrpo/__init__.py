"""fastmgrpo: MGRPO / GRPO training on fused GRPO loss kernels."""

__version__ = "0.1.0"

"""Plain data passed between the trainer's stages (no behaviour beyond small helpers)."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch


@dataclass(frozen=True)
class Problem:
    """One training/eval problem.

    `answer` is the gold final answer as text (GSM8K: the number after `####`, commas removed;
    MATH: the content of the last `\\boxed{}`); `source` is "gsm8k", "math" or "synthetic";
    `solution` is the worked solution ending in that answer, where the data has one (few-shot
    exemplars show it).
    """

    question: str
    answer: str
    source: str = "gsm8k"
    uid: int = 0
    solution: str = ""


@dataclass
class Completion:
    """One sampled continuation of one prompt.

    token_ids: generated ids, ending with EOS when `finished` by a stop id (a stop string is
        cut off instead).
    logprobs: per generated token, log-prob under the sampling policy at the sampling
        temperature (no top-p/top-k renormalisation), float32, same length as token_ids.
    """

    token_ids: list[int]
    logprobs: list[float]
    finished: bool
    text: str = ""


@dataclass
class Episode:
    """One sequence that enters the loss: a prompt, its completion, its reward and advantage.

    layer: 1 (answer to the question) or 2 (correction of a layer-1 answer).
    group: id of the advantage group it belongs to (episodes with the same group id are
        normalised together).
    weight: per-sequence loss weight (per-layer weights; 0 for discarded groups).
    """

    prompt_ids: list[int]
    completion_ids: list[int]
    sampler_logprobs: list[float]  # per completion token, from the sampler (not the loss's old log-probs)
    reward: float
    correct: bool
    layer: int
    group: int
    advantage: float = 0.0
    weight: float = 1.0
    text: str = ""

    @property
    def num_tokens(self) -> int:
        return len(self.prompt_ids) + len(self.completion_ids)


@dataclass
class PackedBatch:
    """Episodes concatenated into one row without padding (varlen layout).

    input_ids:    (T,) int64    all tokens of all sequences, back to back
    position_ids: (T,) int64    0..len-1 restarting at every sequence
    cu_seqlens:   (B+1,) int32  sequence boundaries in `input_ids`
    max_seqlen:   int           longest sequence
    target_rows:  (M,) int64    rows of the hidden states whose next token is a completion token
    targets:      (M,) int64    those next tokens
    cu_targets:   (B+1,) int32  sequence boundaries in `targets` (completion tokens only)
    sampler_logprobs: (M,) float32  the sampler's log-probs of `targets` (mismatch metric and
                                    truncated IS correction; the loss's old log-probs are the trainer's)
    advantages:   (B,) float32  one per sequence
    weights:      (B,) float32  one per sequence
    ref_logprobs: (M,) float32 or None, filled in when beta > 0
    cu_targets_host: `cu_targets` as a host tuple (the fused loss plans its chunks on the host:
                     no device->host read-back)
    """

    input_ids: torch.Tensor
    position_ids: torch.Tensor
    cu_seqlens: torch.Tensor
    max_seqlen: int
    target_rows: torch.Tensor
    targets: torch.Tensor
    cu_targets: torch.Tensor
    sampler_logprobs: torch.Tensor
    advantages: torch.Tensor
    weights: torch.Tensor
    ref_logprobs: torch.Tensor | None = None
    layers: torch.Tensor = field(default_factory=lambda: torch.empty(0, dtype=torch.int64))
    cu_targets_host: tuple[int, ...] = ()

    @property
    def num_sequences(self) -> int:
        return self.cu_seqlens.numel() - 1

    def to(self, device: torch.device | str) -> "PackedBatch":
        """The batch on `device`. To CUDA, host tensors go through pinned memory and copy without
        blocking the host (the caching host allocator keeps each pinned buffer until its copy is
        done), so packing the next micro-batch overlaps the copies."""
        device = torch.device(device)
        pin = device.type == "cuda"

        def move(v):
            if not isinstance(v, torch.Tensor) or v.device == device:
                return v
            if pin and v.device.type == "cpu":
                return (v if v.is_pinned() else v.pin_memory()).to(device, non_blocking=True)
            return v.to(device)

        return PackedBatch(**{k: move(v) for k, v in self.__dict__.items()})

"""The policy's loss, one packed micro-batch at a time, top to bottom.

A step's episodes are packed into token-budget micro-batches, each holding one layer and that
layer's global counts (`Policy.plan`). For each micro-batch: the packed sequences run through the
decoder, each attending only to itself (`packed_hidden_states`); the rows that predict completion
tokens (`hidden_rows`) go with the LM head into the fused GRPO loss, which computes the loss and
its gradients in one pass (`PolicyLoss`, the module DDP / FSDP2 wrap); backward adds them up
across micro-batches (`Policy.backward`). The frozen reference log-probs and the old log-probs
frozen on a step's first update are cached per micro-batch for its later updates.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch.distributed.tensor import DTensor

from .attention import VARLEN
from .config import MGRPOConfig
from .distributed import Dist, Probe, equalise, no_grad_sync, wrap
from .kernels import GRPOLossConfig, packed_grpo_loss, token_logprobs
from .lora import reference_weights
from .metrics import Stopwatch
from .models import decoder, lm_head
from .packing import microbatches, pack
from .types import Episode, PackedBatch

METRICS = ("loss", "kl", "clip_ratio", "entropy")  # per update: (K,) sums on the device


def packed_hidden_states(model: torch.nn.Module, batch: PackedBatch) -> torch.Tensor:
    """Final (normed) hidden states of every packed token, each sequence attending only to itself.

    batch: a PackedBatch on the model's device. Returns (T, H) in the model's compute dtype,
    row t being the state after token t (select `batch.target_rows` for the loss).
    Differentiable (runs under the caller's grad mode).

    Isolation comes from the position ids alone: they restart at 0 for every sequence and the
    mask is None, so transformers (5.x, masking_utils) detects the packed layout: sdpa/eager build
    a block-diagonal causal mask (windows in per-sequence positions); flash_attention_2 runs its
    varlen kernel on the cu_seqlens passed here (no device sync to derive them); `fastmgrpo_varlen`
    (attention.py) attends within each sequence, so attention costs sum(L_i^2), not T^2.
    """
    impl = model.config._attn_implementation
    kwargs, mask = {}, None  # mask None is what enables transformers' packed-sequence detection
    if impl.startswith("flash_attention") or impl == VARLEN:
        cu = batch.cu_seqlens.to(torch.int32)
        kwargs = dict(cu_seq_lens_q=cu, cu_seq_lens_k=cu, max_length_q=batch.max_seqlen,
                      max_length_k=batch.max_seqlen)
    if impl == VARLEN:
        # The attention function separates the sequences itself: no (T, T) block-diagonal mask
        # is built only to be ignored. Models with per-layer-type masks (Gemma 3, Qwen) take a
        # ready {type: mask} mapping, which also skips the masks' host syncs; others get an
        # all-ones mask, which turns the packed detection off.
        types = getattr(model.config, "layer_types", None)
        mask = dict.fromkeys(types) if types else torch.ones_like(batch.input_ids)[None]
    out = decoder(model)(
        input_ids=batch.input_ids[None],  # (1, T)
        position_ids=batch.position_ids[None],  # (1, T) restarting at 0 per sequence
        attention_mask=mask,
        use_cache=False,  # a cache would disable packed detection too
        **kwargs,
    )
    return out.last_hidden_state[0]  # (T, H)


def hidden_rows(model: torch.nn.Module, batch: PackedBatch, dtype: torch.dtype) -> torch.Tensor:
    """Final hidden states at the rows that predict completion tokens: (M, H) in `dtype`."""
    with torch.autocast(batch.input_ids.device.type, dtype=dtype, enabled=dtype != torch.float32):
        hidden = packed_hidden_states(model, batch)
    return hidden[batch.target_rows].to(dtype)


@torch.no_grad()
def _head_logprobs(model: torch.nn.Module, hidden: torch.Tensor, batch: PackedBatch,
                   loss_cfg: GRPOLossConfig, head16: torch.Tensor | None = None) -> torch.Tensor:
    """`model`'s LM head's log-probs of `batch.targets` from hidden rows (M, H): (M,) fp32, under
    the loss's temperature and memory budget; the trainer's inputs are valid by construction.
    head16: the head's weight already in hidden's dtype (else the call casts it)."""
    weight, bias = lm_head(model)
    weight = weight if head16 is None else head16
    return token_logprobs(hidden, weight, batch.targets, temperature=loss_cfg.temperature, bias=bias,
                          memory_budget=loss_cfg.memory_budget, check_values=False)


def reference_logprobs(ref_model: torch.nn.Module, batch: PackedBatch, loss_cfg: GRPOLossConfig,
                       dtype: torch.dtype) -> torch.Tensor:
    """The frozen reference model's log-probs of `batch.targets`: (M,) fp32, no gradients."""
    with torch.no_grad():
        return _head_logprobs(ref_model, hidden_rows(ref_model, batch, dtype), batch, loss_cfg)


class PolicyLoss(torch.nn.Module):
    """The policy's loss on one packed micro-batch, as the forward that DDP / FSDP2 wrap.

    sampler_is_cap: cap C of the truncated importance-sampling correction min(pi_old /
    pi_sampler, C) per token (None: off).
    """

    def __init__(self, model, loss_cfg: GRPOLossConfig, dtype: torch.dtype, sampler_is_cap=None):
        super().__init__()
        self.model, self.loss_cfg, self.dtype, self.sampler_is_cap = model, loss_cfg, dtype, sampler_is_cap
        self.head16: torch.Tensor | None = None  # the head in `dtype` for one update (Policy.backward)

    def forward(self, batch, ref_lp, old_lp, normaliser: dict):
        """old_lp None (the first update on a rollout): the current weights are the old policy,
        so the ratio is exactly 1, and their log-probs come back (detached, (M,) fp32) to be
        frozen for later updates; otherwise old_lp is used and None comes back."""
        # The fp32 master head goes in as it is: the fused pass computes in hidden's dtype from
        # `head16` (cast once per update, not per micro-batch) and adds d_W straight into the fp32
        # .grad (no 16-bit (V, H) copy kept for backward).
        weight, bias = lm_head(self.model)
        head16 = self.head16 if self.head16 is not None and self.head16.shape == weight.shape else None
        hidden = hidden_rows(self.model, batch, self.dtype)  # (M, H)
        logp = None
        if old_lp is None and self.sampler_is_cap is not None:  # the IS ratio is needed before the loss
            logp = _head_logprobs(self.model, hidden.detach(), batch, self.loss_cfg, head16)
        is_ratio = None
        if self.sampler_is_cap is not None:
            frozen = logp if old_lp is None else old_lp
            is_ratio = (frozen - batch.sampler_logprobs).exp().clamp(max=self.sampler_is_cap)  # (M,)
        loss, metrics = packed_grpo_loss(
            hidden, weight, batch.targets, batch.cu_targets, batch.advantages, old_lp, ref_lp,
            config=self.loss_cfg, bias=bias, seq_weights=batch.weights, vllm_is_ratio=is_ratio,
            return_entropy=True, return_logprobs=old_lp is None and logp is None,
            cu_seqlens_host=batch.cu_targets_host or None, check_values=False, weight_16bit=head16, **normaliser)
        logp = metrics.pop("logprobs", logp)  # the fused pass's own log-probs: no extra LM-head pass
        return loss, metrics, logp


@dataclass
class MicroBatch:
    """One packed micro-batch of one layer, with what a step's updates share.

    normaliser: that layer's global {num_sequences, num_tokens}; share: its fraction of all global
    completion tokens (the loss returns per-layer token means: weighted by `share`, they add up
    to means over all tokens). ref / old: reference and frozen old log-probs (M,), once computed.
    """

    batch: PackedBatch
    normaliser: dict
    share: float
    ref: torch.Tensor | None = None
    old: torch.Tensor | None = None


@dataclass
class StepStats:
    """What a step's micro-batches measure on the side, kept on the device until the step ends:
    time in the reference pass and |old - sampler| log-prob (sum, max) over `tokens` tokens."""

    ref_time: Stopwatch
    mismatch: torch.Tensor  # (2,) fp32: sum, max
    tokens: int = 0

    @classmethod
    def start(cls, device: torch.device) -> StepStats:
        return cls(Stopwatch(device), torch.zeros(2, device=device))


@dataclass
class Policy:
    """The trained model's loss over a step's micro-batches: the DDP/FSDP2-wrapped `PolicyLoss`
    (`module`), the frozen reference model (None when beta is 0; under LoRA the policy itself,
    run with its adapters off) and the zero-weight probe
    micro-batch that keeps ranks in step (distributed.Probe)."""

    ref_model: torch.nn.Module | None
    loss_cfg: GRPOLossConfig
    dtype: torch.dtype
    dist: Dist
    module: torch.nn.Module
    probe: Probe = field(repr=False)

    @classmethod
    def build(cls, model, ref_model, cfg: MGRPOConfig, dtype: torch.dtype, dist: Dist, pad_id: int) -> Policy:
        """Wrap `model`'s loss for `dist` (DDP, FSDP2 with cfg.fsdp, or as is) and run the probe once."""
        loss_cfg = cfg.loss_config()
        module = wrap(PolicyLoss(model, loss_cfg, dtype, cfg.sampler_is_cap), decoder(model).layers, dist, cfg.fsdp)
        probe = Probe(module, pad_id, dist.device, with_ref=ref_model is not None)
        return cls(ref_model, loss_cfg, dtype, dist, module, probe)

    def plan(self, episodes: list[Episode], token_budget: int) -> list[MicroBatch | None]:
        """Packed micro-batches on the device, each holding one layer with that layer's global
        counts (J = w1*J_L1 + w2*J_L2, so layer 2 never dilutes layer 1); None entries pad every
        rank to the most micro-batches any rank has. Packed once per rollout: updates reuse them."""
        local = [[e for e in episodes if e.layer == layer] for layer in (1, 2)]
        counts = self.dist.sum([x for eps in local  # [n_seq_1, n_tok_1, n_seq_2, n_tok_2]
                                for x in (len(eps), sum(len(e.completion_ids) for e in eps))])
        all_tokens = max(1.0, sum(counts[1::2]))
        plan = []
        for k, eps in enumerate(local):
            n_seq, n_tok = int(counts[2 * k]), int(counts[2 * k + 1])
            norm = {"num_sequences": max(1, n_seq), "num_tokens": max(1, n_tok)}
            plan += [MicroBatch(pack(mb).to(self.dist.device), norm, n_tok / all_tokens)
                     for mb in microbatches(eps, token_budget)]
        return equalise(plan, self.dist)

    def backward(self, plan: list[MicroBatch | None], stats: StepStats, decode_model=None) -> torch.Tensor:
        """Forward + backward of every micro-batch of `plan` (gradients add up, reduced across
        ranks once, after the last). Returns this rank's (K,) METRICS sums, on the device.

        decode_model: a compute-dtype copy of the policy equal to its current weights (the
        sampler's, on a step's first update), whose LM head the micro-batches share; else the
        head is cast once here for the whole update, never once per micro-batch."""
        loss_module = getattr(self.module, "module", self.module)  # DDP wraps it
        loss_module.head16 = self._update_head(loss_module.model, decode_model)
        update = torch.zeros(len(METRICS), device=self.dist.device)
        try:
            for i, mb in enumerate(plan):
                with no_grad_sync(self.module, skip=i < len(plan) - 1):
                    if mb is None:
                        self.probe.backward()
                    else:
                        update += self._backward(mb, stats)
        finally:
            loss_module.head16 = None  # the weights change with the update
        return update

    def _update_head(self, model, decode_model) -> torch.Tensor | None:
        """The LM head in the compute dtype for one update, or None where the loss uses the
        weight as it is (it already is in that dtype) or must cast it itself (FSDP2 shards it)."""
        weight, _ = lm_head(model)
        if weight.dtype == self.dtype or self.dtype == torch.float32:
            return None
        if decode_model is not None and decode_model is not model:
            return lm_head(decode_model)[0]
        return None if isinstance(weight, DTensor) else weight.detach().to(self.dtype)

    def _backward(self, mb: MicroBatch, stats: StepStats) -> torch.Tensor:
        if self.ref_model is not None and mb.ref is None:
            with stats.ref_time, reference_weights(self.ref_model) as ref_model:
                mb.ref = reference_logprobs(ref_model, mb.batch, self.loss_cfg, self.dtype)
        loss, metrics, logp = self.module(mb.batch, mb.ref, mb.old, mb.normaliser)
        if logp is not None:  # the first update: these log-probs are the old policy's from now on
            mb.old = logp
            diff = (logp - mb.batch.sampler_logprobs).abs()  # (M,)
            if diff.numel():
                stats.mismatch = torch.stack([stats.mismatch[0] + diff.sum(), torch.maximum(stats.mismatch[1], diff.max())])
                stats.tokens += diff.numel()
        # DDP/FSDP2 average gradients over ranks; each rank's loss is its share of the global sum.
        (loss * self.dist.world).backward()
        # Losses are divided by their layer's global counts: micro-batch values add up.
        zero = loss.new_zeros(())
        return torch.stack([loss.detach()] + [metrics.get(k, zero) * mb.share for k in METRICS[1:]])

"""Make TRL's ``GRPOTrainer`` compute its loss with ``FusedLinearGRPOLoss``: ``use_in_trl()``.

TRL is imported only when ``use_in_trl`` is called, so ``import fastmgrpo.kernels`` never pulls
it in. Two TRL generations are handled:

- TRL versions whose ``trl.trainer.grpo_trainer`` still builds ``LigerFusedLinearGRPOLoss``
  (``use_liger_loss`` / ``use_liger_kernel=True``): that module-level name is swapped, so TRL's
  own Liger path constructs ours (the constructor and forward are Liger's).
- TRL >= 1.x, which dropped the Liger GRPO loss for a chunked log-prob LM head: there is no
  name to swap, so ``GRPOTrainer._compute_loss`` is replaced by the fused path old TRL had
  (backbone hidden states -> fused LM head + loss), with TRL 1.x's normalisers. Options that
  path cannot honour raise ``NotImplementedError`` naming the option at the first loss call.
"""

import functools
import importlib

import torch

_LIGER_NAME = "LigerFusedLinearGRPOLoss"
# batch keys of vision-language models: their backbone call needs inputs this path does not pass
_VISION_KEYS = ("pixel_values", "image_grid_thw", "pixel_attention_mask", "image_sizes", "token_type_ids",
                "mm_token_type_ids", "image_position_ids", "spatial_shapes", "num_tiles")
# dapo/cispo/vespo divide by a token count (num_items_in_batch); the others by grad-accumulation steps
_TOKEN_NORMALISED = ("dapo", "cispo", "vespo")


class TRLPatch:
    """The applied patch; ``undo()`` (or leaving the ``with`` block) restores TRL."""

    def __init__(self, loss_class, loss_kwargs: dict):
        grpo = importlib.import_module("trl.trainer.grpo_trainer")
        self._saved = []
        if hasattr(grpo, _LIGER_NAME):
            self._set(grpo, _LIGER_NAME, functools.partial(loss_class, **loss_kwargs))
        else:
            cls = grpo.GRPOTrainer
            self._set(cls, "_compute_loss", _fused_compute_loss)
            self._set(cls, "_fastmgrpo_loss_factory", (loss_class, dict(loss_kwargs)))

    def _set(self, owner, name: str, value):
        self._saved.append((owner, name, owner.__dict__.get(name, _MISSING)))
        setattr(owner, name, value)

    def undo(self) -> None:
        """Restore what was patched (idempotent)."""
        while self._saved:
            owner, name, old = self._saved.pop()
            if old is _MISSING:
                delattr(owner, name)
            else:
                setattr(owner, name, old)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.undo()


_MISSING = object()


def use_in_trl(loss_class=None, **loss_kwargs) -> TRLPatch:
    """Make ``trl.GRPOTrainer`` use ``FusedLinearGRPOLoss`` (for the process, or inside ``with``).

    Args:
        loss_class: a class with Liger's GRPO-loss interface; default ``FusedLinearGRPOLoss``
            (``LigerFusedLinearGRPOLoss`` gives Liger's path under the same patch).
        **loss_kwargs: extra constructor arguments, e.g. ``backend="torch"``, ``compiled=False``.

    Returns:
        A ``TRLPatch``: call ``.undo()``, or use ``with use_in_trl(): ...``.
    """
    if loss_class is None:
        from .grpo_loss import FusedLinearGRPOLoss as loss_class
    return TRLPatch(loss_class, loss_kwargs)


def _unsupported(trainer, inputs, text_config) -> list:
    """TRL 1.x options the fused path cannot honour, by their TRL names."""
    args = trainer.args
    checks = [
        (trainer.top_entropy_quantile < 1.0, "top_entropy_quantile < 1"),
        (trainer.off_policy_mask_threshold is not None, "off_policy_mask_threshold"),
        (trainer._entropy_bonus_enabled, "entropy_coef / use_adaptive_entropy"),
        (trainer.aux_loss_enabled, "router_aux_loss_coef (MoE load-balancing loss)"),
        (getattr(text_config, "final_logit_softcapping", None) is not None, "final_logit_softcapping"),
        (any(getattr(text_config, k, None) is not None
             for k in ("logit_scale", "output_multiplier", "lm_head_multiplier", "logits_scaling")),
         "logit scaling in the model config"),
        (any(inputs.get(k) is not None for k in _VISION_KEYS), "vision-language inputs"),
        (getattr(args, "use_liger_kernel", False) and (args.liger_kernel_config or {}).get(
            "fused_linear_cross_entropy"), "liger fused_linear_cross_entropy"),
    ]
    return [name for bad, name in checks if bad]


def _loss_module(trainer, loss_class, loss_kwargs):
    """The loss module built from the trainer's options (cached on the trainer)."""
    loss = trainer.__dict__.get("_fastmgrpo_loss")
    if loss is None or type(loss) is not loss_class:
        args = trainer.args
        loss = loss_class(
            beta=trainer.beta, use_ref_model=trainer.beta != 0.0, epsilon_low=trainer.epsilon_low,
            epsilon_high=trainer.epsilon_high, loss_type=trainer.loss_type,
            max_completion_length=trainer.max_completion_length,
            importance_sampling_level=trainer.importance_sampling_level,
            sapo_temperature_pos=args.sapo_temperature_pos, sapo_temperature_neg=args.sapo_temperature_neg,
            temperature=trainer.temperature, delta=args.delta, use_bias_correction_kl=args.use_bias_correction_kl,
            vespo_k_pos=args.vespo_k_pos, vespo_lambda_pos=args.vespo_lambda_pos,
            vespo_k_neg=args.vespo_k_neg, vespo_lambda_neg=args.vespo_lambda_neg, **loss_kwargs,
        )
        trainer._fastmgrpo_loss = loss
    return loss


def _fused_compute_loss(self, model, inputs):
    """GRPOTrainer._compute_loss through the fused LM head + loss (TRL 1.x)."""
    from trl.models.utils import _ForwardRedirection

    unwrapped = self.accelerator.unwrap_model(model)
    # through the wrapper's forward, so DDP/FSDP/DeepSpeed hooks run as in a normal model call
    return _ForwardRedirection()(model, unwrapped, functools.partial(_fused_loss, self), unwrapped, inputs)


def _fused_loss(self, model, inputs):
    base = model.get_base_model() if hasattr(model, "get_base_model") else model  # PEFT
    text_config = base.config.get_text_config()
    problems = _unsupported(self, inputs, text_config)
    if problems:
        raise NotImplementedError(
            "fastmgrpo.kernels.use_in_trl: GRPOTrainer options not supported by the fused loss: "
            + ", ".join(problems) + " (undo the patch to use TRL's own loss)")
    loss_class, loss_kwargs = self._fastmgrpo_loss_factory
    loss_fn = _loss_module(self, loss_class, loss_kwargs)

    completion_ids = inputs["completion_ids"]
    mask = inputs["completion_mask"]
    if "tool_mask" in inputs:
        mask = mask * inputs["tool_mask"]
    input_ids = torch.cat([inputs["prompt_ids"], completion_ids], dim=1)
    attention_mask = torch.cat([inputs["prompt_mask"], inputs["completion_mask"]], dim=1)
    k = completion_ids.size(1)
    with self.accelerator.autocast():
        hidden = base.base_model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False)
    hidden = hidden.last_hidden_state[:, :-1][:, -k:]  # (B, k, H): position t predicts completion token t
    head = base.get_output_embeddings()
    weight, bias = head.weight, head.bias
    # autocast casts the head's matmul inputs; a fused kernel reads the weight, so cast it the same way
    dtype = weight.dtype if self.args.cast_lm_head_to_fp32 else hidden.dtype
    hidden, weight = hidden.to(dtype), weight.to(dtype)
    bias = None if bias is None else bias.to(dtype)

    mode = "train" if self.model.training else "eval"
    accum = self.current_gradient_accumulation_steps if mode == "train" else 1.0
    num_items = None
    if self.loss_type in _TOKEN_NORMALISED:
        # TRL's count spans the generation batch; rescale it to one accumulation window
        num_items = inputs["num_items_in_batch"].clamp(min=1.0)
        if mode == "train":
            num_items = num_items * accum / self.args.steps_per_generation
    is_ratio = None
    if self.loss_type == "vespo" or (self.use_vllm and self.vllm_importance_sampling_correction):
        is_ratio = inputs.get("importance_sampling_ratio")
    loss, metrics = loss_fn(
        hidden, weight, completion_ids, mask, inputs["advantages"], bias=bias,
        ref_per_token_logps=inputs.get("ref_per_token_logps"),
        old_per_token_logps=inputs.get("old_per_token_logps"),
        vllm_is_ratio=is_ratio, num_items_in_batch=num_items,
    )
    if self.beta != 0.0:
        self._metrics[mode]["kl"].append(self.accelerator.gather(metrics[0]).mean().item())
    self._metrics[mode]["clip_ratio/region_mean"].append(self.accelerator.gather(metrics[-1]).mean().item())
    return loss if self.loss_type in _TOKEN_NORMALISED else loss / accum


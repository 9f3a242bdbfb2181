"""Self-correction evaluation: first attempt, one correction round, SCoRe metrics.

`python -m fastmgrpo.eval` measures a model (the embedded default, a Hugging Face directory, a
.gguf file, or a checkpoint written by the trainer) on a problem set: acc@t1, acc@t2,
Δ(t1,t2), Δi→c, Δc→i and optionally pass@k, with the same prompts, decoding and answer
checking as training. `evaluate` is the library entry point the trainer calls on held-out data.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import random
import sys
import time

import torch
from tqdm.auto import tqdm

from .checkpoint import CheckpointError, check_writable_file
from .config import PASS_K_TEMPERATURE, ConfigError, EvalConfig, add_options, parse_options
from .data import DatasetError, load_problems
from .files import WriteError, atomic_write
from .metrics import correction_metrics, pass_at_k
from .models import ModelError, compute_dtype, load_model, padding_id, resolve_device, stop_token_ids
from .outdir import OutputDirError, check_outputs_apart
from .prompts import (GUIDING_PHRASES, RANDOM_PHRASE, eval_phrase, layer1_prompt, layer2_prompt, select_shots,
                      stop_strings)
from .rewards import final_answer, score
from .stopping import generate
from .types import Completion, Problem

DEFAULT_PHRASE = eval_phrase()
SHOTS_FROM = "gsm8k"  # few-shot exemplars come from the training split, never from eval data


def _generate(model, tokenizer, prompts, *, desc, progress, **sampling) -> list[Completion]:
    """One completion per prompt, with its decoded text, under a tqdm bar over prompts."""
    with tqdm(total=len(prompts), desc=desc, unit="seq", leave=False, disable=not progress) as bar:
        return generate(model, tokenizer, prompts, progress=bar.update, **sampling)


def _attempt(prefix: str, completion: Completion, problem: Problem, earlier: list[str]) -> dict:
    """Record fields of one attempt (`earlier`: the texts it continues, judged with it as one
    answer): text, final answer, verdict, finished, length."""
    _, correct = score(completion.text, problem, earlier=earlier)
    return {
        f"{prefix}_text": completion.text,
        f"{prefix}_answer": final_answer([*earlier, completion.text]),
        f"{prefix}_correct": correct,
        f"{prefix}_finished": completion.finished,
        f"{prefix}_tokens": len(completion.token_ids),
    }


def evaluate(
    model,
    tokenizer,
    problems: list[Problem],
    *,
    max_new_tokens: int,
    temperature: float = 0.0,
    top_p: float = 1.0,
    top_k: int = 0,
    batch_size: int = 64,
    l2_format: str = "continue",
    phrase: str = DEFAULT_PHRASE,
    pass_k: int = 0,
    pass_k_temperature: float = PASS_K_TEMPERATURE,
    seed: int = 0,
    progress: bool = True,
    samples: int = 1,
    stop: tuple[str, ...] = (),
    shots: list[Problem] = (),
) -> tuple[dict, list[dict]]:
    """Evaluate first attempts and one self-correction round on `problems`.

    Each problem gets a layer-1 prompt; its completion (t1) is extended into a layer-2 prompt
    exactly as in training (`phrase`, `l2_format`) and completed again (t2). Both are scored
    with `rewards.score`; t2 on the whole answer (t1 then the correction: a correction that
    states no final answer keeps t1's), in both formats.

    Args:
        temperature: 0 = greedy (default); top_p / top_k as in `sampler.sample`.
        pass_k: if > 0, also draw `pass_k` layer-1 samples per problem at `pass_k_temperature`
            and report pass@1 and pass@k (unbiased estimator over those samples).
        phrase: the guiding phrase, or RANDOM_PHRASE for one drawn per attempt (seeded).
        seed: seeds the sampling generator (on the model's device) and the phrase draws.
        progress: show tqdm bars over the sequences of each generation phase.
        samples: attempts (t1 and its t2) per problem; the rates are means over all of them.
        stop: stop strings (`prompts.stop_strings`), cut from the text before it is judged.
        shots: few-shot exemplars before every question (`prompts.select_shots`).

    Returns:
        summary: numbers only — `correction_metrics` keys (acc_t1, acc_t2, delta,
            delta_i_to_c, delta_c_to_i, n), t1/t2 mean completion tokens and truncated
            fractions, `pass@1` and `pass@{k}` when pass_k > 0, and wall `seconds`.
        records: one dict per attempt (problem-major, `sample` 0..samples-1): uid, source,
            question, gold, phrase, and per
            attempt `t{1,2}_text`, `_answer` (extracted), `_correct`, `_finished`, `_tokens`;
            `pass_k_correct` (correct samples out of pass_k) when pass_k > 0.
    """
    if not problems:
        raise ValueError("evaluate needs at least one problem")
    t0 = time.perf_counter()
    device = model.get_input_embeddings().weight.device
    stop_ids = stop_token_ids(tokenizer)
    sampling = dict(max_new_tokens=max_new_tokens, top_p=top_p, top_k=top_k, stop_ids=stop_ids,
                    pad_id=padding_id(tokenizer, stop_ids), batch_size=batch_size, stop_strings=stop,
                    generator=torch.Generator(device=device).manual_seed(seed))

    unique_prompts = [layer1_prompt(tokenizer, p, shots) for p in problems]
    attempts = [p for p in problems for _ in range(samples)]
    l1_prompts = [q for q in unique_prompts for _ in range(samples)]
    rng = random.Random(seed)
    phrases = [rng.choice(GUIDING_PHRASES) if phrase == RANDOM_PHRASE else phrase for _ in attempts]
    t1 = _generate(model, tokenizer, l1_prompts, desc="eval t1", progress=progress,
                   temperature=temperature, **sampling)
    l2_prompts = [
        layer2_prompt(tokenizer, p, q, c.token_ids, f, fmt=l2_format, stop_ids=stop_ids)
        for p, q, c, f in zip(attempts, l1_prompts, t1, phrases)
    ]
    t2 = _generate(model, tokenizer, l2_prompts, desc="eval t2", progress=progress,
                   temperature=temperature, **sampling)
    records = [
        {"uid": p.uid, "sample": k % samples, "source": p.source, "question": p.question, "gold": p.answer,
         "phrase": f, **_attempt("t1", a, p, []), **_attempt("t2", b, p, [a.text])}
        for k, (p, a, b, f) in enumerate(zip(attempts, t1, t2, phrases))
    ]

    n = len(records)
    summary = correction_metrics([r["t1_correct"] for r in records], [r["t2_correct"] for r in records])
    summary.update(problems=len(problems), samples=samples)
    for t in ("t1", "t2"):
        summary[f"{t}_mean_tokens"] = sum(r[f"{t}_tokens"] for r in records) / n
        summary[f"{t}_truncated"] = sum(not r[f"{t}_finished"] for r in records) / n
    if pass_k > 0:
        repeated = [q for q in unique_prompts for _ in range(pass_k)]
        drawn = _generate(model, tokenizer, repeated, desc=f"eval pass@{pass_k}", progress=progress,
                          temperature=pass_k_temperature, **sampling)
        counts = [sum(score(c.text, p)[1] for c in drawn[i * pass_k : (i + 1) * pass_k])
                  for i, p in enumerate(problems)]
        for k, r in enumerate(records):
            r["pass_k_correct"] = counts[k // samples]
        summary["pass@1"] = pass_at_k(pass_k, counts, 1)
        summary[f"pass@{pass_k}"] = pass_at_k(pass_k, counts, pass_k)
    summary["seconds"] = time.perf_counter() - t0
    return summary, records


# --- command line ---------------------------------------------------------------------------

_ROWS = [  # (summary key, label, signed)
    ("acc_t1", "acc@t1 (first attempt)", False),
    ("acc_t2", "acc@t2 (after correction)", False),
    ("delta", "Δ(t1,t2)", True),
    ("delta_i_to_c", "Δi→c (wrong → right)", False),
    ("delta_c_to_i", "Δc→i (right → wrong)", False),
    ("t1_truncated", "t1 truncated", False),
    ("t2_truncated", "t2 truncated", False),
    ("t1_mean_tokens", "t1 mean tokens", False),
    ("t2_mean_tokens", "t2 mean tokens", False),
]


def format_table(summary: dict) -> str:
    """The summary as aligned `label  value` lines (rates as fractions, 3 decimals)."""
    rows = [(label, f"{summary[key]:+.3f}" if signed else f"{summary[key]:.3f}")
            for key, label, signed in _ROWS]
    rows += [(k, f"{v:.3f}") for k, v in summary.items() if k.startswith("pass@")]
    rows += [("problems", str(summary["problems"])), ("attempts", str(summary["n"])),
             ("seconds", f"{summary['seconds']:.1f}")]
    width = max(len(label) for label, _ in rows)
    return "\n".join(f"{label:<{width}}  {value:>8}" for label, value in rows)


def build_parser() -> argparse.ArgumentParser:
    """The `python -m fastmgrpo.eval` argument parser: one flag per `EvalConfig` field."""
    return add_options(argparse.ArgumentParser(
        prog="python -m fastmgrpo.eval", allow_abbrev=False,
        description="Measure a model's first-attempt accuracy, its accuracy after one "
        "self-correction round, and the transition rates (SCoRe metrics), with MGRPO's prompts.",
        epilog="Exit status 2: unusable input (the message names it); 3: CUDA out of memory; 4: an "
        "output could not be written (disk full; an existing file is kept).",
    ), EvalConfig)


def parse_eval_config(argv: list[str] | None = None) -> EvalConfig:
    """argv -> EvalConfig; an unusable option exits with status 2 and a message naming it."""
    parser = build_parser()
    try:
        return EvalConfig(**parse_options(parser, argv))
    except ConfigError as e:
        parser.error(str(e))


def run(args: EvalConfig) -> None:
    """Load, evaluate, print the table and write the --output / --json files."""
    device = resolve_device(args.device)
    dtype = compute_dtype(args.precision, device)
    precision = "bf16" if dtype == torch.bfloat16 else "fp32"
    outputs = [(flag, path) for flag, path in (("--output", args.output), ("--json", args.json)) if path]
    check_outputs_apart(outputs, [("--model", args.model), ("--dataset", args.dataset)])
    for _, path in outputs:  # fail on an unusable output path before the work
        check_writable_file(path)
    problems = load_problems(args.dataset, limit=args.limit, seed=args.seed)
    shots = []
    if args.prompt_shots:
        pool = load_problems(SHOTS_FROM, seed=args.seed)
        shots = select_shots(pool, args.prompt_shots, args.seed, exclude={p.question for p in problems})
    model, tokenizer = load_model(args.model, dtype=dtype, device=device)
    stop = stop_strings(tokenizer, args.stop)
    settings = {k: v for k, v in dataclasses.asdict(args).items() if k not in ("output", "json", "progress")}
    settings.update(stop=list(stop), shot_uids=[s.uid for s in shots])
    summary, records = evaluate(
        model, tokenizer, problems, max_new_tokens=args.max_new_tokens, temperature=args.temperature,
        top_p=args.top_p, top_k=args.top_k, batch_size=args.batch_size, l2_format=args.l2_format,
        phrase=args.phrase, pass_k=args.pass_k, pass_k_temperature=args.pass_k_temperature,
        seed=args.seed, progress=args.progress, samples=args.samples, stop=stop, shots=shots,
    )
    result = {"settings": {**settings, "device": str(device), "precision": precision}, "metrics": summary}
    print(f"model {args.model}  dataset {args.dataset}  ({len(problems)} problems)")
    print(format_table(summary))
    if args.output:
        text = "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records)
        atomic_write(args.output, text)
        print(f"records: {args.output}")
    if args.json:
        atomic_write(args.json, json.dumps(result, indent=1, ensure_ascii=False) + "\n")
        print(f"summary: {args.json}")


def main(argv: list[str] | None = None) -> int:
    """CLI entry point; returns the exit status (2 unusable input, 3 CUDA OOM, 4 write failed)."""
    args = parse_eval_config(argv)
    try:
        run(args)
    except (DatasetError, ModelError, CheckpointError, OutputDirError, ConfigError, OSError) as e:
        print(f"error: {e}", file=sys.stderr)  # bad model/dataset/output path
        return 2
    except WriteError as e:
        print(f"error: {e}", file=sys.stderr)
        return 4
    except torch.cuda.OutOfMemoryError:
        print("error: CUDA out of memory; lower --batch-size or --max-new-tokens", file=sys.stderr)
        return 3
    except KeyboardInterrupt:
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Prefix reuse in the sampler: one MGRPO step's rollout (`mgrpo.collect`) with and without it.

With reuse, every prompt prefix that several sequences of the step share is prefilled once
(`sampler._Prefixes`): the exemplars of every prompt, a question's G layer-1 prompts, its
layer-2 prompts (question prompt + answer + phrase, H samples each). Runs alternate (on, off,
off, on, ...) in one process with the same seed, so the load falls on both alike and they sample the same
tokens (checked); prints per run the rollout time, the prefill time (prefill forwards and
prefix building) and the prompt tokens prefilled, with the load average.

    python bench/bench_prefix_reuse.py                       # default model, 8 x G=4 x H=2, 4 shots
    python bench/bench_prefix_reuse.py --shots 2 --rounds 1 --threads 1
"""

import argparse
import os
import random
import time

import torch

from fastmgrpo import sampler
from fastmgrpo.config import MGRPOConfig
from fastmgrpo.data import load_problems
from fastmgrpo.mgrpo import collect
from fastmgrpo.models import load_model, padding_id, stop_token_ids
from fastmgrpo.prompts import select_shots, stop_strings, training_prompts

_PREFILL = {"s": 0.0, "tokens": 0}


def _timed(fn):
    """`fn` with its wall time added to _PREFILL."""
    def run(*args, **kwargs):
        t0 = time.perf_counter()
        out = fn(*args, **kwargs)
        _PREFILL["s"] += time.perf_counter() - t0
        return out
    return run


def _counted(extend):
    """`_Decoder.extend` counting the prompt tokens it computes (each prompt less its cached context)."""
    def run(self, cache, rows, seqs, known, *args, **kwargs):
        _PREFILL["tokens"] += sum(map(len, seqs)) - sum(c for c, _ in known or ())
        return extend(self, cache, rows, seqs, known, *args, **kwargs)
    return run


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="default", help="model spec, as --model of fastmgrpo.train")
    ap.add_argument("--dataset", default="gsm8k", help="questions and exemplars (a fastmgrpo dataset)")
    ap.add_argument("--questions", type=int, default=8, help="questions in the step")
    ap.add_argument("--group-size", type=int, default=4, help="G layer-1 samples per question")
    ap.add_argument("--l2-samples", type=int, default=2, help="H layer-2 samples per layer-1 answer")
    ap.add_argument("--shots", type=int, default=4, help="worked exemplars before every question")
    ap.add_argument("--max-new-tokens", type=int, default=96, help="completion limit, both layers")
    ap.add_argument("--rounds", type=int, default=2, help="pairs of runs (on/off, then off/on, ...)")
    ap.add_argument("--threads", type=int, default=0, help="torch intra-op threads (0: torch's default)")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    model, tok = load_model(args.model, dtype=torch.float32, device="cpu")
    problems = load_problems(args.dataset, seed=0)
    shots = select_shots(problems, args.shots, seed=0)
    problems, prompts, _ = training_prompts(tok, problems, shots, max_length=4096, overflow="skip")
    problems, prompts = problems[: args.questions], prompts[: args.questions]
    cfg = MGRPOConfig(group_size=args.group_size, l2_samples=args.l2_samples,
                      max_completion_length=args.max_new_tokens, max_prompt_length=4096,
                      questions_per_step=args.questions, prompt_shots=args.shots)
    stop_ids = stop_token_ids(tok)
    kw = dict(stop_ids=stop_ids, pad_id=padding_id(tok, stop_ids), stop_strings=stop_strings(tok, None))
    sampler._Decoder.prefill = _timed(sampler._Decoder.prefill)
    sampler._Prefixes.build = _timed(sampler._Prefixes.build)
    sampler._Decoder.extend = _counted(sampler._Decoder.extend)
    print(f"threads {torch.get_num_threads()}, cpus {os.cpu_count()}, {args.questions} questions x G={args.group_size}"
          f" x H={args.l2_samples}, {args.shots} shots, layer-1 prompts {min(map(len, prompts))}-"
          f"{max(map(len, prompts))} tokens", flush=True)
    order = [on for r in range(args.rounds) for on in ((True, False) if r % 2 == 0 else (False, True))]
    seen = {}
    for reuse in order:
        _PREFILL.update(s=0.0, tokens=0)
        load = os.getloadavg()[0]
        t0 = time.perf_counter()
        with torch.no_grad():
            out = collect(model, tok, problems, prompts, cfg, rng=random.Random(0),
                          generator=torch.Generator().manual_seed(0), prefix_reuse=reuse, **kw)
        total = time.perf_counter() - t0
        tokens = [e.completion_ids for e in out.episodes]
        if seen.setdefault("tokens", tokens) != tokens:
            print("  note: sampled tokens differ from the first run's (fp rounding at a near tie)")
        print(f"reuse={'on ' if reuse else 'off'} rollout {total:6.1f} s  prefill {_PREFILL['s']:6.1f} s  "
              f"prefilled tokens {_PREFILL['tokens']:6d}  generated {int(out.stats['tokens_generated'])}  "
              f"load {load:.1f} -> {os.getloadavg()[0]:.1f}", flush=True)


if __name__ == "__main__":
    main()

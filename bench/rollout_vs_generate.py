"""The sampler against transformers' `generate` on the default model, same process, same prompts
(issue 23's CPU acceptance): 64 layer-1 prompts of the default job (`synthetic:ops=1,max=20`,
2 worked exemplars), one batch of 64.

    python bench/rollout_vs_generate.py [--prompts 64] [--fixed 64] [--limit 128]

1. fixed: greedy, exactly `--fixed` new tokens per prompt (no stop ids, generate with
   min_new_tokens): raw decode speed, tokens/s.
2. training-like: T = 1, the default stop strings, up to `--limit` new tokens. The sampler ends
   each completion at its stop string and refills nothing (one batch); generate runs until every
   row has stopped (its `stop_strings`), so rows that stop early still decode. Useful tokens are
   those before the stop string (the sampler's kept tokens; for generate, the same cut).
Prints one table row per (case, provider): seconds, tokens, tokens/s, and ours / generate.
"""

from __future__ import annotations

import argparse
import time

import torch

from fastmgrpo.data import exemplar_spec, load_problems
from fastmgrpo.env import cpu_threads
from fastmgrpo.models import load_model, padding_id, stop_token_ids
from fastmgrpo.prompts import layer1_prompt, select_shots, stop_strings
from fastmgrpo.sampler import release
from fastmgrpo.stopping import StopStrings, generate

DATASET = "synthetic:ops=1,max=20"


def _prompts(tokenizer, n: int, seed: int) -> list[list[int]]:
    problems = load_problems(DATASET, limit=n, seed=seed)
    pool = load_problems(exemplar_spec(DATASET), seed=seed)
    shots = select_shots(pool, 2, seed, exclude={p.question for p in problems})
    return [layer1_prompt(tokenizer, p, shots) for p in problems]


def _hf_generate(model, prompts, pad_id, **kw) -> list[list[int]]:
    """model.generate on the left-padded batch; each row's new token ids."""
    width = max(map(len, prompts))
    ids = torch.tensor([[pad_id] * (width - len(p)) + p for p in prompts])
    mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts])
    with torch.inference_mode():
        out = model.generate(input_ids=ids, attention_mask=mask, pad_token_id=pad_id, **kw)
    return [row[width:].tolist() for row in out]


def _timed(fn):
    t0 = time.perf_counter()
    out = fn()
    return out, time.perf_counter() - t0


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--prompts", type=int, default=64, help="prompts (one batch)")
    parser.add_argument("--fixed", type=int, default=64, help="new tokens of the fixed-length greedy case")
    parser.add_argument("--limit", type=int, default=128, help="token limit of the training-like case")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    torch.set_num_threads(cpu_threads())
    model, tokenizer = load_model("default", dtype=torch.float32, device="cpu")
    stop_ids = stop_token_ids(tokenizer)
    pad_id = padding_id(tokenizer, stop_ids)
    prompts = _prompts(tokenizer, args.prompts, args.seed)
    stops = stop_strings(tokenizer, None)
    cut = StopStrings(lambda ids: tokenizer.decode(ids, skip_special_tokens=True), stops)
    ours = dict(pad_id=pad_id, batch_size=len(prompts), generator=torch.Generator().manual_seed(args.seed))
    rows = []

    # 1. fixed length, greedy
    done, t = _timed(lambda: generate(model, tokenizer, prompts, max_new_tokens=args.fixed, temperature=0.0,
                                      stop_ids=set(), **ours))
    rows.append(("fixed greedy", "fastmgrpo", t, sum(len(c.token_ids) for c in done)))
    release(model)
    out, t = _timed(lambda: _hf_generate(model, prompts, pad_id, max_new_tokens=args.fixed,
                                         min_new_tokens=args.fixed, do_sample=False))
    rows.append(("fixed greedy", "generate", t, sum(map(len, out))))

    # 2. training-like: T = 1, stop strings, up to --limit tokens; useful = before the stop
    done, t = _timed(lambda: generate(model, tokenizer, prompts, max_new_tokens=args.limit, temperature=1.0,
                                      stop_ids=stop_ids, stop_strings=stops, **ours))
    rows.append(("T=1, stop strings", "fastmgrpo", t, sum(len(c.token_ids) for c in done)))
    release(model)
    torch.manual_seed(args.seed)
    out, t = _timed(lambda: _hf_generate(model, prompts, pad_id, max_new_tokens=args.limit, do_sample=True,
                                         temperature=1.0, top_k=0, top_p=1.0, stop_strings=list(stops),
                                         tokenizer=tokenizer))
    useful = 0
    for ids in out:  # up to the first stop id, then cut before the first stop string as ours does
        end = next((k + 1 for k, i in enumerate(ids) if i in stop_ids), len(ids))
        useful += cut.keep(ids[:end])
    rows.append(("T=1, stop strings", "generate", t, useful))

    print(f"{len(prompts)} prompts of {DATASET} (2 exemplars), default model, fp32, "
          f"{torch.get_num_threads()} threads")
    print("| case | provider | s | useful tokens | tokens/s | ours / generate |")
    print("|---|---|---:|---:|---:|---:|")
    for case in dict.fromkeys(r[0] for r in rows):
        (_, _, t_ours, n_ours), (_, _, t_hf, n_hf) = [r for r in rows if r[0] == case]
        ratio = (n_ours / t_ours) / (n_hf / t_hf)
        print(f"| {case} | fastmgrpo | {t_ours:.1f} | {n_ours} | {n_ours / t_ours:.1f} | {ratio:.2f} |")
        print(f"| {case} | generate | {t_hf:.1f} | {n_hf} | {n_hf / t_hf:.1f} | |")


if __name__ == "__main__":
    main()

"""First-attempt accuracy of the default model at several synthetic difficulty levels: the probe
that chose the default job's dataset (README, "The default job").

    python bench/difficulty_probe.py 30 2 32 synthetic:ops=1,max=10 synthetic:ops=1,max=20
    python bench/difficulty_probe.py 12 2 32 synthetic:ops=1,max=20 --temperature 1.0 --samples 4

Arguments: problems per level, exemplars, new tokens, then the training specs to probe, and
optionally a sampling temperature and samples per problem (default: greedy, one). Each
level is scored on the first problems of its held-out set (`<spec>,heldout`) with
exemplars drawn as `fastmgrpo.eval --seed 0` draws them; only first attempts (t1), so a level
costs half of `python -m fastmgrpo.eval --dataset <spec>,heldout --limit N` (which adds t2).
"""
import argparse
import sys
import time

import torch

from fastmgrpo.data import exemplar_spec, load_problems
from fastmgrpo.env import cpu_threads
from fastmgrpo.models import load_model, padding_id, stop_token_ids
from fastmgrpo.prompts import layer1_prompt, select_shots, stop_strings
from fastmgrpo.rewards import score
from fastmgrpo.stopping import generate


def main(argv: list[str]) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("n", type=int)
    parser.add_argument("shots", type=int)
    parser.add_argument("max_new", type=int)
    parser.add_argument("specs", nargs="+")
    parser.add_argument("--temperature", type=float, default=0.0)
    parser.add_argument("--samples", type=int, default=1)
    args = parser.parse_args(argv)
    n, shots_k, max_new, specs = args.n, args.shots, args.max_new, args.specs
    torch.set_num_threads(cpu_threads())
    model, tok = load_model("default", dtype=torch.float32, device=torch.device("cpu"))
    stop_ids = stop_token_ids(tok)
    for spec in specs:
        t0 = time.time()
        problems = load_problems(spec + ",heldout", limit=n)
        shots = select_shots(load_problems(exemplar_spec(spec)), shots_k, 0, exclude={p.question for p in problems})
        problems = [p for p in problems for _ in range(args.samples)]
        prompts = [layer1_prompt(tok, p, shots) for p in problems]
        done = generate(model, tok, prompts, max_new_tokens=max_new, temperature=args.temperature, top_p=1.0, top_k=0,
                        stop_ids=stop_ids, pad_id=padding_id(tok, stop_ids), batch_size=64,
                        stop_strings=stop_strings(tok, None), generator=torch.Generator().manual_seed(0))
        n_all = len(problems)
        acc = sum(score(c.text, p)[1] for c, p in zip(done, problems)) / n_all
        truncated = sum(not c.finished for c in done) / n_all
        print(f"{spec} shots={shots_k} T={args.temperature} samples={args.samples} acc_t1={acc:.3f} truncated={truncated:.2f} "
              f"prompt_tokens={sum(map(len, prompts)) / n_all:.0f} "
              f"new_tokens={sum(len(c.token_ids) for c in done) / n_all:.1f} "
              f"{time.time() - t0:.0f}s", flush=True)
        for c, p in list(zip(done, problems))[:3]:
            print(f"    {p.question!r} gold {p.answer}: {c.text!r}", flush=True)


if __name__ == "__main__":
    main(sys.argv[1:])

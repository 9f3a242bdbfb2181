"""The sampler's compiled decode forward on CPU, read from inductor's generated code and timed.

Builds a `sampler._Decoder` (slots x max_len K/V buffers), prefills every slot with a random
prompt, then torch.compiles its decode forward (`_Decoder._logits`, as the CUDA-graph path
does) for the first `--bucket` slots over all columns and reports, per decode step: kernels
called (inductor's fused C++ loops plus aten/extern calls) against the aten ops of the same
step run eagerly, allocations of a whole K/V buffer (or of the bucket's rows of one), loops over
that many elements (a whole-buffer copy), and the mean time of a compiled and an eager step.

    python bench/bench_decode_compile.py                          # tiny Gemma 3, 64 x 512
    python bench/bench_decode_compile.py --model default --steps 5 # Gemma 3 270M (slow compile)
"""

import argparse
import os
import re
import time

import numpy as np
import torch
from torch._inductor.utils import run_and_get_code
from torch.utils._python_dispatch import TorchDispatchMode

from fastmgrpo import sampler
from fastmgrpo.models import load_model
from fastmgrpo.testing import build_tiny_model


def code_counts(src: str, shapes: list[tuple[int, ...]]) -> dict[str, int]:
    """Kernel calls in the generated `call`, and buffer-sized allocations and loops for K/V
    buffer shapes `shapes`."""
    call = src[src.index("def call(") :]
    call = call[: call.index("\n\n")]
    kernels = len(re.findall(r"^\s+(?:\w+ = )?(?:cpp_fused\w+|extern_kernels\.\w+|torch\.ops\.\w+\.\w+)", call, re.M))
    text = {f"({', '.join(map(str, s))})" for s in shapes}
    allocs = sum("empty_strided" in line and any(t in line for t in text) for line in src.splitlines())
    numel = {int(np.prod(s)) for s in shapes}
    loops = sum(int(x) in numel for x in re.findall(r"x\d+<static_cast<int64_t>\((\d+)L\)", src))
    return {"kernels": kernels, "buffer_allocs": allocs, "buffer_loops": loops}


class _OpCount(TorchDispatchMode):
    """Counts the aten ops run under it (an eager step's kernels, views included)."""

    def __init__(self):
        super().__init__()
        self.ops = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.ops += 1
        return func(*args, **(kwargs or {}))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="tiny", help="'tiny' (fastmgrpo.testing's Gemma 3) or a model spec")
    ap.add_argument("--slots", type=int, default=64, help="K/V buffer rows (the sampler's batch_size)")
    ap.add_argument("--bucket", type=int, default=0, help="slots the step decodes (0: all)")
    ap.add_argument("--max-len", type=int, default=512, help="K/V buffer columns")
    ap.add_argument("--prompt", type=int, default=32, help="prompt tokens per slot")
    ap.add_argument("--steps", type=int, default=20, help="timed steps per variant")
    ap.add_argument("--threads", type=int, default=1, help="torch intra-op threads")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    bucket = args.bucket or args.slots
    if args.model == "tiny":
        model, _ = build_tiny_model(arch="gemma3", vocab_size=32768, seed=0)
    else:
        model, _ = load_model(args.model, dtype=torch.float32, device="cpu")
    vocab = model.config.get_text_config().vocab_size
    prompts = np.random.default_rng(0).integers(10, vocab, (args.slots, args.prompt)).tolist()
    dec = sampler._Decoder(model, capacity=args.slots, max_len=args.max_len, graphs=False, compile=False)
    with torch.inference_mode(), sampler._slot_attention_on(model):
        dec.begin(args.slots, None, 1)
        dec.prefill(np.arange(args.slots), prompts, 0, (0.0, 1.0, 0), None, (), 2)
        dec.bucket = bucket
        t0 = time.perf_counter()
        compiled = torch.compile(dec._logits, dynamic=False)
        _, code = run_and_get_code(compiled, model, bucket, args.max_len)
        compile_s = time.perf_counter() - t0
        k = next(iter(dec.cache.k.values()))
        counts = code_counts("\n".join(code), [tuple(k.shape), (bucket, *k.shape[1:])])
        with _OpCount() as eager_ops:
            dec._logits(model, bucket, args.max_len)
        times = {}
        for name, fn in (("eager", dec._logits), ("compiled", compiled)):
            fn(model, bucket, args.max_len)
            t0 = time.perf_counter()
            for _ in range(args.steps):
                fn(model, bucket, args.max_len)
            times[name] = (time.perf_counter() - t0) / args.steps
    layers = len(dec.cache.k)
    print(f"model {args.model}, {layers} layers, K/V buffer {tuple(k.shape)} x {2 * layers}, bucket {bucket}, "
          f"threads {torch.get_num_threads()}, load {os.getloadavg()[0]:.1f}")
    print(f"compile {compile_s:.1f} s; per step: {counts['kernels']} kernels (eager: {eager_ops.ops} aten ops), "
          f"{counts['buffer_allocs']} "
          f"buffer-sized allocations, {counts['buffer_loops']} buffer-sized loops; "
          f"eager {times['eager'] * 1e3:.1f} ms, compiled {times['compiled'] * 1e3:.1f} ms")


if __name__ == "__main__":
    main()

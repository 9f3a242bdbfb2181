"""The sampler's compiled decode step on CPU, read from inductor's generated code and timed.

Builds a graph-mode `sampler._Decoder` (slots x max_len K/V buffers, the counter-based RNG),
prefills every slot with a random prompt, then compiles its decode step (`_Decoder._graph_step`:
forward, draw and slot update, through `sampler._compile` as the CUDA-graph path does; q/k/v and
gate/up fused as in the trainer's decode copy unless --unfused) for the first `--bucket` slots
over all columns, and reports per decode step: kernels called (inductor's fused C++ loops plus
aten/extern calls) against the aten ops of the same step run eagerly; bytes moved, as inductor
counts them over its kernels (an upper bound: it counts each in-place K/V write as reading and
writing the whole buffer) and as the step cannot avoid (`compulsory_bytes`); the mean time of a
compiled and an eager step; and a GPU estimate, bytes / bandwidth + kernels x time per kernel (a
replayed graph runs its kernels back to back; a small one takes a few microseconds however
little it reads), also for narrower attended widths (`--widths`, the sampler's width buckets).

    python bench/bench_decode_compile.py                                       # tiny Gemma 3, 64 x 512
    python bench/bench_decode_compile.py --model default --dtype bf16 --steps 2 --widths 128,256
"""

import argparse
import logging
import os
import re
import time

import numpy as np
import torch
from torch._inductor import metrics
from torch._inductor.utils import run_and_get_code
from torch.utils._python_dispatch import TorchDispatchMode

from fastmgrpo import sampler
from fastmgrpo.fused_linears import fuse_linears
from fastmgrpo.models import load_model
from fastmgrpo.testing import build_tiny_model


def kernel_calls(src: str) -> int:
    """Kernel calls in the generated `call`: fused C++ loops and aten/extern calls."""
    call = src[src.index("def call(") :]
    call = call[: call.index("\n\n")]
    return len(re.findall(r"^\s+(?:\w+ = )?(?:cpp_fused\w+|extern_kernels\.\w+|torch\.ops\.\w+\.\w+)", call, re.M))


def compulsory_bytes(model: torch.nn.Module, dec: sampler._Decoder, bucket: int, width: int) -> dict[str, int]:
    """Bytes a decode step of `bucket` slots over `width` columns cannot avoid moving: every
    weight read once (tied ones once), the attended K/V columns of every layer read, the logits
    written by the LM head and read by the draw (twice: log-sum-exp, then the argmax)."""
    weights = sum(p.numel() * p.element_size() for p in {id(p): p for p in model.parameters()}.values())
    kv = sum(buf[:bucket, :, :width].numel() * buf.element_size()
             for layers in (dec.cache.k, dec.cache.v) for buf in layers.values())
    vocab = model.get_output_embeddings().weight.shape[0]
    logits = 3 * bucket * vocab * next(model.parameters()).element_size()
    return {"weights": weights, "kv": kv, "logits": logits}


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
    ap.add_argument("--dtype", default="fp32", choices=["fp32", "bf16"], help="weights and K/V dtype")
    ap.add_argument("--slots", type=int, default=64, help="K/V buffer rows (the sampler's batch_size)")
    ap.add_argument("--bucket", type=int, default=0, help="slots the step decodes (0: all)")
    ap.add_argument("--max-len", type=int, default=512, help="K/V buffer columns")
    ap.add_argument("--widths", default="",
                    help="comma-separated attended widths to estimate besides --max-len (e.g. 128,256)")
    ap.add_argument("--prompt", type=int, default=32, help="prompt tokens per slot")
    ap.add_argument("--unfused", action="store_true",
                    help="keep q/k/v and gate/up as separate GEMMs (the trainer's decode copy fuses them)")
    ap.add_argument("--temperature", type=float, default=1.0, help="sampling temperature (0: greedy)")
    ap.add_argument("--steps", type=int, default=20, help="timed steps per variant")
    ap.add_argument("--threads", type=int, default=1, help="torch intra-op threads")
    ap.add_argument("--bandwidth", type=float, default=4.0,
                    help="GPU estimate: memory bandwidth reached, TB/s (H200: 4.8 peak)")
    ap.add_argument("--kernel-us", type=float, default=3.0, help="GPU estimate: microseconds per kernel in a graph")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}[args.dtype]
    bucket = args.bucket or args.slots
    if args.model == "tiny":
        model, _ = build_tiny_model(arch="gemma3", vocab_size=32768, seed=0)
        model.to(dtype)
    else:
        model, _ = load_model(args.model, dtype=dtype, device="cpu")
    if not args.unfused:
        fuse_linears(model.requires_grad_(False))
    vocab = model.config.get_text_config().vocab_size
    prompts = np.random.default_rng(0).integers(10, vocab, (args.slots, args.prompt)).tolist()
    dec = sampler._Decoder(model, capacity=args.slots, max_len=args.max_len, graphs=True, compile=True)
    pick = (args.temperature, 1.0, 0)
    with torch.inference_mode(), sampler._slot_attention_on(model):
        gen = dec.begin(args.slots, torch.Generator().manual_seed(0), 1)
        dec.prefill(np.arange(args.slots), prompts, 0, pick, gen, (), args.max_len - args.prompt)
        dec.bucket, stop = bucket, dec._stop((1,))
        step_args = (model, bucket, args.max_len, pick, stop)
        torch._logging.set_logs(inductor_metrics=True)  # inductor counts bytes only with it on
        logging.getLogger("torch._inductor.compile_fx.__inductor_metrics").addFilter(lambda record: False)
        metrics.reset()
        t0 = time.perf_counter()
        compiled = sampler._compile(dec._graph_step)
        _, code = run_and_get_code(compiled, *step_args)
        compile_s = time.perf_counter() - t0
        step_bytes = metrics.num_bytes_accessed
        k = next(iter(dec.cache.k.values()))
        kernels = kernel_calls("\n".join(code))
        with _OpCount() as eager_ops:
            dec._graph_step(*step_args)
        times = {}
        for name, fn in (("eager", dec._graph_step), ("compiled", compiled)):
            fn(*step_args)
            t0 = time.perf_counter()
            for _ in range(args.steps):
                fn(*step_args)
            times[name] = (time.perf_counter() - t0) / args.steps
    layers = len(dec.cache.k)
    need = compulsory_bytes(model, dec, bucket, args.max_len)
    launch_s = kernels * args.kernel_us * 1e-6
    gpu_s = [launch_s + n / (args.bandwidth * 1e12) for n in (sum(need.values()), int(step_bytes))]
    print(f"model {args.model} ({args.dtype}, {'unfused' if args.unfused else 'fused'} projections), {layers} layers, K/V buffer {tuple(k.shape)} x {2 * layers}, "
          f"bucket {bucket}, T {args.temperature}, threads {torch.get_num_threads()}, load {os.getloadavg()[0]:.1f}")
    print(f"compile {compile_s:.1f} s; per step: {kernels} kernels (eager: {eager_ops.ops} aten ops), "
          f"{int(step_bytes) / 1e6:.1f} MB read+written by inductor's count (compulsory "
          f"{sum(need.values()) / 1e6:.1f}: weights {need['weights'] / 1e6:.1f}, K/V {need['kv'] / 1e6:.1f}, "
          f"logits {need['logits'] / 1e6:.1f}); eager {times['eager'] * 1e3:.1f} ms, "
          f"compiled {times['compiled'] * 1e3:.1f} ms")
    print(f"GPU estimate ({args.bandwidth} TB/s, {args.kernel_us} us/kernel; compulsory bytes .. inductor's): "
          f"{gpu_s[0] * 1e3:.3f} .. {gpu_s[1] * 1e3:.3f} ms a step, "
          f"{bucket / gpu_s[0]:,.0f} .. {bucket / gpu_s[1]:,.0f} tok/s")
    for width in (int(w) for w in args.widths.split(",") if w):
        need = sum(compulsory_bytes(model, dec, bucket, width).values())
        est = launch_s + need / (args.bandwidth * 1e12)
        print(f"  attending {width} columns: compulsory {need / 1e6:.1f} MB, {est * 1e3:.3f} ms a step, "
              f"{bucket / est:,.0f} tok/s")


if __name__ == "__main__":
    main()

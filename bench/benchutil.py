"""Device, shapes, timing and memory helpers shared by the bench_*.py suites.

Shapes (B, L, H, V):
    CUDA: bf16 (8,1024,1536,151936) Qwen2.5-1.5B head, (8,1024,3584,152064) and
          (16,2048,3584,152064) Qwen2.5-7B head, (64,256,640,262144) Gemma-3 270M head.
    CPU:  fp32 (2,256,256,8192) and (4,1024,256,65536) (N=4096: a vocabulary where the full
          logits, 1 GiB, start to matter).
FASTMGRPO_BENCH_SHAPES="B,L,H,V;B,L,H,V" overrides the list; FASTMGRPO_BENCH_PROVIDERS="a b"
keeps only those providers of a suite (gpu_check.sh runs one provider per process).
"""
import os
import time
import warnings

import pytest
import torch

CUDA = torch.cuda.is_available()
DEVICE = torch.device("cuda" if CUDA else "cpu")
DTYPE = torch.bfloat16 if CUDA else torch.float32

_CUDA_SHAPES = [(8, 1024, 1536, 151936), (8, 1024, 3584, 152064), (16, 2048, 3584, 152064),
                (64, 256, 640, 262144)]
_CPU_SHAPES = [(2, 256, 256, 8192), (4, 1024, 256, 65536)]


def _shapes():
    env = os.environ.get("FASTMGRPO_BENCH_SHAPES")
    if env:
        return [tuple(int(x) for x in s.split(",")) for s in env.split(";") if s.strip()]
    return _CUDA_SHAPES if CUDA else _CPU_SHAPES


SHAPES = _shapes()


def providers(all_providers: list) -> list:
    """`all_providers`, or the subset named in $FASTMGRPO_BENCH_PROVIDERS (unknown names fail)."""
    env = os.environ.get("FASTMGRPO_BENCH_PROVIDERS", "").split()
    unknown = set(env) - set(all_providers)
    if unknown:
        raise ValueError(f"FASTMGRPO_BENCH_PROVIDERS: unknown {sorted(unknown)}; known {all_providers}")
    return [p for p in all_providers if p in env] if env else list(all_providers)


# torch 2.13's chunked linear_cross_entropy on CPU (V=65536, H=256, fwd+bwd, 2 threads, idle
# machine): 17 s per call at N=512 and 23 s at N=4096, 15-45x the three-matmul floor, and minutes
# per call under load; `pytest bench/` makes three calls per shape. FASTMGRPO_BENCH_CPU_LCE=1
# runs it at every shape anyway (bench/RESULTS.md's CPU row).
_CPU_LCE_MAX_LOGITS = 2 ** 23


def torch_linear_cross_entropy(tokens: int, vocab: int):
    """PyTorch's chunked `F.linear_cross_entropy(reduction="none")` as (hidden (N,H), weight, targets)
    -> per-token NLL (N,); pytest.skip where torch lacks it, falls back to its full-logits path, or
    (CPU) where tokens * vocab is above 2**23 (see above)."""
    if (not CUDA and tokens * vocab > _CPU_LCE_MAX_LOGITS
            and os.environ.get("FASTMGRPO_BENCH_CPU_LCE") != "1"):
        pytest.skip(f"torch's chunked linear_cross_entropy on CPU takes minutes at N*V = {tokens}*{vocab} "
                    f"(skipped above {_CPU_LCE_MAX_LOGITS}; FASTMGRPO_BENCH_CPU_LCE=1 runs it)")
    fn = getattr(torch.nn.functional, "linear_cross_entropy", None)
    if fn is None:
        pytest.skip(f"torch {torch.__version__} has no torch.nn.functional.linear_cross_entropy")
    options_cls = getattr(torch.nn, "LinearCrossEntropyOptions", None)
    if options_cls is None:
        pytest.skip(f"torch {torch.__version__} has no torch.nn.LinearCrossEntropyOptions (no chunked path)")
    options = options_cls()

    def nll(hidden, weight, targets):
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            out = fn(hidden, weight, targets, reduction="none", options=options)
        # the reference path holds the full logits: measuring it would misreport the chunked one
        fallback = [str(w.message) for w in caught if "reference" in str(w.message).lower()]
        if fallback:
            pytest.skip(f"linear_cross_entropy fell back to its reference path: {fallback[0][:160]}")
        return out
    return nll


def sync():
    if CUDA:
        torch.cuda.synchronize()


def device_name() -> str:
    if CUDA:
        return torch.cuda.get_device_name()
    return f"CPU ({os.cpu_count()} cores)"


def vm_kib(field: str) -> int | None:
    """A /proc/self/status field in KiB (VmRSS, VmHWM, ...), or None where unavailable."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1])
    except OSError:
        pass
    return None


def peak_memory_bytes(fn) -> int | None:
    """Extra peak memory of one call of fn beyond what was allocated before it.

    CUDA: torch.cuda.max_memory_allocated() − memory_allocated() before the call.
    CPU: VmHWM − VmRSS after resetting the high-water mark (/proc/self/clear_refs "5");
    None where that is unavailable. Includes the gradients the call produces.
    """
    if CUDA:
        sync()
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        fn()
        sync()
        return torch.cuda.max_memory_allocated() - base
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError:
        return None
    base = vm_kib("VmRSS")
    fn()
    peak = vm_kib("VmHWM")
    if base is None or peak is None:
        return None
    return max(0, peak - base) * 1024


def median_time(fn, reps: int = 5, warmup: int = 1) -> float:
    """Median wall time (s) of fn, synchronized; used for the three-matmul floor."""
    for _ in range(warmup):
        fn()
    sync()
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        sync()
        times.append(time.perf_counter() - t0)
    times.sort()
    return times[len(times) // 2]


def matmul_floor_target(hidden: torch.Tensor, weight: torch.Tensor, frozen_head: bool = False):
    """The three GEMMs any exact fused LM-head loss needs: h·Wᵀ, dlogits·W, dlogitsᵀ·h; the
    first two only with `frozen_head` (a head that needs no gradient: LoRA).

    hidden (N, H) or (B, L, H), weight (V, H). Returns a synchronising callable."""
    h = hidden.detach().reshape(-1, hidden.shape[-1])       # (N, H)
    w = weight.detach()                                     # (V, H)

    def step():
        logits = h @ w.T                                    # (N, V), stands in for dlogits
        logits @ w                                          # d_hidden (N, H)
        if not frozen_head:
            logits.T @ h                                    # d_W (V, H)
        sync()
    return step


_FLOOR_S: dict = {}  # (B, L, H, V) -> seconds of the three-matmul floor


def cases(providers: list[str]):
    """Parametrize a benchmark over `providers` x SHAPES (ids B-L-H-V), in that order."""
    def wrap(fn):
        fn = pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "B{}-L{}-H{}-V{}".format(*s))(fn)
        return pytest.mark.parametrize("provider", providers)(fn)
    return wrap


def run_case(benchmark, group: str, make_target, x, shape, provider, **info) -> float:
    """One benchmark case: `group` (the dtype appended), device / dtype / provider and `info` in
    extra_info, timed by `measure_against_floor`. Returns the mean time in seconds."""
    benchmark.group = f"{group} {str(DTYPE)[6:]}"
    benchmark.extra_info.update(device=device_name(), dtype=str(DTYPE), provider=provider, **info)
    return measure_against_floor(benchmark, make_target, x, shape, provider)


def measure_against_floor(benchmark, make_target, x, shape, provider) -> float:
    """Time `make_target()` with pytest-benchmark beside the three-matmul floor of the same shape
    (measured once per shape and process); record in `benchmark.extra_info` the total extra peak
    (returned gradients included), the working memory (that peak minus the bytes of the gradients
    the call returns in hidden.grad / weight.grad), the floor ratio and tokens/s. Skips on
    out-of-memory. Returns the mean time in seconds."""
    try:
        target = make_target()
        if shape not in _FLOOR_S:
            _FLOOR_S[shape] = median_time(matmul_floor_target(x["hidden"], x["weight"]), reps=3 if CUDA else 5)
        peak = peak_memory_bytes(target)                    # also the warm-up / compile call
        grads = sum(t.grad.nbytes for t in (x["hidden"], x["weight"]) if t.grad is not None)
        # CPU shapes whose floor takes seconds: 2 rounds keep `pytest bench/` within minutes
        rounds = 3 if CUDA else (5 if _FLOOR_S[shape] < 0.5 else 2)
        benchmark.pedantic(target, rounds=rounds, warmup_rounds=1 if CUDA else 0, iterations=1)
    except torch.OutOfMemoryError as err:
        pytest.skip(f"{provider} runs out of memory at {shape}: {str(err)[:120]}")
    finally:
        if CUDA:
            torch.cuda.empty_cache()
    mean, floor = benchmark.stats.stats.mean, _FLOOR_S[shape]
    working = None if peak is None else max(0, peak - grads)
    benchmark.extra_info.update(
        peak_mem_bytes=peak, peak_mem_gib=None if peak is None else round(peak / 2 ** 30, 3),
        grad_bytes=grads, working_mem_bytes=working,
        working_mem_gib=None if working is None else round(working / 2 ** 30, 3),
        matmul_floor_s=floor, ratio_vs_matmul_floor=round(mean / floor, 3),
        tokens_per_s=round(shape[0] * shape[1] / mean),
    )
    return mean


def held_models(trainer) -> list:
    """The models a fastmgrpo Trainer keeps: the policy, its decode copy (the policy itself in
    fp32) and the frozen reference (when beta > 0)."""
    ref = trainer.policy.ref_model
    return [trainer.model, trainer.decode_weights.model] + ([ref] if ref is not None else [])


def state_bytes(models, optimizer) -> int:
    """Bytes a trainer holds before any activation: the weights of every model (each tensor once,
    tied weights too), one gradient per trainable parameter (in its dtype) and the optimizer's
    state. Peak minus this is the working memory (activations, logits, temporaries)."""
    seen, total = set(), 0
    for model in models:
        for p in model.parameters():
            if p.data_ptr() in seen:
                continue
            seen.add(p.data_ptr())
            total += p.numel() * p.element_size() * (2 if p.requires_grad else 1)
    for state in optimizer.state.values():
        total += sum(t.numel() * t.element_size() for t in state.values()
                     if isinstance(t, torch.Tensor) and t.dim() > 0)
    return total

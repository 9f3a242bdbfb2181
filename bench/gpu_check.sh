#!/usr/bin/env bash
# One-shot GPU validation + benchmark for the Triton linear-logprob kernels (H100/H200, offline,
# torch + triton preinstalled). Run from anywhere:  OUT=/some/dir bash bench/gpu_check.sh
# Total budget ~8 minutes, plus up to ~4.5 for the rollout step: every step has its own timeout
# so a slow step cannot eat the rest,
# and each writes its own result file under $OUT as soon as it finishes:
#   env.txt                       GPU, driver, torch / triton / liger versions
#   triton_tests.log / .xml       tests/kernels/test_triton.py on CUDA (compiled kernels,
#                                 real-ish shapes, memory check at N=32768 H=3584 V=152064)
#   bench_linear_logprob_<shape>.json/.log  the primitive: gemm / atomic / skip backward vs torch
#   bench_grpo_loss_<shape>.json/.log       fused GRPO loss vs eager, Liger chunked / logits, floor
#   rollout_tests.log             tests/test_rollout_engine.py on CUDA (CUDA-graph decode vs no-cache)
#   bench_rollout_<N>x<NEW>.json/.log        sampler tokens/s vs generate (dynamic / static cache);
#                                 own budget after the kernel suites: T_ROLL seconds per shape
#   bench_trainer_<part>.json/.log  whole trainer, one pytest run per part (T_TRAINER s each):
#                                 step (GRPO/MGRPO phases), packed (vs padded), vocab (4k/262k)
#   bench_trl_<provider>.json/.log  TRL GRPOTrainer default / fast vs ours (T_TRL s each; needs
#                                 trl + datasets wheels, else skipped)
#   bench.json                    all of the above merged (pytest-benchmark JSON)
# PARTS selects the steps (default "kernels rollout trainer trl", ~16 min in all: more than one
# 10-minute device command). Run it as two calls on the same warm machine:
#   PARTS="kernels" OUT=... bash bench/gpu_check.sh            (~8 min)
#   PARTS="rollout trainer trl" OUT=... bash bench/gpu_check.sh (~8 min)
# Wheels (e.g. liger-kernel) are installed from $WHEELS_DIR, ./wheels or ./shared/wheels if any.
set -u
cd "$(dirname "$0")/.."
OUT="${OUT:-$PWD/gpu_check_out}"
mkdir -p "$OUT"
T_TESTS="${T_TESTS:-150}" T_PRIM="${T_PRIM:-60}" T_GRPO="${T_GRPO:-90}"  # seconds per step
start=$(date +%s)
step() { echo "=== [$(( $(date +%s) - start ))s] $*"; }
want() { [[ " ${PARTS-kernels rollout trainer trl} " == *" $1 "* ]]; }

step "install"
pip install --no-deps --no-build-isolation -q -e . 2>&1 | tail -2
for d in "${WHEELS_DIR:-}" wheels shared/wheels; do
  if [ -n "$d" ] && ls "$d"/*.whl >/dev/null 2>&1; then
    pip install --no-deps --no-index -q "$d"/*.whl 2>&1 | tail -2
  fi
done

step "environment"
{
  nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv 2>&1
  python -c "import torch, triton; print('torch', torch.__version__, 'cuda', torch.version.cuda, 'triton', triton.__version__)"
  python -c "import liger_kernel, importlib.metadata as m; print('liger-kernel', m.version('liger-kernel'))" 2>&1 | tail -1
  date -u
} | tee "$OUT/env.txt"

if want kernels; then
step "Triton kernel tests on CUDA (timeout ${T_TESTS}s)"
timeout "$T_TESTS" python -m pytest tests/kernels/test_triton.py -q -rs -p no:cacheprovider \
  --durations=10 --junitxml="$OUT/triton_tests.xml" 2>&1 | tee "$OUT/triton_tests.log" | tail -25

# one pytest run per (suite, shape), each with its own JSON, so a timeout loses one shape only
SHAPES="${SHAPES:-8,1024,1536,151936 8,1024,3584,152064 16,2048,3584,152064}"
DEADLINE=$(( start + ${T_TOTAL:-470} ))
for suite in linear_logprob grpo_loss; do
  per=$([ "$suite" = linear_logprob ] && echo "$T_PRIM" || echo "$T_GRPO")
  for shape in $SHAPES; do
    left=$(( DEADLINE - $(date +%s) ))
    if [ "$left" -lt 20 ]; then step "skip $suite $shape: total budget spent"; continue; fi
    t=$(( per < left ? per : left ))
    tag="${suite}_${shape//,/x}"
    step "benchmark $suite $shape (timeout ${t}s)"
    FASTMGRPO_BENCH_SHAPES="$shape" timeout "$t" python -m pytest "bench/bench_${suite}.py" -q -rs \
      -p no:cacheprovider --benchmark-json "$OUT/bench_${tag}.json" \
      --benchmark-columns=mean,min,max,rounds 2>&1 | tee "$OUT/bench_${tag}.log" | tail -14
  done
done
fi

# the sampler: CUDA tests, then one pytest run per (sequences, new tokens) under its own timeout
if want rollout; then
T_ROLL="${T_ROLL:-100}"
step "rollout tests on CUDA (timeout 60s)"
timeout 60 python -m pytest tests/test_rollout_engine.py -q -rs -p no:cacheprovider -k cuda 2>&1 \
  | tee "$OUT/rollout_tests.log" | tail -5
for shape in ${ROLLOUT_SHAPES:-64,256 256,256}; do
  step "benchmark rollout $shape (timeout ${T_ROLL}s)"
  FASTMGRPO_BENCH_ROLLOUT="$shape" timeout "$T_ROLL" python -m pytest bench/bench_rollout.py -q -s -rs \
    -p no:cacheprovider --benchmark-json "$OUT/bench_rollout_${shape//,/x}.json" \
    --benchmark-columns=mean,min,max,rounds 2>&1 | tee "$OUT/bench_rollout_${shape//,/x}.log" | tail -8
done
fi

# the whole trainer and TRL side by side: one pytest run per part / provider, own timeouts
T_TRAINER="${T_TRAINER:-90}" T_TRL="${T_TRL:-100}"
if want trainer; then
  for part in step packed vocab; do
    step "benchmark trainer $part (timeout ${T_TRAINER}s)"
    timeout "$T_TRAINER" python -m pytest bench/bench_trainer.py -k "$part" -q -rs -p no:cacheprovider \
      --benchmark-json "$OUT/bench_trainer_${part}.json" --benchmark-columns=mean,min,max,rounds 2>&1 \
      | tee "$OUT/bench_trainer_${part}.log" | tail -8
  done
fi
if want trl; then
  for provider in trl_default trl_fast fastmgrpo; do
    step "benchmark TRL side by side: $provider (timeout ${T_TRL}s)"
    timeout "$T_TRL" python -m pytest bench/bench_trl.py -k "$provider" -q -rs -p no:cacheprovider \
      --benchmark-json "$OUT/bench_trl_${provider}.json" --benchmark-columns=mean,rounds 2>&1 \
      | tee "$OUT/bench_trl_${provider}.log" | tail -6
  done
fi

step "summary"
python - "$OUT" <<'EOF'
import glob, json, os, sys
out = sys.argv[1]
merged, trl = None, {}
for path in sorted(glob.glob(os.path.join(out, "bench_*.json"))):
    try:
        data = json.load(open(path))
    except ValueError:
        print(f"{os.path.basename(path)}: unreadable")
        continue
    if merged is None:
        merged = data
    else:
        merged["benchmarks"] += data["benchmarks"]
    for b in data["benchmarks"]:
        e = b["extra_info"]
        if b["name"].startswith("test_trl_side_by_side"):
            trl[e["provider"]] = e
            print(f"{b['name']:<75} {e['s_per_step']:8.2f} s/step {e['completion_tokens_per_s']:9.1f} tok/s"
                  f"  peak {e['peak_mem_gib']} GiB")
        elif b["name"].startswith("test_trainer_step"):
            print(f"{b['name']:<75} {e['step_tokens_per_s']:>8} tok/s (rollout {e['rollout_tokens_per_s']},"
                  f" ref {e['ref_tokens_per_s']}, train {e['train_tokens_per_s']})  peak {e['peak_mem_gib']} GiB")
        elif b["name"].startswith("test_packed_vs_padded"):
            print(f"{b['name']:<75} {b['stats']['mean'] * 1e3:9.1f} ms  padding {e['padding_fraction']}"
                  f"  peak {e['peak_mem_gib']} GiB")
        elif b["name"].startswith("test_vocab_sweep"):
            print(f"{b['name']:<75} {e['fwd_bwd_s'] * 1e3:9.1f} ms fwd+bwd  peak {e['peak_mem_gib']} GiB")
        elif b["name"].startswith("test_rollout"):
            print(f"{b['name']:<75} {e.get('tokens_per_s')!s:>10} tok/s  x{e.get('ratio_vs_fastest_generate')}"
                  " fastest generate")
        else:
            print(f"{b['name']:<75} {b['stats']['mean'] * 1e3:9.1f} ms  x{e.get('ratio_vs_matmul_floor')}"
                  f" floor  peak {e.get('peak_mem_gib')} GiB")
if "fastmgrpo" in trl and "trl_fast" in trl:  # targets: >= 3x the tokens/s, <= 0.5x the peak
    ours, fast = trl["fastmgrpo"], trl["trl_fast"]
    print(f"fastmgrpo vs TRL fast: x{ours['completion_tokens_per_s'] / fast['completion_tokens_per_s']:.2f}"
          f" tokens/s (target >= 3), x{ours['peak_mem_bytes'] / fast['peak_mem_bytes']:.2f} peak (target <= 0.5)")
if merged is not None:  # every suite and shape in one pytest-benchmark JSON
    json.dump(merged, open(os.path.join(out, "bench.json"), "w"), indent=1)
    print("wrote", os.path.join(out, "bench.json"))
EOF
step "done"

#!/usr/bin/env bash
# One-shot GPU validation + benchmark for the Triton linear-logprob kernels (H100/H200, offline,
# torch + triton preinstalled). Run from anywhere:  OUT=/some/dir bash bench/gpu_check.sh
# Total budget ~8 minutes: every step has its own timeout so a slow step cannot eat the rest,
# and each writes its own result file under $OUT as soon as it finishes:
#   env.txt                       GPU, driver, torch / triton / liger versions
#   triton_tests.log / .xml       tests/kernels/test_triton.py on CUDA (compiled kernels,
#                                 real-ish shapes, memory check at N=32768 H=3584 V=152064)
#   bench_linear_logprob.json/.log  the primitive: atomic / gemm / skip backward vs torch, eager
#   bench.json / bench.log        fused GRPO loss vs eager, Liger chunked, Liger logits, floor
# Wheels (e.g. liger-kernel) are installed from $WHEELS_DIR, ./wheels or ./shared/wheels if any.
set -u
cd "$(dirname "$0")/.."
OUT="${OUT:-$PWD/gpu_check_out}"
mkdir -p "$OUT"
T_TESTS="${T_TESTS:-170}" T_PRIM="${T_PRIM:-120}" T_GRPO="${T_GRPO:-170}"
start=$(date +%s)
step() { echo "=== [$(( $(date +%s) - start ))s] $*"; }

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

step "Triton kernel tests on CUDA (timeout ${T_TESTS}s)"
timeout "$T_TESTS" python -m pytest tests/kernels/test_triton.py -q -rs -p no:cacheprovider \
  --durations=10 --junitxml="$OUT/triton_tests.xml" 2>&1 | tee "$OUT/triton_tests.log" | tail -25

step "primitive benchmark (timeout ${T_PRIM}s)"
timeout "$T_PRIM" python -m pytest bench/bench_linear_logprob.py -q -rs -p no:cacheprovider \
  --benchmark-json "$OUT/bench_linear_logprob.json" --benchmark-columns=mean,min,max,rounds \
  2>&1 | tee "$OUT/bench_linear_logprob.log" | tail -30

step "GRPO loss benchmark (timeout ${T_GRPO}s)"
timeout "$T_GRPO" python -m pytest bench/bench_grpo_loss.py -q -rs -p no:cacheprovider \
  --benchmark-json "$OUT/bench.json" --benchmark-columns=mean,min,max,rounds \
  2>&1 | tee "$OUT/bench.log" | tail -30

step "summary"
python - "$OUT" <<'EOF'
import json, os, sys
out = sys.argv[1]
for name in ("bench_linear_logprob.json", "bench.json"):
    path = os.path.join(out, name)
    if not os.path.exists(path):
        print(f"{name}: missing (step timed out or failed)")
        continue
    for b in json.load(open(path))["benchmarks"]:
        e = b["extra_info"]
        print(f"{b['name']:<75} {b['stats']['mean'] * 1e3:9.1f} ms  x{e.get('ratio_vs_matmul_floor')}"
              f" floor  peak {e.get('peak_mem_gib')} GiB")
EOF
step "done"

#!/usr/bin/env bash
# One-shot GPU validation + benchmark (H100/H200, offline, torch + triton preinstalled).
# Run from anywhere:  OUT=/some/dir bash bench/gpu_check.sh
# Every step has its own timeout (SIGINT first, so pytest still writes its report) and writes its
# own result file under $OUT as soon as it finishes; a step that would not fit in the total
# budget is not started and is listed in $OUT/not_run.txt (never silently dropped):
#   env.txt                       GPU, driver, torch / triton / liger / transformers versions and
#                                 inspect.signature(varlen_attn) (which packed-attention path runs)
#   plan.txt                      the kernel steps in run order, with their timeouts
#   not_run.txt                   planned or known steps that did not run or timed out, and why
#   triton_tests.log / .xml       tests/kernels/test_triton.py on CUDA (compiled kernels)
#   bench_<suite>_<provider>_<shape>.json/.log   one pytest run per (suite, provider, shape), so a
#                                 slow peer (Liger chunked compiling at the largest shape) loses
#                                 only its own number; ours run first, then peers, Liger chunked last
#   rollout_tests.log             tests/test_sampler_engine.py and test_sampler_compile.py on CUDA
#                                 (CUDA-graph decode vs no-cache; the compiled step vs uncompiled)
#   bench_rollout_<N>x<NEW>.json/.log        sampler tokens/s vs generate (T_ROLL=150 s per shape)
#   trainer_tests.log             tests/test_trainer_memory.py on CUDA (pinned copies, syncs per step)
#   bench_trainer_<part>.json/.log  whole trainer, one pytest run per part (T_TRAINER=120 s each)
#   bench_trl_<provider>.json/.log  ours / TRL fast / TRL default (T_TRL=130 s each; TRL needs
#                                 trl + datasets wheels, else skipped)
#   bench.json                    all of the above merged (pytest-benchmark JSON)
# PARTS selects the steps. Make exactly these four device calls, in this order, one part each;
# every one fits 8 minutes on a fresh (cold) machine, install and compilation included, because
# each part stops starting steps once T_PART=420 s of its own are spent (what is left goes to
# not_run.txt) and each step has its own timeout:
#   1. PARTS=kernels OUT=... bash bench/gpu_check.sh   kernel tests + benchmarks  (<= ~7.5 min)
#   2. PARTS=rollout OUT=... bash bench/gpu_check.sh   sampler tests + 2 shapes   (<= ~7.5 min;
#                                                      static-cache generate compiles > 100 s)
#   3. PARTS=trainer OUT=... bash bench/gpu_check.sh   trainer CUDA tests + step/packed/vocab (<= ~7.5 min)
#   4. PARTS=trl     OUT=... bash bench/gpu_check.sh   TRL default/fast vs ours    (<= ~7.5 min)
# Fetch $OUT after each call: a later call may start on a fresh machine. Unset, PARTS means all
# four (more than one device command: local and CPU use only).
# Wheels (liger-kernel, trl, datasets + its dill, multiprocess: the machine has none of them;
# gguf, math-verify are not needed) are installed with --target /tmp/site from $WHEELS_DIR, ./.whl,
# ./wheels or ./shared/wheels if any. Fetch them here once, before the first device call:
#   bash bench/fetch_wheels.sh        # pip download --no-deps, Python 3.12 wheels, into ./.whl
# Without them the kernels part has no Liger peers and the trl part runs fastmgrpo only.
# DRY=1 writes plan.txt / plan_<part>.txt (steps and timeouts) and runs nothing (any machine);
# ALLOW_CPU=1 runs without CUDA (tiny SHAPES; bench/test_gpu_check.py does both on CPU);
# SKIP_INSTALL=1 keeps an existing install (the import check still runs); PLAN_ONLY="p q" plans
# only those providers.
set -u
cd "$(dirname "$0")/.."
OUT="${OUT:-$PWD/gpu_check_out}"
mkdir -p "$OUT"
PY="${PY:-python3}"
DRY="${DRY:-0}"
start=$(date +%s)
T_PART="${T_PART:-420}"
step() { echo "=== [$(( $(date +%s) - start ))s] $*"; }
want() { [[ " ${PARTS-kernels rollout trainer trl} " == *" $1 "* ]]; }
fail() { echo "FATAL: $*" | tee -a "$OUT/env.txt" >&2; exit 1; }
# SIGINT lets pytest write its JSON / junit report; KILL 15 s later if it is stuck in a kernel
limited() { local t=$1; shift; timeout -s INT -k 15 "$t" "$@"; }
: > "$OUT/not_run.txt"

if [ "$DRY" != 1 ]; then
  step "install"
  for d in "${WHEELS_DIR:-}" .whl wheels shared/wheels; do
    if [ -n "$d" ] && ls "$d"/*.whl >/dev/null 2>&1; then
      "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site \
        "$d"/*.whl 2>&1 | tail -2
      export PYTHONPATH="/tmp/site${PYTHONPATH:+:$PYTHONPATH}"
    fi
  done
  [ "${SKIP_INSTALL:-0}" = 1 ] || "$PY" -m pip install --no-deps --no-build-isolation -q -e . 2>&1 | tail -2
  # an older install elsewhere would be measured instead of this checkout: nothing below would mean anything
  "$PY" -c "import fastmgrpo.kernels as k, os, sys; sys.exit(0 if os.path.realpath(k.__file__).startswith(os.path.realpath('fastmgrpo/kernels')) else 'fastmgrpo.kernels is not this checkout: ' + k.__file__)" \
    || fail "fastmgrpo.kernels does not import from this checkout (did pip install -e . fail?)"
  if [ "${ALLOW_CPU:-0}" != 1 ]; then
    "$PY" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 'no CUDA device')" || fail "torch sees no GPU"
  fi

  step "environment"
  {
    nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv 2>&1
    "$PY" -c "import torch, triton; print('torch', torch.__version__, 'cuda', torch.version.cuda, 'triton', triton.__version__)"
    "$PY" -c "import liger_kernel, importlib.metadata as m; print('liger-kernel', m.version('liger-kernel'))" 2>&1 | tail -1
    "$PY" -c "import transformers; print('transformers', transformers.__version__)" 2>&1 | tail -1
    # the TRL part needs these to import (carried wheels against the machine's pyarrow / fsspec / accelerate)
    "$PY" -c "import trl, datasets, importlib.metadata as m; print(*(f'{p} {m.version(p)}' for p in ('trl', 'datasets', 'accelerate', 'pyarrow', 'fsspec')))" 2>&1 | tail -1
    # which packed-attention path the trainer can take (fastmgrpo/attention.py reads these keywords)
    "$PY" -c "import inspect; from fastmgrpo.attention import _torch_varlen as v; f = v(); print('varlen_attn', 'missing' if f is None else f.__module__ + '.varlen_attn' + str(inspect.signature(f)))" 2>&1 | tail -1
    date -u
  } | tee -a "$OUT/env.txt"
fi

if want kernels; then
  # plan.txt: "suite provider shape timeout" in priority order (bench/gpu_plan.py)
  SHAPES="${SHAPES:-8,1024,1536,151936 8,1024,3584,152064 16,2048,3584,152064 64,256,640,262144}"
  T_TESTS="${T_TESTS:-100}" T_TOTAL="${T_TOTAL:-420}"
  "$PY" bench/gpu_plan.py "$OUT" $SHAPES > "$OUT/plan.txt" || fail "bench/gpu_plan.py could not plan"
  worst=$(awk '{s += $4} END {print s + 0}' "$OUT/plan.txt")
  step "plan: $(wc -l < "$OUT/plan.txt") benchmark runs, worst case ${worst}s + tests ${T_TESTS}s; budget ${T_TOTAL}s"
  DEADLINE=$(( start + T_TOTAL ))

  if [ "$DRY" != 1 ] && [ "$T_TESTS" -gt 0 ]; then
    step "Triton kernel tests on CUDA (timeout ${T_TESTS}s)"
    limited "$T_TESTS" "$PY" -m pytest tests/kernels/test_triton.py tests/kernels/test_fused.py tests/kernels/test_overlap.py \
      -q -rs -p no:cacheprovider \
      --durations=10 --junitxml="$OUT/triton_tests.xml" 2>&1 | tee "$OUT/triton_tests.log" | tail -25
  fi

  while read -r suite provider shape t; do
    left=$(( DEADLINE - $(date +%s) ))
    if [ "$left" -lt 15 ]; then
      echo "$suite $provider $shape: total budget spent" | tee -a "$OUT/not_run.txt"; continue
    fi
    t=$(( t < left ? t : left ))
    tag="${suite}_${provider}_${shape//,/x}"
    step "benchmark $suite $provider $shape (timeout ${t}s)"
    FASTMGRPO_BENCH_SHAPES="$shape" FASTMGRPO_BENCH_PROVIDERS="$provider" limited "$t" "$PY" -m pytest \
      "bench/bench_${suite}.py" -q -rs -p no:cacheprovider --benchmark-json "$OUT/bench_${tag}.json" \
      --benchmark-columns=mean,min,rounds < /dev/null 2>&1 | tee "$OUT/bench_${tag}.log" | tail -4
    rc=${PIPESTATUS[0]}
    if [ "$rc" = 124 ] || [ "$rc" = 137 ]; then
      echo "$suite $provider $shape: timed out after ${t}s" | tee -a "$OUT/not_run.txt"
    fi
  done < <([ "$DRY" = 1 ] || cat "$OUT/plan.txt")
fi

# The other parts: each step "name timeout_s command..." runs unless the part's T_PART budget
# (counted from the script's start, install included) has too little left; then it is listed in
# not_run.txt. DRY=1 lists the steps with their timeouts in plan_<part>.txt and runs nothing.
part_step() {  # part name timeout command...
  local part=$1 name=$2 t=$3; shift 3
  if [ "$DRY" = 1 ]; then echo "$name $t" >> "$OUT/plan_$part.txt"; return; fi
  local left=$(( start + T_PART - $(date +%s) ))
  if [ "$left" -lt 20 ]; then echo "$part $name: part budget ${T_PART}s spent" | tee -a "$OUT/not_run.txt"; return; fi
  t=$(( t < left ? t : left ))
  step "$part: $name (timeout ${t}s)"
  limited "$t" "$@" < /dev/null 2>&1 | tee "$OUT/$name.log" | tail -8
  rc=${PIPESTATUS[0]}
  if [ "$rc" = 124 ] || [ "$rc" = 137 ]; then echo "$part $name: timed out after ${t}s" | tee -a "$OUT/not_run.txt"; fi
}

# the sampler: CUDA tests, then one pytest run per (sequences, new tokens); the first shape
# pays static-cache generate's cold compilation (> 100 s)
if want rollout; then
  : > "$OUT/plan_rollout.txt"
  part_step rollout rollout_tests 120 "$PY" -m pytest tests/test_sampler_engine.py tests/test_sampler_compile.py -q -rs -p no:cacheprovider -k cuda
  T_ROLL="${T_ROLL:-150}"
  for shape in ${ROLLOUT_SHAPES:-64,256 256,256}; do
    FASTMGRPO_BENCH_ROLLOUT="$shape" part_step rollout "bench_rollout_${shape//,/x}" "$T_ROLL" "$PY" -m pytest \
      bench/bench_rollout.py -q -s -rs -p no:cacheprovider --benchmark-json "$OUT/bench_rollout_${shape//,/x}.json" \
      --benchmark-columns=mean,min,max,rounds
  done
fi

# the whole trainer, then TRL side by side: one pytest run per part / provider
if want trainer; then
  : > "$OUT/plan_trainer.txt"
  # CUDA-only trainer tests: pinned copies, syncs per step counted by torch.cuda.set_sync_debug_mode
  part_step trainer trainer_tests 45 "$PY" -m pytest tests/test_trainer_memory.py -q -rs -s -p no:cacheprovider -k cuda
  for part in step packed vocab; do
    part_step trainer "bench_trainer_$part" "${T_TRAINER:-120}" "$PY" -m pytest bench/bench_trainer.py -k "$part" \
      -q -rs -p no:cacheprovider --benchmark-json "$OUT/bench_trainer_${part}.json" \
      --benchmark-columns=mean,min,max,rounds
  done
fi
if want trl; then
  : > "$OUT/plan_trl.txt"
  for provider in fastmgrpo trl_fast trl_default; do  # ours first: it needs no trl wheel
    part_step trl "bench_trl_$provider" "${T_TRL:-130}" "$PY" -m pytest bench/bench_trl.py -k "$provider" -q -rs \
      -p no:cacheprovider --benchmark-json "$OUT/bench_trl_${provider}.json" --benchmark-columns=mean,rounds
  done
fi
if [ "$DRY" = 1 ]; then cat "$OUT"/plan*.txt "$OUT/not_run.txt" 2>/dev/null; exit 0; fi

step "summary"
"$PY" - "$OUT" <<'EOF'
import glob, json, os, sys
out = sys.argv[1]
merged, trl = None, {}
for path in sorted(glob.glob(os.path.join(out, "bench_*.json"))):
    if os.path.getsize(path) == 0:  # pytest-benchmark writes an empty file when the test skipped
        print(f"{os.path.basename(path)}: no benchmark (skipped: see its .log)")
        continue
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
                  f" floor  peak {e.get('peak_mem_gib')} GiB  working {e.get('working_mem_gib')} GiB")
if "fastmgrpo" in trl and "trl_fast" in trl:  # targets: >= 3x the tokens/s, <= 0.5x the peak
    ours, fast = trl["fastmgrpo"], trl["trl_fast"]
    print(f"fastmgrpo vs TRL fast: x{ours['completion_tokens_per_s'] / fast['completion_tokens_per_s']:.2f}"
          f" tokens/s (target >= 3), x{ours['peak_mem_bytes'] / fast['peak_mem_bytes']:.2f} peak (target <= 0.5)")
if merged is not None:  # every suite and shape in one pytest-benchmark JSON
    json.dump(merged, open(os.path.join(out, "bench.json"), "w"), indent=1)
    print("wrote", os.path.join(out, "bench.json"))
EOF
if [ -s "$OUT/not_run.txt" ]; then echo "not run:"; cat "$OUT/not_run.txt"; fi
step "done"

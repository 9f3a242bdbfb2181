#!/usr/bin/env bash
# Downloads (here, where pip can reach PyPI) the wheels gpu_check.sh installs on the offline GPU
# machine, into ./.whl (or $1). That machine (Python 3.12, torch 2.11, triton 3.6, transformers
# 5.17) already has accelerate, pandas, pyarrow, xxhash, fsspec, huggingface-hub, psutil, jinja2,
# pyyaml and pytest-benchmark; it lacks liger-kernel, trl, datasets and datasets' dill and
# multiprocess. All five are pure Python (py3 / py312 wheels), about 3 MiB in all.
# gguf and math-verify are not needed: the benchmarks use random weights and synthetic problems.
set -eu
cd "$(dirname "$0")/.."
dest="${1:-.whl}"
mkdir -p "$dest"
# .whl is not git-ignored: the device copy takes it along as an untracked folder (never commit it)
for pkg in liger-kernel==0.8.5 trl==1.16.0 datasets==5.2.0 dill==0.4.1 multiprocess==0.70.19; do
  "${PY:-python3}" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux2014_x86_64 --platform any -d "$dest" "$pkg"
done
ls -la "$dest"

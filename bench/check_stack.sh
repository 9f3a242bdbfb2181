#!/usr/bin/env bash
# The CPU test suite on the GPU machine's software stack (torch 2.11, Triton 3.6, transformers
# 5.17), which it cannot upgrade, so that a device session never finds the suite red there first.
# Not in CI: the torch 2.11 wheel from PyPI is a CUDA build of several GB (it runs on CPU).
#   bash bench/check_stack.sh            # venv in ${VENV:-/tmp/fastmgrpo-stack}, then the suite
# TORCH / TRITON / TRANSFORMERS override the versions; extra arguments go to pytest.
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${VENV:-/tmp/fastmgrpo-stack}
TORCH=${TORCH:-2.11.0} TRITON=${TRITON:-3.6.0} TRANSFORMERS=${TRANSFORMERS:-5.17.0}
export PIP_DISABLE_PIP_VERSION_CHECK=1
[ -x "$VENV/bin/python" ] || python3 -m venv "$VENV"
"$VENV/bin/pip" install -q "torch==$TORCH" "triton==$TRITON" "transformers==$TRANSFORMERS"
# the pins first, so the project's ranges are checked against them and nothing is upgraded
"$VENV/bin/pip" install -q -e ".[test]" "torch==$TORCH" "triton==$TRITON" "transformers==$TRANSFORMERS"
"$VENV/bin/python" -c "import torch, triton, transformers, numpy; print('stack: torch', torch.__version__, \
'triton', triton.__version__, 'transformers', transformers.__version__, 'numpy', numpy.__version__)"
"$VENV/bin/python" -m pytest tests -q "$@"

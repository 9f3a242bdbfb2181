"""Optional dependencies stay optional: the entry points import without them (the H200 box has
none of trl, datasets, liger-kernel, math-verify, gguf), and GSM8K rewards work without
math-verify. Each check runs in a fresh interpreter so that nothing imported earlier counts."""

import json
from pathlib import Path
import subprocess
import sys

import pytest

OPTIONAL = ["trl", "datasets", "liger_kernel", "math_verify", "latex2sympy2_extended", "antlr4", "gguf"]


def _run(code: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)


@pytest.mark.slow
def test_entry_points_import_no_optional_dependency():
    out = _run("import json, sys\n"
               "import fastmgrpo.train, fastmgrpo.eval, fastmgrpo.trainer\n"
               f"print(json.dumps([m for m in {OPTIONAL!r} if m in sys.modules]))")
    assert out.returncode == 0, out.stderr[-3000:]
    assert json.loads(out.stdout.splitlines()[-1]) == []


def test_gsm8k_rewards_without_math_verify():
    # sys.modules[name] = None makes `import name` raise ImportError, as if it were not installed.
    out = _run("import sys\n"
               "sys.modules['math_verify'] = None\n"
               "from fastmgrpo.rewards import answers_match, score\n"
               "from fastmgrpo.types import Problem\n"
               "assert answers_match('#### 1,234', '1234', 'gsm8k')\n"
               "assert not answers_match('#### 9', '8', 'gsm8k')\n"
               "assert score('so 3/4\\n#### 0.75', Problem('q', '3/4', 'gsm8k')) == (1.0, True)\n"
               "try:\n"
               "    answers_match('\\\\frac{1}{2}', '\\\\frac{1}{2}', 'math')\n"
               "except ImportError as e:\n"
               "    print(e)\n"
               "else:\n"
               "    raise SystemExit('a LaTeX answer without math-verify must raise')\n")
    assert out.returncode == 0, out.stderr[-3000:]
    assert "math-verify" in out.stdout


def test_repo_root_does_not_shadow_huggingface_kernels():
    """`python -m ...` puts the working directory first on sys.path; transformers imports Hugging
    Face's `kernels` package whenever it is installed, so no folder of ours may answer to that name
    from the repo root (a top-level kernels/ did, and broke every import of transformers there)."""
    root = Path(__file__).resolve().parents[1]
    out = subprocess.run([sys.executable, "-c", "import importlib.util, json\n"
                          "spec = importlib.util.find_spec('kernels')\n"
                          "print(json.dumps(None if spec is None else spec.origin))"],
                         capture_output=True, text=True, timeout=300, cwd=root)
    assert out.returncode == 0, out.stderr[-3000:]
    origin = json.loads(out.stdout.splitlines()[-1])
    ours = origin is not None and root in Path(origin).resolve().parents and "site-packages" not in origin
    assert not ours, origin


def test_importing_registers_nothing_into_transformers():
    """Attention functions are registered by the call that uses them, not as an import side effect."""
    out = _run("import json\n"
               "from transformers import AttentionInterface\n"
               "before = set(AttentionInterface._global_mapping)\n"
               "import fastmgrpo.attention, fastmgrpo.trainer, fastmgrpo.eval\n"
               "print(json.dumps(sorted(set(AttentionInterface._global_mapping) - before)))")
    assert out.returncode == 0, out.stderr[-3000:]
    assert json.loads(out.stdout.splitlines()[-1]) == []

"""gpu_check.sh's CPU-runnable parts: the plan (DRY=1) and one real step on CPU (ALLOW_CPU=1)."""
import json
import os
import subprocess
import sys
from pathlib import Path

from gpu_plan import SUITES, suite_providers

SCRIPT = Path(__file__).with_name("gpu_check.sh")
GPU_SHAPES = ["8,1024,1536,151936", "8,1024,3584,152064", "16,2048,3584,152064", "64,256,640,262144"]


def _run(tmp_path, **env):
    tmp_path.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "OUT": str(tmp_path), "PARTS": "kernels", "PY": sys.executable, **env}
    out = subprocess.run(["bash", str(SCRIPT)], env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-2000:]
    return out.stdout


def test_plan_covers_every_provider_and_shape_ours_first(tmp_path):
    _run(tmp_path, DRY="1")
    steps = [line.split() for line in (tmp_path / "plan.txt").read_text().splitlines()]
    not_run = (tmp_path / "not_run.txt").read_text()
    for suite in SUITES:
        for provider in suite_providers(suite):
            for shape in GPU_SHAPES:
                planned = [suite, provider, shape] in [s[:3] for s in steps]
                assert planned != (f"{suite} {provider} {shape}:" in not_run), (suite, provider, shape)
    peers = ("eager", "torch_lce", "liger_triton_logits", "liger_chunked")
    first_peer = min(i for i, s in enumerate(steps) if s[1] in peers)
    assert all(s[1] not in peers for s in steps[:first_peer]) and all(s[1] in peers for s in steps[first_peer:])
    assert [s[1] for s in steps][-len(GPU_SHAPES):] == ["liger_chunked"] * len(GPU_SHAPES)


def test_one_cpu_step_writes_its_json(tmp_path):
    stdout = _run(tmp_path, ALLOW_CPU="1", SKIP_INSTALL="1", T_TESTS="0", SHAPES="2,32,32,256",
                  PLAN_ONLY="fastmgrpo")
    (b,) = json.loads((tmp_path / "bench_grpo_loss_fastmgrpo_2x32x32x256.json").read_text())["benchmarks"]
    assert b["extra_info"]["working_mem_bytes"] <= b["extra_info"]["peak_mem_bytes"]
    assert (tmp_path / "bench.json").exists() and "working" in stdout


def test_each_device_call_fits_eight_minutes(tmp_path):
    """The header's device calls (one part each) are all the parts, and each part's steps fit
    its T_PART budget, which with the kill grace stays under 8 minutes."""
    header = SCRIPT.read_text().split("set -u")[0]
    calls = [line.split("PARTS=")[1].split()[0] for line in header.splitlines() if "bash bench/gpu_check.sh" in line
             and "PARTS=" in line]
    assert calls == ["kernels", "rollout", "trainer", "trl"]
    for part in calls[1:]:
        _run(tmp_path / part, DRY="1", PARTS=part)
        steps = [line.split() for line in (tmp_path / part / f"plan_{part}.txt").read_text().splitlines()]
        assert steps and sum(int(t) for _, t in steps) <= 420, (part, steps)
    assert 420 + 15 < 8 * 60

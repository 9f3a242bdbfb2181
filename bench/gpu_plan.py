"""The kernel steps of gpu_check.sh: one line "suite provider shape timeout_s" per pytest run.

Usage: python3 bench/gpu_plan.py OUT_DIR SHAPE [SHAPE ...]   (SHAPE = "B,L,H,V")
Order: our providers at every shape first, then peers, then Liger chunked (it compiles per
shape and is the slowest), so a tight budget costs peers' numbers, never ours. Providers that
would only skip are not planned (each run is a process start) and go to OUT_DIR/not_run.txt with
the reason: matmul_floor and matmul_floor_frozen_head (runs record the floors), liger_* without liger-kernel,
torch_lce without F.linear_cross_entropy. $DRY=1 plans without importing torch.
Timeouts (s): T_OURS, T_PEER, T_SLOW; the first run of each suite adds T_COLD (cold Triton cache).
$PLAN_ONLY="p q" plans only those providers.
"""
import ast
import importlib.util
import os
import sys
from pathlib import Path

SUITES = ("linear_logprob", "grpo_loss")
PEERS = ("eager", "torch_lce", "liger_triton_logits")
SLOW = ("liger_chunked",)


def suite_providers(suite: str) -> list:
    """The suite's PROVIDERS list, read from its source (no torch import)."""
    source = (Path(__file__).parent / f"bench_{suite}.py").read_text()
    for node in ast.parse(source).body:
        if isinstance(node, ast.Assign) and getattr(node.targets[0], "id", None) == "PROVIDERS":
            value = node.value.args[0] if isinstance(node.value, ast.Call) else node.value
            return ast.literal_eval(value)
    raise ValueError(f"bench_{suite}.py has no PROVIDERS list")


def why_not(provider: str, dry: bool) -> str | None:
    if provider == "matmul_floor":
        return "every run records the floor (extra_info matmul_floor_s)"
    if provider == "matmul_floor_frozen_head":
        return "every frozen_head run records its two-GEMM floor (extra_info frozen_head_floor_s)"
    if dry:
        return None
    if provider.startswith("liger") and importlib.util.find_spec("liger_kernel") is None:
        return "liger-kernel is not installed (carry its wheel in .whl)"
    if provider == "torch_lce":
        import torch
        if not hasattr(torch.nn.functional, "linear_cross_entropy"):
            return f"torch {torch.__version__} has no torch.nn.functional.linear_cross_entropy"
    return None


def tier(provider: str) -> int:
    return 2 if provider in SLOW else 1 if provider in PEERS else 0


def plan(shapes: list, dry: bool, timeouts: dict, only: set | None = None) -> tuple[list, list]:
    """(steps as (suite, provider, shape, timeout_s), not-run lines)."""
    steps, skipped, cold = [], [], set(SUITES)
    for level in range(3):
        for shape in shapes:
            for suite in SUITES:
                for provider in suite_providers(suite):
                    if tier(provider) != level or (only and provider not in only):
                        continue
                    reason = why_not(provider, dry)
                    if reason:
                        skipped.append(f"{suite} {provider} {shape}: {reason}")
                        continue
                    t = timeouts[level] + (timeouts["cold"] if suite in cold else 0)
                    cold.discard(suite)
                    steps.append((suite, provider, shape, t))
    return steps, skipped


def main(argv: list) -> None:
    out, shapes = argv[1], argv[2:]
    env = os.environ.get
    timeouts = {0: int(env("T_OURS", 30)), 1: int(env("T_PEER", 30)), 2: int(env("T_SLOW", 60)),
                "cold": int(env("T_COLD", 60))}
    steps, skipped = plan(shapes, env("DRY") == "1", timeouts, set(env("PLAN_ONLY", "").split()))
    with open(os.path.join(out, "not_run.txt"), "a") as f:
        f.writelines(line + "\n" for line in skipped)
    print("\n".join(" ".join(map(str, s)) for s in steps))


if __name__ == "__main__":
    main(sys.argv)

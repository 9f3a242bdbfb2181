"""Shared pytest set-up: every test runs under a fixed seed of its own, printed when it fails.

The seed is a hash of the test's id, so a run is reproducible and a failure names the seed that
caused it. FASTMGRPO_SEED_SHIFT=K shifts every seed (sweep seeds outside CI to hunt for tests that
fail for some draws: `for k in 1 2 3; do FASTMGRPO_SEED_SHIFT=$k pytest tests; done`).
"""

import os
import random
import zlib

import pytest
import torch

from fastmgrpo import env

# transformers >= 5.25 loads every model with use_kernels=True by default (hub kernels: a download,
# an error without the `kernels` package); tests (and TRL in them) call from_pretrained directly.
os.environ.setdefault("USE_HUB_KERNELS", "NO")
# Subprocesses (CLI runs, torchrun-style ranks) get one intra-op thread too, like this process,
# whatever the caller's OMP_NUM_THREADS: runs compared across processes must round alike.
os.environ["OMP_NUM_THREADS"] = "1"


def pytest_configure(config):
    config.addinivalue_line("markers", "slow: takes 5 s or more on a 2-core CPU machine (subprocesses, "
                            "multi-rank runs, whole CLI runs); deselect with -m 'not slow' while iterating")


@pytest.fixture(autouse=True, scope="session")
def _one_thread():
    """One intra-op thread: tiny models spend most of their time spin-waiting with two
    (7-100x slower on a busy 2-core machine); large kernel shapes run in subprocesses."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(autouse=True, scope="session")
def _private_model_cache(tmp_path_factory):
    """Converted models go to a fresh folder: no test reads ~/.cache (nor any file outside the
    repository and its temporary folders)."""
    saved = os.environ.get("FASTMGRPO_CACHE")
    os.environ["FASTMGRPO_CACHE"] = str(tmp_path_factory.mktemp("model-cache"))
    yield
    if saved is None:
        os.environ.pop("FASTMGRPO_CACHE")
    else:
        os.environ["FASTMGRPO_CACHE"] = saved


@pytest.fixture(autouse=True)
def _seed(request):
    seed = (zlib.crc32(request.node.nodeid.encode()) + env.seed_shift()) % 2**31
    torch.manual_seed(seed)
    random.seed(seed)
    yield seed
    report = getattr(request.node, "rep_call", None)
    if report is not None and report.failed:
        print(f"\n[seed] {request.node.nodeid} ran with torch.manual_seed({seed})")


@pytest.hookimpl(hookwrapper=True, tryfirst=True)
def pytest_runtest_makereport(item, call):
    outcome = yield
    report = outcome.get_result()
    setattr(item, "rep_" + report.when, report)
    if report.when == "call" and report.failed and "_seed" in item.funcargs:
        report.sections.append(("seed", f"torch.manual_seed({item.funcargs['_seed']})"))

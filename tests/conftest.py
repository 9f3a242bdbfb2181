"""Shared pytest set-up: every test runs under a fresh random seed, reported when it fails."""

import random

import pytest
import torch


@pytest.fixture(autouse=True, scope="session")
def _one_thread():
    """One intra-op thread: tiny models spend most of their time spin-waiting with two
    (7-100x slower on a busy 2-core machine); large kernel shapes run in subprocesses."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(autouse=True)
def _seed(request):
    seed = random.SystemRandom().randrange(2**31)
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

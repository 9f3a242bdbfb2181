"""pytest-benchmark set-up for `pytest bench/`.

Files named bench_*.py are collected by the hook below (no ini file needed), so plain
`pytest bench/` from the repository root runs them. Helpers live in benchutil.py.
"""
import pytest
import torch


def pytest_collect_file(file_path, parent):
    # a bench_*.py named on the command line is already collected by pytest itself
    if (file_path.suffix == ".py" and file_path.name.startswith("bench_")
            and not parent.session.isinitpath(file_path)):
        return pytest.Module.from_parent(parent, path=file_path)
    return None


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)

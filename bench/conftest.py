"""Shared fixtures of the benchmark suites: the workload size option and the workload.

Run: ``python -m pytest bench [--size tiny|small|medium] [--benchmark-json out.json]``.
Plain ``pytest`` never collects this folder (see ``testpaths``); CI runs it once with
``--benchmark-disable`` so that it cannot rot.
"""

import os
import sys

import pytest

sys.path.insert(0, os.path.dirname(__file__))   # tests import `workloads` (importlib mode)

from segcore.synth import SIZES, generate  # noqa: E402


def pytest_addoption(parser):
    parser.addoption("--size", default="tiny", choices=sorted(SIZES),
                     help="workload size: tiny (2k users / 30k events), small (100k / 1M), "
                          "medium (1M / 10M, the canonical DESIGN §6 workload)")


@pytest.fixture(scope="session")
def size(request):
    return request.config.getoption("--size")


@pytest.fixture(scope="session")
def workload(size):
    return generate(*SIZES[size], seed=0)



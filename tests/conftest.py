"""One behaviour suite, two engines: every test taking ``make_engine`` runs on both."""

import pytest

import segcore
import segcore_ref

ENGINES = {"kernel": segcore.Engine, "reference": segcore_ref.RefEngine}


@pytest.fixture(params=sorted(ENGINES))
def make_engine(request):
    """Factory for an engine of the parametrised kind: ``make_engine(**kwargs)``."""
    return ENGINES[request.param]


@pytest.fixture
def engine_kind(request, make_engine):
    return request.node.callspec.params["make_engine"]

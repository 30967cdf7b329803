"""Every public module's docstring examples run against the installed package."""

import doctest
import importlib

import pytest

MODULES = ["segcore", "segcore.engine", "segcore.rules", "segcore.build", "segcore.hashing",
           "segcore.synth", "segcore.triggers", "segcore.snapshot", "segcore.wal",
           "segcore.cli", "segcore.sharded", "segcore.localtime", "segcore.predict"]


@pytest.mark.parametrize("name", MODULES)
def test_module_doctests(name):
    mod = importlib.import_module(name)
    res = doctest.testmod(mod, optionflags=doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE)
    assert res.attempted > 0, f"{name} has no examples"
    assert res.failed == 0, f"{res.failed} doctest(s) failed in {name}"

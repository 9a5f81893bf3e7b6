"""Shared fixtures: megatron-core initialised once per test session in this process (tp=pp=1, CPU/gloo)."""

from __future__ import annotations

import os

import pytest

os.environ.setdefault("DS_ACCELERATOR", "cpu")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


@pytest.fixture(scope="session")
def mcore():
    """A single-rank megatron-core parallel state on CPU; yields the ParallelContext."""
    from bd3_megatron.parallel import state

    ctx = state.initialize(tp=1, pp=1, seed=1234, device="cpu")
    yield ctx
    state.shutdown()


@pytest.fixture(scope="session")
def data_cache(tmp_path_factory):
    """One packed-token cache for every test that builds the embedded corpus."""
    return str(tmp_path_factory.mktemp("data_cache"))

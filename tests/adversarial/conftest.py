"""Fixtures for the adversarial-server tests: one federation's silos, fresh nodes per test."""

from __future__ import annotations

import pytest
import torch

from tests.adversarial import server_play


@pytest.fixture(scope="session")
def fed(tmp_path_factory) -> server_play.Federation:
    """The federation's silos, written once; each test makes its own nodes and ledgers."""
    return server_play.build_federation(tmp_path_factory.mktemp("adversarial-federation"))


@pytest.fixture(autouse=True)
def fresh_process():
    """One torch thread (like a Ray actor with num_cpus=1) and no Node cached from an
    earlier test: every test's first message meets a freshly started node."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    server_play.restart_nodes()
    yield
    server_play.restart_nodes()
    torch.set_num_threads(before)

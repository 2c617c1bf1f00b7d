"""Fixtures for tests/train."""
import pytest


@pytest.fixture(scope="session")
def cache_dir(tmp_path_factory):
    return str(tmp_path_factory.mktemp("lowbit-cache"))

"""Fixtures shared by the spec / public-API tests in tests/ops.

`backend` runs a test against the reference backend (the spec) and against whatever backend
lowbit picks by default on CPU (the C++ one once it is built); the second is skipped while the
default is the reference itself, so nothing runs twice.
"""
import pytest

from lowbit import backends


def default_backend() -> str:
    return backends.resolve("quantize", "cpu")


@pytest.fixture(params=["ref", "default"])
def backend(request):
    if request.param == "ref":
        return "ref"
    name = default_backend()
    if name == "ref":
        pytest.skip("the default CPU backend is ref here (no native backend built)")
    return name

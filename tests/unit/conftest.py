"""The CPU kernel backends every kernel test runs on. The C++ extension builds on every
machine (setup.py), so a missing one fails the tests instead of skipping them."""
import pytest

from megatron_ext.ops import available_backends, set_backend

CPU_BACKENDS = ["cpp", "torch"]


@pytest.fixture(params=CPU_BACKENDS)
def backend(request):
    if request.param not in available_backends():
        pytest.fail(f"{request.param} backend is not built (available: {available_backends()}); "
                    "rebuild with `pip install --no-build-isolation -e .` and read its WARNING")
    previous = set_backend(request.param)
    yield request.param
    set_backend(previous)

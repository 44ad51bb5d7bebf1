import socket

import pytest
import torch

import fastkd
from fastkd import _extension


def pytest_collection_modifyitems(config, items):
    # CUDA tests are selected by marker and skipped where no GPU is visible (collection itself never
    # touches a device).
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU (marker 'cuda')")
    for item in items:
        # The marker itself: item.keywords also holds every folder name on the path (a checkout in a
        # folder named "cuda" would skip the whole suite).
        if item.get_closest_marker("cuda") is not None:
            item.add_marker(skip)


@pytest.fixture
def free_port() -> int:
    """A TCP port on the loopback interface that is free now (for gloo process groups in tests)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(params=sorted(_extension.cpu_kernel_tables()) or ["reference"])
def cpu_kernel(request):
    """Runs a test with each copy of the CPU kernels (AVX2 and AVX-512 here), then restores the one in use;
    "reference" where the extension is disabled or not built."""
    if request.param == "reference":
        yield request.param
        return
    with _extension.use_cpu_kernel(request.param):
        assert fastkd.kernel_info()["cpu"] == request.param
        yield request.param

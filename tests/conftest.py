"""Test-session settings."""

import os

# One BLAS thread: on a small shared CI machine (2 cores) OpenBLAS's own threads fight torch's
# and other processes, and ARPACK's SVD slows down 10-100x. Set before numpy loads it.
os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")

import pytest  # noqa: E402  (after the variable: numpy reads it on import)
import torch  # noqa: E402


@pytest.fixture(scope="module")
def one_thread():
    """One torch thread for a module of tiny matmuls: a second thread only adds synchronisation,
    which is erratic on small VMs. Modules opt in with `pytestmark = pytest.mark.usefixtures(...)`."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)

"""Test-session settings."""

import os

# One BLAS thread: on a small shared CI machine (2 cores) OpenBLAS's own threads fight torch's
# and other processes, and ARPACK's SVD slows down 10-100x. Set before numpy loads it.
os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")

import pytest  # noqa: E402  (after the variable: numpy reads it on import)
import torch  # noqa: E402

from rerec_mini.config import BUNDLED_DATA  # noqa: E402
from rerec_mini.data import load_dataset  # noqa: E402
from rerec_mini.model import build_tiny  # noqa: E402
from rerec_mini.run import dataset_texts  # noqa: E402


@pytest.fixture(scope="module")
def one_thread():
    """One torch thread for a module of tiny matmuls: a second thread only adds synchronisation,
    which is erratic on small VMs. Modules opt in with `pytestmark = pytest.mark.usefixtures(...)`."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="module")
def ds():
    """The bundled dataset (data/synth-movies)."""
    return load_dataset(BUNDLED_DATA)


@pytest.fixture(scope="module")
def micro_model(tmp_path_factory, ds):
    """A ~60k-parameter model + tokenizer trained on the bundled data: seconds per training run."""
    return str(build_tiny(tmp_path_factory.mktemp("micro") / "m", dataset_texts(ds), vocab_size=400, hidden_size=32,
                          num_layers=1, num_heads=2, num_kv_heads=1, intermediate_size=64))

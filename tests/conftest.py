"""Suite-wide test settings (the only conftest at the root of tests/; there are no __init__.py)."""

import os
import zlib

import pytest
import torch

# The CI and developer machines have 2 cores: more intra-op threads than cores only thrash.
# WALSH_TEST_THREADS overrides (e.g. on a bigger box).
torch.set_num_threads(int(os.environ.get("WALSH_TEST_THREADS", min(2, os.cpu_count() or 1))))

# Without a GPU the Triton kernels (walsh.kernels) run in Triton's interpreter on CPU tensors.
# It must be set before triton.jit decorates them, i.e. before any walsh.kernels import.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Skip tests marked `gpu` when CUDA is unavailable."""
    if torch.cuda.is_available():
        return
    skip_gpu = pytest.mark.skip(reason="needs CUDA (torch.cuda.is_available() is False)")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip_gpu)


@pytest.fixture
def seed() -> int:
    """A fresh random seed for the global RNG, returned so that a failure message can name it
    (the kernel tests draw new inputs every run)."""
    s = int.from_bytes(os.urandom(4), "little")
    torch.manual_seed(s)
    return s


@pytest.fixture
def gen(request: pytest.FixtureRequest) -> torch.Generator:
    """Seeds the global RNG (layer init) and returns a generator, both from the test id, so
    every test draws fresh inputs that are still reproducible by name."""
    seed = zlib.crc32(request.node.nodeid.encode())
    torch.manual_seed(seed)
    return torch.Generator().manual_seed(seed + 1)


@pytest.fixture(scope="session")
def data_dir(tmp_path_factory: pytest.TempPathFactory):
    """The staged pattern dataset (``_helpers.stage_pattern``) that the trainer, Ray launcher and
    tracking tests train on; tests only read it."""
    from _helpers import stage_pattern

    return stage_pattern(tmp_path_factory.mktemp("data"))


@pytest.fixture(autouse=True)
def _tf32_as_it_was():
    """Each test leaves TF32 matmuls as it found them. A test that runs a CLI in-process
    (``walsh bench layer``, ``walsh bench train`` on CUDA) turns TF32 on for the process, and
    every later fp32 comparison against a cuBLAS reference then sees TF32's rounding (session
    26, ``pytest -m gpu tests/pipeline tests/walsh``: 12 full-shape Walsh layer tests failed at
    relative errors of ~3e-4 against their 1e-5 bound; in the order walsh-first they pass)."""
    allow = torch.backends.cuda.matmul.allow_tf32
    yield
    torch.backends.cuda.matmul.allow_tf32 = allow

"""Shared test fixtures. Real data is read from the shared folder (`../shared/data` beside the
checkout, or `$CXR_TEST_DATA`); tests never touch the network."""
from __future__ import annotations

import os
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SHARED = Path(os.environ.get("CXR_TEST_DATA", ROOT.parent / "shared" / "data"))

# Set before any fixture runs (session fixtures such as `tiny_run` too): the shared folder is the
# data cache, and nothing is fetched.
os.environ["CXR_DATA_DIR"] = str(SHARED)
os.environ["CXR_OFFLINE"] = "1"


@pytest.fixture(scope="session")
def shared_data() -> Path:
    if not (SHARED / "openi" / "NLMCXR_reports.tgz").exists():
        pytest.skip(f"shared data not found at {SHARED} (set CXR_TEST_DATA)")
    return SHARED


@pytest.fixture(autouse=True)
def _offline_cache(monkeypatch, tmp_path_factory):
    """Every test sees the shared folder as its data cache and cannot fetch from the network."""
    monkeypatch.setenv("CXR_DATA_DIR", str(SHARED))
    monkeypatch.setenv("CXR_OFFLINE", "1")


def nih_film(n: int = 0, shape: tuple[int, int] | None = None):
    """The n-th real NIH film of the shared fixture, float32 (H, W) in [0, 1], resized to `shape`:
    where a test needs some chest film, a real one, since the quality gate in front of every
    read refuses drawings that are no radiograph."""
    from cxr.images import load_image, resize

    films = sorted((SHARED / "nih" / "bbox256" / "images").glob("*.png"))
    if not films:
        pytest.skip(f"NIH films not found under {SHARED}")
    film = load_image(films[n % len(films)])
    return resize(film, shape) if shape else film


def needs_in_ci(available: bool, what: str) -> None:
    """Skip when a system component (browser, PostgreSQL) is missing locally, but fail in CI,
    where `.ci/run` installs it: a green CI must mean the test ran."""
    if available:
        return
    if os.environ.get("CI"):
        pytest.fail(f"{what} is required in CI but was not found")
    pytest.skip(f"{what} not available")


@pytest.fixture(scope="session")
def tiny_run(tmp_path_factory) -> Path:
    """A real, tiny trained cascade (phantom images, a few steps), shared by the tests that need a
    Reader: see `cxr.testing.make_tiny_run`."""
    if not (SHARED / "phantom" / "chest_ct.nii.gz").exists():
        pytest.skip(f"phantom CT not found under {SHARED}")
    from cxr.testing import make_tiny_run

    return make_tiny_run(tmp_path_factory.mktemp("tiny_run"))


@pytest.fixture(scope="module")
def one_torch_thread():
    """Tiny tensors: a second intra-op thread only adds waiting on a shared, busy machine."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)

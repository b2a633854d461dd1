"""Shared test fixtures, and the rules every test runs under.

Data. The public files are read from `$CXR_TEST_DATA`, else `../shared/data` beside the checkout;
where neither holds them, from the user's data cache (`$CXR_DATA_DIR` or ~/.cache/cxr), into which
the files with a public home are fetched once, by cxr's own fetch code (what `cxr fetch` does),
the first time a test needs them. Only what has no public home cxr can fetch (the sample of real
NIH radiographs) skips, and the run ends with one line saying what skipped and why. Under
`CI=true` nothing may skip: a skip is reported as a failure.

Network. A test may connect to loopback addresses only (a guard on `socket.connect` in this
process); the one-time fetch is the single exception. Every test has a timeout (pytest-timeout,
set in pyproject.toml).
"""
from __future__ import annotations

import contextlib
import ipaddress
import os
import socket
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
IN_CI = os.environ.get("CI", "").strip().lower() not in ("", "0", "false", "no")


def _data_root() -> Path:
    given = os.environ.get("CXR_TEST_DATA")
    shared = Path(given).expanduser() if given else ROOT.parent / "shared" / "data"
    if (shared / "openi" / "NLMCXR_reports.tgz").is_file():
        return shared
    cache = os.environ.get("CXR_DATA_DIR")
    return Path(cache).expanduser() if cache else Path.home() / ".cache" / "cxr"


SHARED = _data_root()
NIH_SAMPLE = SHARED / "nih" / "bbox256"
NO_NIH_SAMPLE = (f"the 656 real NIH radiographs with expert boxes are not in {SHARED}/nih/bbox256 "
                 "and have no public home cxr can fetch (set CXR_TEST_DATA to a folder holding them)")

# Set before any fixture runs (session fixtures such as `tiny_run` too): the data root is the
# data cache, and nothing is downloaded except by `_ensure` below.
os.environ["CXR_DATA_DIR"] = str(SHARED)
os.environ["CXR_OFFLINE"] = "1"


# ---------------------------------------------------------------- loopback-only networking

_real_connect = socket.socket.connect
_real_connect_ex = socket.socket.connect_ex
_network_allowed = False


def _is_local(sock: socket.socket, address) -> bool:
    if sock.family not in (socket.AF_INET, socket.AF_INET6):
        return True  # Unix sockets, socketpairs
    host = str(address[0]).split("%")[0]
    if host in ("localhost", "", "0.0.0.0", "::"):
        return True
    try:
        ip = ipaddress.ip_address(host)
    except ValueError:
        return False  # a host name other than localhost
    mapped = getattr(ip, "ipv4_mapped", None)
    return ip.is_loopback or (mapped is not None and mapped.is_loopback)


def _guarded(real):
    def connect(sock, address):
        if not _network_allowed and not _is_local(sock, address):
            raise ConnectionRefusedError(f"tests may connect to loopback only, not {address!r} "
                                         "(tests/conftest.py)")
        return real(sock, address)
    return connect


socket.socket.connect = _guarded(_real_connect)
socket.socket.connect_ex = _guarded(_real_connect_ex)


@contextlib.contextmanager
def _network():
    """The one place tests may reach the internet: the one-time fetch of public data."""
    global _network_allowed
    before, offline = _network_allowed, os.environ.pop("CXR_OFFLINE", None)
    _network_allowed = True
    try:
        yield
    finally:
        _network_allowed = before
        if offline is not None:
            os.environ["CXR_OFFLINE"] = offline


# ---------------------------------------------------------------- skips: one line, none in CI

def skip_or_fail(reason: str) -> None:
    """Skip locally; under CI=true a missing piece is a failure, so a green CI means it ran."""
    if IN_CI:
        pytest.fail(f"{reason} (CI=true: nothing may skip)")
    pytest.skip(reason)


def needs_in_ci(available: bool, what: str) -> None:
    """Skip when a system component (browser, PostgreSQL) is missing locally, but fail in CI,
    where `.ci/run` installs it."""
    if not available:
        skip_or_fail(f"{what} not available")


def _reason(report) -> str:
    text = report.longrepr[2] if isinstance(report.longrepr, tuple) else str(report.longrepr)
    return text.removeprefix("Skipped: ")


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    """Under CI=true any skip (importorskip, a skip marker) fails the test instead."""
    outcome = yield
    report = outcome.get_result()
    if IN_CI and report.skipped and not hasattr(report, "wasxfail"):
        reason = _reason(report)
        report.outcome = "failed"
        report.longrepr = f"skipped under CI=true, where nothing may skip: {reason}"


def pytest_terminal_summary(terminalreporter):
    """One line: how many tests skipped, grouped by reason."""
    skipped = terminalreporter.stats.get("skipped", [])
    if not skipped:
        return
    reasons: dict[str, int] = {}
    for report in skipped:
        reason = _reason(report)
        reasons[reason] = reasons.get(reason, 0) + 1
    terminalreporter.write_line(f"skipped {len(skipped)}: " + "; ".join(
        f"{n} because {reason}" for reason, n in sorted(reasons.items(), key=lambda kv: -kv[1])))


# ---------------------------------------------------------------- public data

_failed: dict[str, str] = {}


def _ensure(*groups: str) -> Path:
    """The data root, holding the files of `groups` (`cxr fetch` names); missing ones are fetched
    into it once per machine. A file that cannot be fetched skips (fails in CI) every test that
    needs it, with the reason."""
    from cxr.errors import CxrError
    from cxr.fetch import expand, fetch_file

    for known in expand(list(groups)):
        if (SHARED / known.key).is_file() or known.key in _failed:
            continue
        with _network():
            try:
                fetch_file(known)
            except CxrError as exc:
                # "could not fetch KEY; SOURCE: PROBLEM. Offline or ...": keep the last PROBLEM
                _failed[known.key] = exc.problem.split(". Offline")[0].split("; ")[-1].split(": ", 1)[-1]
            except OSError as exc:  # a read-only data folder given as $CXR_TEST_DATA, a full disk
                _failed[known.key] = f"cannot write into {SHARED} ({exc.strerror or exc})"
    failed = [f.key for f in expand(list(groups)) if f.key in _failed]
    if failed:
        skip_or_fail(f"{', '.join(failed)} not fetched: {_failed[failed[0]]}")
    return SHARED


@pytest.fixture(autouse=True)
def _data_cache(monkeypatch):
    """Every test starts with the data root as its data cache and downloads forbidden."""
    monkeypatch.setenv("CXR_DATA_DIR", str(SHARED))
    monkeypatch.setenv("CXR_OFFLINE", "1")


@pytest.fixture(scope="session")
def shared_data() -> Path:
    """The data root with the Open-i reports and metadata, the NIH tables and the phantom CT."""
    return _ensure("openi", "nih", "phantom")


@pytest.fixture(scope="session")
def all_data() -> Path:
    """The data root with every file `cxr fetch` knows (Shin et al.'s released labels too)."""
    return _ensure("all")


@pytest.fixture(scope="session")
def nih_sample() -> Path:
    """The 656 real NIH radiographs (bbox256/: images/ and their label and box tables)."""
    if not (NIH_SAMPLE / "images").is_dir():
        skip_or_fail(NO_NIH_SAMPLE)
    return NIH_SAMPLE


@pytest.fixture(scope="session")
def radiographs(tmp_path_factory) -> list[Path]:
    """64 chest radiograph PNGs for the archive, service and web tests: real NIH images where the
    sample is present, else phantom radiographs simulated here (the same kind of input)."""
    if (NIH_SAMPLE / "images").is_dir():
        return sorted((NIH_SAMPLE / "images").glob("*.png"))[:64]
    _ensure("openi", "phantom")
    from cxr.phantom.simulate import simulate

    out = simulate(tmp_path_factory.mktemp("radiographs"), n=64, size=256, seed=3, workers=1,
                   progress=False)
    return sorted((Path(out) / "images").glob("*.png"))


@pytest.fixture(scope="session")
def tiny_run(tmp_path_factory) -> Path:
    """A real, tiny trained cascade (phantom images, a few steps), shared by the tests that need a
    Reader: see `cxr.testing.make_tiny_run`."""
    _ensure("openi", "phantom")
    from cxr.testing import make_tiny_run

    return make_tiny_run(tmp_path_factory.mktemp("tiny_run"), phantom=True)


@pytest.fixture(scope="module")
def one_torch_thread():
    """Tiny tensors: a second intra-op thread only adds waiting on a shared, busy machine."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def view_noting_reader(run_dir, gate=False):
    """The real Reader of `run_dir` (on the CPU, `gate` as Reader takes it) that only notes, per
    batch, the views that reach its whole-organ rule (`reader.seen`: one list per batch)."""
    from cxr.checkpoint import load_run
    from cxr.reader import Reader

    class Reading(Reader):
        def _whole_organs(self, images, results, views=None, organs=None):
            self.seen.append(list(views) if views is not None else None)
            return super()._whole_organs(images, results, views, organs)

    spec, tensors = load_run(run_dir)
    reader = Reading(spec, tensors, "cpu", gate=gate)
    reader.seen = []
    return reader


def chest_film(n: int = 0, shape: tuple[int, int] | None = None):
    """A chest film, float32 (H, W) in [0, 1], resized to `shape`: the n-th real NIH radiograph
    where the sample is present, else a phantom radiograph (seed n). For tests that need some
    chest film: the quality gate in front of every read refuses drawings that are no radiograph."""
    from cxr.images import load_image, resize

    films = sorted((NIH_SAMPLE / "images").glob("*.png"))
    if films:
        film = load_image(films[n % len(films)])
    else:
        _ensure("openi", "phantom")
        from cxr.phantom.render import Phantom

        film = Phantom.load().render([], seed=n, size=128).image
    return resize(film, shape) if shape else film

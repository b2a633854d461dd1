"""Load test of `POST /annotate`: N concurrent clients on loopback for a fixed time, against the
Reader called in-process on the same images in the same run (the baseline).

The server runs as a real `cxr serve` subprocess, so the clients (one asyncio loop here) do not
share a GIL with it. Every loop is bounded by a deadline and stops by itself.

    from cxr.service.loadtest import load_test
    figures = load_test("runs/openi", images, seconds=60, clients=8)
"""
from __future__ import annotations

import asyncio
import os
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np


def _percentiles(seconds: list[float]) -> dict:
    if not seconds:
        return {"p50_ms": None, "p95_ms": None, "max_ms": None}
    ms = np.asarray(seconds) * 1000
    return {"p50_ms": float(np.percentile(ms, 50)), "p95_ms": float(np.percentile(ms, 95)),
            "max_ms": float(ms.max())}


def reader_baseline(run: str | Path, images: list[Path], seconds: float, batch: int = 8,
                    device: str | None = None, threads: int | None = None) -> dict:
    """The Reader in-process on the same files: one image per call (what one request costs with
    no HTTP) and `batch` images per call (the best throughput the model allows); each for
    `seconds`, decode included, as the service does it; with the service's torch `threads`."""
    import torch

    from ..images import read_image
    from ..reader import Reader

    before = torch.get_num_threads()
    if threads:
        torch.set_num_threads(threads)
    try:
        return _baseline(Reader.load(run, device=device), images, seconds, batch, read_image)
    finally:
        torch.set_num_threads(before)


def _baseline(reader, images, seconds, batch, read_image) -> dict:
    data = [p.read_bytes() for p in images]
    reader([read_image(images[0]).pixels])  # warm-up

    def one_pass(k: int, n: int):
        from .app import decode_upload

        pixels = [decode_upload(data[(k + j) % len(data)], images[(k + j) % len(data)].name).pixels
                  for j in range(n)]
        return reader(pixels, heatmaps=False, batch_size=n)

    out = {}
    for name, n in (("single", 1), (f"batch_{batch}", batch)):
        times, k = [], 0
        deadline = time.perf_counter() + seconds
        while time.perf_counter() < deadline:
            t0 = time.perf_counter()
            one_pass(k, n)
            times.append(time.perf_counter() - t0)
            k += n
        total = sum(times)
        out[name] = {"images_per_s": k / total if total else 0.0, "calls": len(times),
                     **_percentiles(times)}
    out["model_id"] = reader.model_id
    return out


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(run: str | Path, db_url: str, port: int, max_batch: int | None = None,
                 batch_wait_ms: float | None = None, timeout: float = 300.0,
                 device: str | None = None, threads: int | None = None,
                 log=None, cwd: Path | None = None, env: dict | None = None) -> subprocess.Popen:
    """`cxr serve` in a subprocess; returns once /health answers (or raises, with the tail of
    `log`, a file the caller opened for writing, where the server's output then goes). Batching
    left out: the server's defaults."""
    import httpx

    cmd = [sys.executable, "-m", "cxr.cli", "serve", str(run), "--db", db_url, "--port", str(port),
           "--log-level", "warning"]
    if max_batch is not None:
        cmd += ["--max-batch", str(max_batch)]
    if batch_wait_ms is not None:
        cmd += ["--batch-wait-ms", str(batch_wait_ms)]
    if device:
        cmd += ["--device", device]
    if threads:
        cmd += ["--threads", str(threads)]
    proc = subprocess.Popen(cmd, stdout=log or subprocess.DEVNULL,
                            stderr=subprocess.STDOUT if log else None, cwd=cwd, env=env)

    def tail() -> str:
        return f": {Path(log.name).read_text(errors='replace')[-2000:]}" if log else ""

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"cxr serve exited with status {proc.returncode}{tail()}")
        try:
            if httpx.get(f"http://127.0.0.1:{port}/health", timeout=2).status_code == 200:
                return proc
        except httpx.HTTPError:
            pass
        time.sleep(0.2)
    proc.terminate()
    raise TimeoutError(f"cxr serve did not answer within {timeout:g} s{tail()}")


def stop_process(proc: subprocess.Popen, timeout: float = 30) -> int | None:
    """Stop a server process started here (or by a test): SIGTERM, then SIGKILL after `timeout`
    seconds; returns its exit code (None: there was no process)."""
    if proc is None:
        return None
    if proc.poll() is not None:
        return proc.returncode
    proc.terminate()
    try:
        return proc.wait(timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        return proc.wait()


async def _clients(base: str, images: list[Path], seconds: float, clients: int,
                   params: dict) -> tuple[list[float], int, list[str], float]:
    import httpx

    data = [(p.name, p.read_bytes()) for p in images]
    latencies: list[float] = []
    errors: list[str] = []
    limits = httpx.Limits(max_connections=clients, max_keepalive_connections=clients)
    async with httpx.AsyncClient(base_url=base, timeout=60, limits=limits) as client:
        start = time.perf_counter()
        deadline = start + seconds

        async def worker(w: int):
            k = w
            while time.perf_counter() < deadline:
                name, body = data[k % len(data)]
                k += clients
                t0 = time.perf_counter()
                try:
                    r = await client.post("/annotate", params=params, files={"file": (name, body)})
                    if r.status_code != 200:
                        errors.append(f"{r.status_code}: {r.text[:200]}")
                        continue
                    r.json()
                except Exception as exc:  # counted, never fatal: the figure must show it
                    errors.append(repr(exc)[:200])
                    continue
                latencies.append(time.perf_counter() - t0)

        await asyncio.gather(*(worker(w) for w in range(clients)))
        elapsed = time.perf_counter() - start
    return latencies, len(latencies), errors, elapsed


def load_test(run: str | Path, images: list[Path], seconds: float = 60, clients: int = 8, *,
              heatmap: bool = False, max_batch: int = 16, batch_wait_ms: float = 5.0,
              baseline_seconds: float | None = None, device: str | None = None,
              threads: int | None = None) -> dict:
    """Requests/s, latency percentiles and errors of POST /annotate under `clients` concurrent
    clients for `seconds`, and the in-process Reader baseline on the same images."""
    import httpx

    images = [Path(p) for p in images]
    if not images:
        raise ValueError("load_test needs at least one image")
    baseline = reader_baseline(run, images, baseline_seconds or max(3.0, seconds / 4), device=device,
                               threads=threads)
    with tempfile.TemporaryDirectory(prefix="cxr-loadtest-") as tmp:
        port = _free_port()
        proc = start_server(run, f"sqlite:///{Path(tmp) / 'archive.db'}", port, max_batch,
                            batch_wait_ms, device=device, threads=threads)
        base = f"http://127.0.0.1:{port}"
        try:
            params = {"heatmap": "true"} if heatmap else {}
            for p in images[:2]:  # warm-up
                httpx.post(f"{base}/annotate", files={"file": (p.name, p.read_bytes())}, timeout=60)
            before = httpx.get(f"{base}/health", timeout=10).json()["batching"]
            latencies, ok, errors, elapsed = asyncio.run(
                _clients(base, images, seconds, clients, params))
            after = httpx.get(f"{base}/health", timeout=10).json()["batching"]
        finally:
            stop_process(proc, 30)
    batches = after["batches"] - before["batches"]
    items = after["items"] - before["items"]
    rps = ok / elapsed if elapsed else 0.0
    return {
        "clients": clients, "seconds": round(elapsed, 2), "images": len(images), "heatmap": heatmap,
        "max_batch": max_batch, "batch_wait_ms": batch_wait_ms,
        "requests_ok": ok, "errors": len(errors), "first_errors": errors[:5],
        "requests_per_s": rps, "latency": _percentiles(latencies),
        "server_mean_batch": items / batches if batches else 0.0,
        "baseline": baseline,
        "service_vs_reader_single": rps / baseline["single"]["images_per_s"],
        "service_vs_reader_batched": rps / baseline["batch_8"]["images_per_s"],
        "cpus": os.cpu_count(), "torch_threads": threads or "default",
    }


def table(fig: dict) -> str:
    """The figures as a small markdown table."""
    b = fig["baseline"]
    rows = [
        ("Reader in-process, 1 image/call (baseline)", b["single"]["images_per_s"],
         b["single"]["p50_ms"], b["single"]["p95_ms"], 0),
        ("Reader in-process, 8 images/call", b["batch_8"]["images_per_s"],
         b["batch_8"]["p50_ms"], b["batch_8"]["p95_ms"], 0),
        (f"POST /annotate, {fig['clients']} clients, {fig['seconds']:.0f} s", fig["requests_per_s"],
         fig["latency"]["p50_ms"], fig["latency"]["p95_ms"], fig["errors"]),
    ]
    lines = ["| | images or requests/s | p50 ms | p95 ms | errors |", "|---|---:|---:|---:|---:|"]
    for name, rate, p50, p95, err in rows:
        lines.append(f"| {name} | {rate:.1f} | {p50:.1f} | {p95:.1f} | {err} |")
    lines.append(f"\nservice / Reader (1 image per call): {fig['service_vs_reader_single']:.2f}; "
                 f"service / Reader (8 per call): {fig['service_vs_reader_batched']:.2f}; "
                 f"mean server batch {fig['server_mean_batch']:.2f}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    import argparse

    parser = argparse.ArgumentParser(description="load-test POST /annotate of cxr serve")
    parser.add_argument("run", type=Path)
    parser.add_argument("images", type=Path, nargs="+", help="image files (or one folder)")
    parser.add_argument("--duration", type=float, default=60)
    parser.add_argument("--clients", type=int, default=8)
    parser.add_argument("--heatmap", action="store_true")
    parser.add_argument("--device", default=None)
    parser.add_argument("--threads", type=int, default=None, help="torch threads, both sides")
    args = parser.parse_args(argv)
    images = args.images
    if len(images) == 1 and images[0].is_dir():
        from ..archive.index import iter_inputs

        images = [Path(p) for p in iter_inputs(images[0])][:64]
    fig = load_test(args.run, images, args.duration, args.clients, heatmap=args.heatmap,
                    device=args.device, threads=args.threads)
    print(table(fig))
    return 0 if fig["errors"] == 0 else 1


if __name__ == "__main__":
    sys.exit(main())

"""Phantom rendering speed: images/s at 256 and 512, in 1 and 2 processes, memory peak, against a
baseline measured in the same run (the plain full-volume numpy projection a naive renderer would
do per image: sum the 512x512x133 attenuation volume along anterior-posterior, resize; no pose,
findings, noise or processing).

Both sides do their one-time work before timing and report it separately: the phantom its
precomputation (or cache load), the baseline reading the CT and converting HU to attenuation
once. Per image, each then does only its own work.

    python benchmarks/phantom.py --json OUT.json [--n 200] [--sizes 256 512] [--procs 1 2]

The case mix is that of a simulated data set: about 40 % normal, the rest one or two findings of
random kind, side and severity. The phantom's precomputation is done (or read from its cache)
before timing and reported separately.
"""
from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import platform
import resource
import sys
import time
import tracemalloc
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from cxr.phantom.spec import KINDS, FindingSpec  # noqa: E402

SIDES = ("left", "right", "bilateral")
SEVERITIES = ("mild", "moderate", "severe", "small", "large")
SITES = ("upper lobe", "lower lobe", "middle lobe", "base", "lingula", None)


def case_mix(n: int, seed: int = 0) -> list[tuple[int, list[FindingSpec]]]:
    rng = np.random.default_rng(seed)
    kinds = sorted(KINDS)
    cases = []
    for i in range(n):
        findings = []
        if rng.random() > 0.4:
            for k in rng.choice(kinds, size=int(rng.integers(1, 3)), replace=False):
                findings.append(FindingSpec(str(k), side=str(rng.choice(SIDES)),
                                            site=rng.choice(SITES), severity=str(rng.choice(SEVERITIES)),
                                            size_mm=float(rng.uniform(4, 40)) if k in ("nodule", "mass", "granuloma") else None))
        cases.append((1000 + i, findings))
    return cases


_PH = None


def _init(sizes):
    global _PH
    import torch

    torch.set_num_threads(1)
    from cxr.phantom.render import Phantom

    _PH = Phantom.load()
    for s in sizes:
        _PH.render([], seed=0, size=s)


def _render(job):
    seed, findings, size = job
    r = _PH.render(findings, seed=seed, size=size)
    return float(r.image.mean())


def rate_single(cases, size) -> tuple[float, float]:
    """(images/s by the wall clock, CPU ms per image: what one core costs, whatever else runs)."""
    for seed, f in cases[:3]:
        _PH.render(f, seed=seed, size=size)
    t, c = time.perf_counter(), time.process_time()
    for seed, f in cases:
        _PH.render(f, seed=seed, size=size)
    return len(cases) / (time.perf_counter() - t), 1000 * (time.process_time() - c) / len(cases)


def rate_pool(cases, size, procs) -> float:
    ctx = mp.get_context("fork" if sys.platform.startswith("linux") else "spawn")
    with ctx.Pool(procs, initializer=_init, initargs=([size],)) as pool:
        pool.map(_render, [(s, f, size) for s, f in cases[:2 * procs]], chunksize=1)  # warm
        t = time.perf_counter()
        pool.map(_render, [(s, f, size) for s, f in cases], chunksize=4)
        return len(cases) / (time.perf_counter() - t)


_MU = None


def baseline_precompute() -> np.ndarray:
    """The baseline's one-time work: read the CT, HU -> linear attenuation (kept for every image)."""
    global _MU
    if _MU is None:
        import nibabel as nib

        from cxr.phantom.ct import MU_WATER, locate_file

        hu = np.asarray(nib.load(str(locate_file("ct"))).dataobj, dtype=np.float32)
        _MU = np.maximum(0.0, 1.0 + hu / 1000.0) * MU_WATER
    return _MU


def baseline_rate(size: int, n: int = 3, pose: bool = False) -> float:
    """Naive renderer: the full attenuation volume projected per image (numpy), then resized. With
    `pose`, the volume is first rotated by a few degrees (scipy affine_transform, trilinear), which
    is what a naive renderer needs for pose variation."""
    from scipy import ndimage

    volume = baseline_precompute()
    t = time.perf_counter()
    for i in range(n):
        mu = volume
        if pose:
            a = np.radians(3.0 + i)
            rot = np.array([[np.cos(a), -np.sin(a), 0], [np.sin(a), np.cos(a), 0], [0, 0, 1]])
            centre = np.array(mu.shape) / 2
            mu = ndimage.affine_transform(mu, rot, offset=centre - rot @ centre, order=1)
        proj = mu.sum(axis=1).T[::-1] * 0.703
        img = ndimage.zoom(proj, (size / proj.shape[0], size / proj.shape[1]), order=1)
        img = (img - img.min()) / (np.ptp(img) + 1e-6)
    return n / (time.perf_counter() - t)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--json", type=Path, help="write the results here")
    ap.add_argument("--n", type=int, default=200, help="images per measurement at 256 (512: n/2)")
    ap.add_argument("--sizes", type=int, nargs="+", default=[256, 512])
    ap.add_argument("--procs", type=int, nargs="+", default=[1, 2])
    args = ap.parse_args(argv)

    import torch

    torch.set_num_threads(1)
    load0 = list(os.getloadavg())
    t = time.perf_counter()
    _init(args.sizes)
    prep_s = time.perf_counter() - t
    rows = []
    rates = {}
    for size in args.sizes:
        n = args.n if size <= 256 else max(10, args.n // 2)
        cases = case_mix(n)
        for procs in args.procs:
            if procs == 1:
                rates[(size, procs)] = rate_single(cases, size)
            else:
                rates[(size, procs)] = (rate_pool(cases, size, procs), None)
    t = time.perf_counter()
    baseline_precompute()
    baseline_prep_s = time.perf_counter() - t
    tracemalloc.start()
    for seed, f in case_mix(5, seed=1):
        _PH.render(f, seed=seed, size=max(args.sizes))
    _, traced = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    rss_render = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    rss_workers = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024
    for size in args.sizes:
        n = args.n if size <= 256 else max(10, args.n // 2)
        cases = case_mix(n)
        base = baseline_rate(size)
        base_pose = baseline_rate(size, n=1, pose=True)
        for procs in args.procs:
            rate, cpu_ms = rates[(size, procs)]
            rows.append({"size": size, "processes": procs, "images": n,
                         "images_per_s": round(rate, 2), "ms_per_image": round(1000 / rate, 2),
                         "cpu_ms_per_image": None if cpu_ms is None else round(cpu_ms, 1),
                         "baseline_images_per_s": round(base, 3),
                         "speedup_vs_baseline": round(rate / base, 1),
                         "baseline_with_pose_images_per_s": round(base_pose, 4),
                         "speedup_vs_baseline_with_pose": round(rate / base_pose, 1)})
    out = {
        "benchmark": "phantom rendering",
        "machine": {"cpus": os.cpu_count(), "platform": platform.platform(),
                    "loadavg_at_start": load0, "loadavg_at_end": list(os.getloadavg())},
        "note": "wall-clock rates depend on what else runs; cpu_ms_per_image is one core's cost",
        "precompute_or_cache_load_s": round(prep_s, 2),
        "baseline_precompute_s": round(baseline_prep_s, 2),
        "baseline": "full 512x512x133 attenuation volume (HU->mu once, before timing): sum along AP, "
                    "resize (numpy/scipy), per image; with_pose: the volume also rotated 3-4 degrees "
                    "(scipy affine_transform)",
        "results": rows,
        "memory": {"peak_rss_renderer_process_mib": round(rss_render, 1),
                   "peak_rss_worker_mib": round(rss_workers, 1),
                   "peak_rss_incl_baseline_full_ct_mib": round(
                       resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
                   f"python_alloc_peak_per_render_{max(args.sizes)}_mib": round(traced / 2 ** 20, 1)},
    }
    print(f"{'size':>5} {'procs':>5} {'images/s':>9} {'ms/img':>8} {'cpu ms/img':>10} "
          f"{'baseline/s':>11} {'speed-up':>9} {'pose-bl/s':>10} {'speed-up':>9}")
    for r in rows:
        cpu = "" if r["cpu_ms_per_image"] is None else f"{r['cpu_ms_per_image']:.1f}"
        print(f"{r['size']:>5} {r['processes']:>5} {r['images_per_s']:>9.1f} {r['ms_per_image']:>8.1f} {cpu:>10} "
              f"{r['baseline_images_per_s']:>11.2f} {r['speedup_vs_baseline']:>8.1f}x "
              f"{r['baseline_with_pose_images_per_s']:>10.3f} {r['speedup_vs_baseline_with_pose']:>8.0f}x")
    print(f"precompute/cache load {prep_s:.1f} s (baseline's HU->mu {baseline_prep_s:.1f} s); memory {out['memory']}; "
          f"load average {out['machine']['loadavg_at_end']}")
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(out, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())

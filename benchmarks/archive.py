"""Archive benchmarks: indexing throughput, structured-query and similar-image latency.

1. Indexing: `cxr index` (hash, read, Reader, SQLite writes, vector index) on N simulated
   images, against the Reader alone on the same images (read + model, no hashing, no database) in
   the same run: the ratio is the archive's overhead.
2. Queries at 100,000 and 1,000,000 synthetic rows (bulk-inserted into the real schema; findings,
   sides, sites and severities drawn like Open-i's, clustered embeddings): p50/p95 of
   `Archive.search` (end to end: SQL + loading the hits, 20 per page) and of similar-image search
   with the usearch HNSW index against exact brute-force numpy (the baseline), with recall@10.
   `--reports`: every row also gets a report (text written from its findings plus normal
   sentences, some findings left out and some added, so report and model disagree) and its mined
   findings: p50/p95 of report full-text search (SQLite FTS5) and disagreement queries beside the
   structured queries on the same archive (`--no-similar` skips the HNSW part).
3. Service under load (`--service [--duration 60]`): POST /annotate with 8 concurrent clients
   against the in-process Reader (see `bench_service_load`).

    python benchmarks/archive.py [--run RUN] [--images 1000] [--rows 100000 1000000]
                                 [--dim 128] [--json OUT]
    python benchmarks/archive.py --skip-indexing --rows 100000 --reports --no-similar \
                                 --json benchmarks/results/archive_reports.json
"""
from __future__ import annotations

import argparse
import json
import platform
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from cxr.archive.db import Archive  # noqa: E402
from cxr.archive.vectors import VectorIndex, VectorState, brute_force, normalise  # noqa: E402
from cxr.metrics import markdown_table  # noqa: E402

MODEL = "bench-synthetic"
# (disease, organ, sites it appears at, severities) roughly as Open-i's MeSH terms use them
DISEASES = [
    ("Opacity", "lung", ["base", "upper lobe", "lower lobe", "middle lobe", "hilum"], ["mild", "moderate", "severe"]),
    ("Cardiomegaly", "heart", [], ["mild", "moderate", "severe"]),
    ("Pleural Effusion", None, ["base"], ["small", "moderate", "large"]),
    ("Pulmonary Atelectasis", "lung", ["base", "lingula", "middle lobe"], ["mild"]),
    ("Calcified Granuloma", "lung", ["upper lobe", "lower lobe", "hilum"], ["small"]),
    ("Nodule", "lung", ["upper lobe", "lower lobe", "base"], ["small"]),
    ("Airspace Disease", "lung", ["base", "upper lobe"], ["mild", "moderate"]),
    ("Consolidation", "lung", ["base", "lower lobe"], ["mild", "severe"]),
    ("Pneumothorax", None, ["apex"], ["small", "large"]),
    ("Mass", "lung", ["upper lobe", "hilum"], ["large"]),
    ("Emphysema", "lung", [], ["mild", "severe"]),
    ("Lung/hypoinflation", "lung", [], ["mild"]),
    ("Thoracic Vertebrae/degenerative", None, [], ["mild"]),
    ("Catheters, Indwelling", None, [], []),
]
SIDES = ["left", "right", "bilateral", None]


def percentiles(times: list[float]) -> dict:
    ms = np.asarray(times) * 1000
    return {"p50_ms": float(np.percentile(ms, 50)), "p95_ms": float(np.percentile(ms, 95)),
            "n": len(times)}


def timed(fn, repeats: int) -> tuple[dict, object]:
    fn()  # warm caches, as a long-running service would be
    times, out = [], None
    for _ in range(repeats):
        t0 = time.perf_counter()
        out = fn()
        times.append(time.perf_counter() - t0)
    return percentiles(times), out


# -- 1. indexing throughput --------------------------------------------------------------------
def simulated_images(out: Path, n: int, size: int, kind: str = "phantom") -> Path:
    """N simulated radiographs: the CT phantom (when it runs here), or the numpy chest drawings
    of `cxr.testing.synthetic_studies` (much faster to make; the Reader's cost is the same)."""
    if kind == "synthetic":
        from cxr.testing import synthetic_studies

        synthetic_studies(out, n=n, size=size)
        return out
    try:
        from cxr.phantom.simulate import simulate

        return simulate(out, n=n, size=size, seed=0, workers=1, progress=False)
    except Exception as exc:  # no CT in the cache, or the phantom cannot run here
        print(f"phantom unavailable ({exc}); using synthetic drawings", file=sys.stderr)
        from cxr.testing import synthetic_studies

        synthetic_studies(out, n=n, size=size)
        return out


def bench_indexing(run: Path, n_images: int, size: int, batch_size: int, work: Path,
                   kind: str = "phantom") -> dict:
    from cxr.archive.index import batched, index_images, iter_inputs
    from cxr.images import read_image
    from cxr.reader import Reader

    folder = simulated_images(work / "images", n_images, size, kind)
    paths = list(iter_inputs(folder))
    # the quality gate runs as in `cxr index`, except on the numpy drawings, which it would refuse
    reader = Reader.load(run, gate=kind != "synthetic")
    reader([read_image(paths[0]).pixels], heatmaps=False)  # warm up

    def reader_alone() -> float:  # what index does per batch, minus hashing and the database
        t0 = time.perf_counter()
        for chunk in batched(paths, batch_size):
            reader([read_image(p).pixels for p in chunk], heatmaps=False, batch_size=len(chunk))
        return time.perf_counter() - t0

    before = reader_alone()
    archive = Archive(f"sqlite:///{work / 'index.db'}")
    stats = index_images(archive, reader, iter(paths), batch_size=batch_size, progress=False)
    after = reader_alone()  # baseline before and after: the machine's load drifts
    reader_only = (before + after) / 2
    rerun = index_images(archive, reader, iter(paths), batch_size=batch_size, progress=False)
    return {
        "images": len(paths), "image_size": size, "batch_size": batch_size, "simulator": kind,
        "model_id": reader.model_id, "ok": stats.indexed, "failed": stats.failed,
        "reader_only_images_per_s": len(paths) / reader_only,
        "reader_only_runs_s": [before, after],
        "index_images_per_s": len(paths) / stats.seconds,
        "index_vs_reader_ratio": (len(paths) / stats.seconds) / (len(paths) / reader_only),
        "rerun_skip_images_per_s": len(paths) / rerun.seconds,
    }


# -- 2. synthetic archive ----------------------------------------------------------------------
def synthetic_archive(url: str, n: int, dim: int, seed: int = 0, centres: int = 2000,
                      chunk: int = 100_000) -> tuple[Archive, np.ndarray]:
    """Bulk-insert `n` rows (images + findings, drawn with numpy) into the real schema; returns
    the archive and the unit-length embedding matrix (row i = image id i + 1)."""
    archive = Archive(url)
    rng = np.random.default_rng(seed)
    c = normalise(rng.normal(size=(centres, dim)))
    matrix = np.empty((n, dim), np.float32)
    names = [d[0] for d in DISEASES]
    sites = [d[2] or [None] for d in DISEASES]
    sevs = [d[3] or [None] for d in DISEASES]
    raw = archive.engine.raw_connection()
    try:
        cur = raw.cursor()
        fid = 0
        for start in range(0, n, chunk):
            m = min(chunk, n - start)
            ids = np.arange(start + 1, start + m + 1)
            emb = normalise(c[rng.integers(0, centres, m)] + 1.4 * rng.normal(size=(m, dim)) / np.sqrt(dim))
            matrix[start:start + m] = emb
            n_find = rng.choice([0, 1, 2, 3], size=m, p=[0.4, 0.35, 0.17, 0.08])
            owner = np.repeat(ids, n_find)
            f = len(owner)
            dis = rng.integers(0, len(DISEASES), f)
            score = 0.5 + 0.5 * rng.random(f)
            side = rng.integers(0, len(SIDES), f)
            pick = rng.integers(0, 1000, (f, 2))
            findings = []
            extra: dict[int, list[str]] = {}
            for k in range(f):
                d = dis[k]
                site = sites[d][pick[k, 0] % len(sites[d])]
                sev = sevs[d][pick[k, 1] % len(sevs[d])]
                sd = SIDES[side[k]] if site else None
                organ = DISEASES[d][1]
                fid += 1
                words = (names[d].lower(), organ, site, sd, sev)
                findings.append((fid, int(owner[k]), names[d], names[d].lower(), float(score[k]),
                                 " ".join(w for w in words if w), organ,
                                 f"/{site}/" if site else "", sd, sev, "[]"))
                extra.setdefault(int(owner[k]), []).append(f'"{names[d]}": {score[k]:.4f}')
            cardio = rng.random(m) * 0.5
            images = [(int(i), f"{i:064x}", MODEL, f"/archive/{i:08d}.dcm", "ok",
                       "{" + ", ".join([f'"Cardiomegaly": {cardio[j]:.4f}'] + extra.get(int(i), [])) + "}",
                       emb[j].tobytes(), "2026-01-01 00:00:00", 256, 256)
                      for j, i in enumerate(ids)]
            cur.executemany("insert into images (id, sha256, model_id, path, status, scores, "
                            "embedding, indexed_at, height, width) values (?,?,?,?,?,?,?,?,?,?)",
                            images)
            cur.executemany("insert into findings (id, image_id, disease, disease_key, score, "
                            "annotation, organ, location, side, severity, boxes) "
                            "values (?,?,?,?,?,?,?,?,?,?,?)", findings)
            raw.commit()
        cur.execute("analyze")
        raw.commit()
    finally:
        raw.close()
    return archive, matrix


NORMAL_SENTENCES = ["The heart size is normal.", "No pneumothorax.", "The lungs are clear.",
                    "There is no pleural effusion.", "Osseous structures are intact.",
                    "Stable mediastinal contours.", "No focal airspace consolidation.",
                    "Degenerative changes of the spine.", "No acute cardiopulmonary abnormality."]


def synthetic_reports(archive: Archive, seed: int = 0, drop: float = 0.1, add: float = 0.05,
                      chunk: int = 50_000) -> dict:
    """A report per image, written from its findings (each left out with probability `drop`:
    model-only disagreements) plus normal sentences, and a positive disease the model did not
    find with probability `add` (report-only); its mined findings as the miner would store them.
    Inserted through the real schema, so the FTS5 triggers index the text."""
    from cxr.archive.reports import label_key

    rng = np.random.default_rng(seed + 7)
    names = [d[0] for d in DISEASES]
    raw = archive.engine.raw_connection()
    try:
        cur = raw.cursor()
        found: dict[int, list] = {}
        for image_id, disease, side, location, severity in cur.execute(
                "select image_id, disease, side, location, severity from findings"):
            found.setdefault(image_id, []).append((disease, side, location.strip("/"), severity))
        n = cur.execute("select max(id) from images").fetchone()[0]
        rid, counts = 0, {"reports": 0, "report_findings": 0}
        for start in range(1, n + 1, chunk):
            reports, mined = [], []
            for image_id in range(start, min(start + chunk, n + 1)):
                sentences, positives = [], []
                for disease, side, site, severity in found.get(image_id, []):
                    if rng.random() < drop:
                        continue
                    positives.append((disease, side, site, severity))
                if rng.random() < add:
                    positives.append((names[int(rng.integers(len(names)))], None, "", None))
                for disease, side, site, severity in positives:
                    words = [severity, side, site and f"{site}", disease.split("/")[0].lower()]
                    sentences.append(" ".join(w for w in words if w).capitalize() + ".")
                    mined.append((image_id, disease, label_key(disease), "positive", side,
                                  f"/{site}/" if site else "", severity, sentences[-1]))
                picks = rng.choice(len(NORMAL_SENTENCES), size=3, replace=False)
                sentences += [NORMAL_SENTENCES[i] for i in picks]
                rid += 1
                reports.append((rid, image_id, "FINDINGS: " + " ".join(sentences), None))
            cur.executemany("insert into reports (id, image_id, text, note) values (?,?,?,?)",
                            reports)
            cur.executemany("insert into report_findings (image_id, disease, label_key, certainty, "
                            "side, location, severity, sentence) values (?,?,?,?,?,?,?,?)", mined)
            raw.commit()
            counts["reports"] += len(reports)
            counts["report_findings"] += len(mined)
        cur.execute("analyze")
        raw.commit()
    finally:
        raw.close()
    return counts


REPORT_QUERIES = [
    ("report: effusion", dict(report="effusion")),
    ("report: moderate left base opacity", dict(report="moderate left base opacity")),
    ("report: pneumothorax (rare words)", dict(report="large apex pneumothorax")),
    ("report: granuloma + finding Calcified Granuloma", dict(text="calcified granuloma",
                                                              report="granuloma")),
    ("disagree report-only Cardiomegaly", dict(disagree="report-only",
                                               disagree_finding="Cardiomegaly")),
    ("disagree model-only Cardiomegaly", dict(disagree="model-only",
                                              disagree_finding="Cardiomegaly")),
    ("disagree report-only (any target)", dict(disagree="report-only")),
]

QUERIES = [
    ("opacity left base, moderate", dict(text="opacity left base", severity="moderate")),
    ("effusion right", dict(text="effusion right")),
    ("Cardiomegaly score >= 0.9", dict(finding="Cardiomegaly", min_score=0.9)),
    ("nodule upper lobe + granuloma", dict(text="nodule upper lobe", also=["granuloma"])),
    ("pneumothorax large (rare)", dict(text="pneumothorax large")),
    ("any target: Cardiomegaly >= 0.45", dict(scores={"Cardiomegaly": 0.45})),
]


def bench_queries(n: int, dim: int, work: Path, repeats: int, seed: int = 0,
                  partial=None, reports: bool = False, similar: bool = True) -> dict:
    db = work / f"synthetic-{n}.db"
    for p in work.glob(f"synthetic-{n}.db*"):
        p.unlink() if p.is_file() else None
    t0 = time.perf_counter()
    archive, matrix = synthetic_archive(f"sqlite:///{db}", n, dim, seed)
    build_rows_s = time.perf_counter() - t0
    print(f"  {n:,} rows built in {build_rows_s:.0f} s", file=sys.stderr, flush=True)
    out = {"rows": n, "dim": dim, "build_rows_s": build_rows_s,
           "findings": None, "structured": {}, "similar": {}}
    with archive.engine.connect() as conn:
        out["findings"] = conn.exec_driver_sql("select count(*) from findings").scalar()
    if reports:
        t0 = time.perf_counter()
        out["reports"] = synthetic_reports(archive, seed)
        out["build_reports_s"] = time.perf_counter() - t0
        print(f"  {n:,} reports built in {out['build_reports_s']:.0f} s", file=sys.stderr,
              flush=True)
    archive.vocabulary()
    for name, kw in QUERIES + (REPORT_QUERIES if reports else []):
        kw = dict(kw)
        text = kw.pop("text", None)
        stats, hits = timed(lambda: archive.search(text, limit=20, **kw), repeats)
        out["structured"][name] = stats | {"hits": len(hits)}
        print(f"  {n:,} rows  {name}: p50 {stats['p50_ms']:.1f} ms, p95 {stats['p95_ms']:.1f} ms",
              file=sys.stderr, flush=True)
    if partial:
        partial(out)
    if not similar:
        archive.close()
        return out

    # similar images: HNSW (usearch) built from the DB vs exact numpy
    t0 = time.perf_counter()
    index = archive.sync_vectors(MODEL, save=False)
    out["similar"]["index_build_s"] = time.perf_counter() - t0
    print(f"  {n:,} rows: HNSW built in {out['similar']['index_build_s']:.0f} s", file=sys.stderr,
          flush=True)
    rng = np.random.default_rng(seed + 1)
    qs = matrix[rng.integers(0, n, repeats)] + 0.01 * rng.normal(size=(repeats, dim)).astype(np.float32)
    keys = np.arange(1, n + 1)
    ann_times, bf_times, recall = [], [], []
    for q in qs:
        t0 = time.perf_counter()
        got, _ = index.search(q, 10)
        ann_times.append(time.perf_counter() - t0)
        t0 = time.perf_counter()
        exact, _ = brute_force(keys, matrix, q, 10)
        bf_times.append(time.perf_counter() - t0)
        recall.append(len(set(got.tolist()) & set(exact.tolist())) / 10)
    out["similar"]["usearch_hnsw"] = percentiles(ann_times)
    out["similar"]["numpy_brute_force"] = percentiles(bf_times)
    out["similar"]["recall_at_10"] = float(np.mean(recall))
    out["similar"]["speedup_p50"] = (out["similar"]["numpy_brute_force"]["p50_ms"]
                                     / out["similar"]["usearch_hnsw"]["p50_ms"])
    stats, _ = timed(lambda: archive.similar(image_id=int(rng.integers(1, n + 1)), k=10), repeats)
    out["similar"]["archive_similar_end_to_end"] = stats
    archive.close()
    return out


# -- 3. service under load ---------------------------------------------------------------------
def bench_service_load(run: Path | None, seconds: float = 60, clients: int = 8,
                       work: Path | None = None, device: str | None = None,
                       threads: int | None = None) -> dict:
    """The REST service under load (see `cxr.service.loadtest`): requests/s, p50/p95 latency and
    error count of POST /annotate with `clients` concurrent clients on loopback for `seconds`,
    against the Reader called in-process on the same images in the same run. Images: 32 real NIH
    radiographs from the data cache when present, else simulated ones."""
    from cxr.data import data_dir
    from cxr.service.loadtest import load_test, table

    work = work or Path(tempfile.mkdtemp(prefix="cxr-bench-service-"))
    if run is None:
        run = work / "tiny" / "run"
        if not (run / "config.json").exists():
            from cxr.testing import make_tiny_run

            run = make_tiny_run(work / "tiny")
    images = sorted((data_dir() / "nih" / "bbox256" / "images").glob("*.png"))[:32]
    source = "NIH ChestX-ray8 PNG 256x256"
    if not images:
        from cxr.archive.index import iter_inputs

        images = [Path(p) for p in iter_inputs(simulated_images(work / "service-images", 32, 256))]
        source = "simulated 256x256"
    fig = load_test(run, images, seconds, clients, device=device, threads=threads)
    fig["image_source"] = source
    print(f"service under load ({source}, {len(images)} images, run {run}):")
    print(table(fig) + "\n")
    return {"measured": True, **fig}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--run", type=Path, help="trained run (default: train the tiny run)")
    parser.add_argument("--images", type=int, default=1000, help="simulated images to index")
    parser.add_argument("--size", type=int, default=256, help="simulated image size")
    parser.add_argument("--simulator", choices=["phantom", "synthetic"], default="phantom",
                        help="CT phantom radiographs, or quick numpy drawings")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--rows", type=int, nargs="*", default=[100_000, 1_000_000],
                        help="synthetic archive sizes for the query latencies")
    parser.add_argument("--dim", type=int, default=64,
                        help="embedding size of synthetic rows (64: the tiny run's embedding)")
    parser.add_argument("--repeats", type=int, default=100, help="queries per latency figure")
    parser.add_argument("--skip-indexing", action="store_true")
    parser.add_argument("--reports", action="store_true",
                        help="also give every synthetic row a report; time report search")
    parser.add_argument("--no-similar", action="store_true",
                        help="skip the similar-image part of the query benchmark")
    parser.add_argument("--service", action="store_true", help="also load-test the service")
    parser.add_argument("--duration", type=float, default=60, help="seconds of service load")
    parser.add_argument("--device", default=None, help="Reader device for the service load")
    parser.add_argument("--threads", type=int, default=None,
                        help="torch threads for the service load, server and baseline alike")
    parser.add_argument("--work", type=Path, default=None, help="scratch folder (default: temp)")
    parser.add_argument("--json", type=Path, help="write all figures here")
    args = parser.parse_args(argv)

    work = args.work or Path(tempfile.mkdtemp(prefix="cxr-bench-archive-"))
    work.mkdir(parents=True, exist_ok=True)
    report = {"machine": {"python": platform.python_version(), "platform": platform.platform(),
                          "cpus": __import__("os").cpu_count()}}
    if not args.skip_indexing:
        run = args.run
        if run is None:
            from cxr.testing import make_tiny_run

            run = make_tiny_run(work / "tiny")
        r = bench_indexing(run, args.images, args.size, args.batch_size, work, args.simulator)
        report["indexing"] = r
        print(markdown_table(
            ["indexing", "images", "images/s"],
            [["Reader alone (baseline)", r["images"], r["reader_only_images_per_s"]],
             ["cxr index (SQLite)", r["images"], r["index_images_per_s"]],
             ["re-run (all skipped)", r["images"], r["rerun_skip_images_per_s"]]], digits=1))
        print(f"index / Reader alone: {r['index_vs_reader_ratio']:.2f}\n")
    report["queries"] = []
    for n in args.rows:
        def partial(q):  # keep what is measured even if a later stage is cut short
            if args.json:
                args.json.write_text(json.dumps(report | {"partial": q}, indent=2) + "\n")

        q = bench_queries(n, args.dim, work, args.repeats, partial=partial, reports=args.reports,
                          similar=not args.no_similar)
        report["queries"].append(q)
        rows = [[name, s["p50_ms"], s["p95_ms"], s["hits"]] for name, s in q["structured"].items()]
        if args.no_similar:
            print(f"{n:,} rows ({q['findings']:,} findings, built in {q['build_rows_s']:.0f} s)")
            print(markdown_table(["query", "p50 ms", "p95 ms", "hits"], rows, digits=2) + "\n")
            continue
        sim = q["similar"]
        rows += [["similar: usearch HNSW (k=10)", sim["usearch_hnsw"]["p50_ms"],
                  sim["usearch_hnsw"]["p95_ms"], 10],
                 ["similar: numpy brute force (baseline)", sim["numpy_brute_force"]["p50_ms"],
                  sim["numpy_brute_force"]["p95_ms"], 10],
                 ["similar: Archive.similar end to end", sim["archive_similar_end_to_end"]["p50_ms"],
                  sim["archive_similar_end_to_end"]["p95_ms"], 10]]
        print(f"{n:,} rows ({q['findings']:,} findings, built in {q['build_rows_s']:.0f} s; "
              f"HNSW built in {sim['index_build_s']:.0f} s, recall@10 {sim['recall_at_10']:.3f}, "
              f"{sim['speedup_p50']:.0f}x faster than brute force at p50)")
        print(markdown_table(["query", "p50 ms", "p95 ms", "hits"], rows, digits=2) + "\n")
    report["service"] = (bench_service_load(args.run, args.duration, 8, work, args.device,
                                            args.threads)
                         if args.service else {"measured": False})
    if args.json:
        args.json.write_text(json.dumps(report, indent=2) + "\n")
        print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""`cxr index --ray`: Readers in a Ray Data actor pool on a local Ray started by the test; the
driver writes the same archive the local run would."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np


# Ray runs in a child process: the test starts the local instance there, then runs `cxr index
# --ray auto`, which joins it. A child keeps Ray's C++ runtime apart from whatever the test
# process has loaded before (in one process, ray.init after some other tests aborts).
RAY_INDEX = """
import sys, ray
ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, configure_logging=False,
         object_store_memory=150 * 1024**2)
from cxr.cli import main
code = main(["index", *sys.argv[1:], "--ray", "auto", "--ray-actors", "2", "--batch-size", "3",
             "--quiet", "--json", "-"])
ray.shutdown()
sys.exit(code)
"""


def test_ray_index_matches_the_local_run(tiny_run, radiographs, tmp_path):
    import ray  # noqa: F401  (the `ray` extra, part of `.[test]`: missing is a broken install)

    from cxr.archive.db import Archive
    from cxr.archive.index import index_images, iter_inputs
    from cxr.reader import Reader

    folder = tmp_path / "in" / "sub"
    folder.mkdir(parents=True)
    for png in radiographs[:7]:
        shutil.copy(png, folder / png.name)
    (folder / "corrupt.jpg").write_bytes(b"\xff\xd8\xff\xe0 truncated")
    # the Ray run reads a folder manifest with a report column: the driver stores the reports
    listed = sorted(p.name for p in folder.iterdir())
    (tmp_path / "in" / "manifest.csv").write_text("path,report\n" + "".join(
        f'sub/{name},"{"Large left pneumothorax." if i == 1 else ""}"\n'
        for i, name in enumerate(listed)))

    url = f"sqlite:///{tmp_path / 'ray.db'}"
    ray_archive = Archive(url)
    # one image indexed beforehand: the Ray run must skip it
    first = sorted(iter_inputs(tmp_path / "in"))[0]
    reader = Reader.load(tiny_run)
    index_images(ray_archive, reader, [first], progress=False)
    env = dict(os.environ, PYTHONPATH=str(Path(__file__).resolve().parents[1]),
               RAY_USAGE_STATS_ENABLED="0")
    proc = subprocess.run([sys.executable, "-c", RAY_INDEX, str(tiny_run),
                           f"folder:{tmp_path / 'in'},manifest.csv", "--db", url], env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    stats = json.loads(proc.stdout[proc.stdout.index("{"):])
    assert (stats["indexed"], stats["failed"], stats["skipped"]) == (6, 1, 1)
    assert ray_archive.count() == 8

    local = Archive(f"sqlite:///{tmp_path / 'local.db'}")
    index_images(local, reader, iter_inputs(tmp_path / "in"), batch_size=3, progress=False)
    by_ray = {h.sha256: h for h in ray_archive.search(limit=100)}
    by_local = {h.sha256: h for h in local.search(limit=100)}
    assert by_ray.keys() == by_local.keys() and len(by_ray) == 7
    for sha, hit in by_local.items():
        other = by_ray[sha]
        assert other.path == hit.path and other.model_id == hit.model_id
        assert [f.disease for f in other.findings] == [f.disease for f in hit.findings]
        assert [f.annotation for f in other.findings] == [f.annotation for f in hit.findings]
        np.testing.assert_allclose([other.scores[k] for k in sorted(hit.scores)],
                                   [hit.scores[k] for k in sorted(hit.scores)], atol=1e-5)
    (reported,) = ray_archive.search(report="pneumothorax")
    assert reported.path.endswith(listed[1]) and reported.report_findings[0]["side"] == "left"
    assert sum(h.report is not None for h in by_ray.values()) == 1
    (failed,) = ray_archive.search(status="failed")
    assert failed.path.endswith("corrupt.jpg") and failed.reason
    some = next(iter(by_ray.values()))
    assert len(ray_archive.similar(image_id=some.id, k=10)) == 6

"""`cxr index --ray`: Readers in a Ray Data actor pool on a local Ray started by the test; the
driver writes the same archive the local run would."""
from __future__ import annotations

import shutil

import numpy as np
import pytest


@pytest.fixture(scope="module")
def local_ray():
    ray = pytest.importorskip("ray")
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False,
             configure_logging=False, object_store_memory=150 * 1024**2)
    try:
        yield ray
    finally:
        ray.shutdown()


def test_ray_index_matches_the_local_run(local_ray, tiny_run, shared_data, tmp_path):
    from cxr.archive.db import Archive
    from cxr.archive.index import index_images, iter_inputs
    from cxr.archive.ray_index import index_with_ray
    from cxr.reader import Reader

    folder = tmp_path / "in" / "sub"
    folder.mkdir(parents=True)
    for png in sorted((shared_data / "nih" / "bbox256" / "images").glob("*.png"))[:7]:
        shutil.copy(png, folder / png.name)
    (folder / "corrupt.jpg").write_bytes(b"\xff\xd8\xff\xe0 truncated")

    ray_archive = Archive(f"sqlite:///{tmp_path / 'ray.db'}")
    # one image indexed beforehand: the Ray run must skip it
    first = sorted(iter_inputs(tmp_path / "in"))[0]
    reader = Reader.load(tiny_run)
    index_images(ray_archive, reader, [first], progress=False)
    stats = index_with_ray(ray_archive, tiny_run, iter_inputs(tmp_path / "in"), batch_size=3,
                           num_actors=2, progress=False)
    assert (stats.indexed, stats.failed, stats.skipped) == (6, 1, 1)
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
    (failed,) = ray_archive.search(status="failed")
    assert failed.path.endswith("corrupt.jpg") and failed.reason
    some = next(iter(by_ray.values()))
    assert len(ray_archive.similar(image_id=some.id, k=10)) == 6

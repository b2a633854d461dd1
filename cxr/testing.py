"""Test helpers shared across the project: a real, tiny trained run in seconds.

`make_tiny_run(out_dir)` simulates a few phantom radiographs (or, where the phantom CT is not
available, draws synthetic ones with `synthetic_studies`) and trains the tiny backbone through the
real `cxr.training.train`, cascade included. Tests of the Reader, archive and service use it.
"""
from __future__ import annotations

from contextlib import contextmanager
from pathlib import Path

import numpy as np

from .atomic import replacing
from .records import Box, Image, Study

# (MeSH-style term, disease) of the synthetic findings: a blob at a side of the lung base,
# and an enlarged central density.
_SYNTHETIC = [
    ("Opacity/lung/base/left/mild", "Opacity"),
    ("Opacity/lung/base/right/severe", "Opacity"),
    ("Cardiomegaly/mild", "Cardiomegaly"),
]


def synthetic_studies(out_dir: str | Path, n: int = 32, size: int = 64, seed: int = 0) -> list[Study]:
    """`n` one-image studies drawn with numpy: a chest-like background, and per study either
    nothing (normal), a bright blob low left/right (Opacity ...), a large central disc
    (Cardiomegaly) or both. PNG files under `out_dir`; boxes in pixel coordinates."""
    from PIL import Image as PILImage

    from .reports.mesh import parse_term

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:size, 0:size] / size
    studies = []
    for i in range(n):
        img = 0.25 + 0.15 * np.exp(-((xx - 0.5) ** 2) / 0.02) + 0.05 * rng.standard_normal((size, size))
        kind = i % 4  # 0 normal, 1 opacity, 2 cardiomegaly, 3 both
        findings, boxes = ([parse_term("normal")] if kind == 0 else []), []
        if kind in (1, 3):
            term = _SYNTHETIC[int(rng.integers(0, 2))][0]
            cx = 0.72 if "/left/" in term else 0.28  # patient's left = image right
            cy, r = 0.72, 0.09 if "mild" in term else 0.14
            img += 0.5 * np.exp(-(((xx - cx) ** 2 + (yy - cy) ** 2) / (2 * (r / 2) ** 2)))
            findings.append(parse_term(term))
            boxes.append(Box("Opacity", (cx - r) * size, (cy - r) * size, 2 * r * size, 2 * r * size))
        if kind in (2, 3):
            r = 0.2
            img += 0.3 * ((((xx - 0.5) / 1.3) ** 2 + (yy - 0.55) ** 2) < r ** 2)
            findings.append(parse_term(_SYNTHETIC[2][0]))
            boxes.append(Box("Cardiomegaly", (0.5 - 1.3 * r) * size, (0.55 - r) * size, 2.6 * r * size,
                             2 * r * size))
        path = out_dir / f"syn{i:04d}.png"
        with replacing(path) as tmp:
            PILImage.fromarray((np.clip(img, 0, 1) * 255).astype(np.uint8)).save(tmp, format="PNG")
        studies.append(Study(id=f"syn{i:04d}", patient_id=f"p{i:04d}",
                             images=[Image(id=f"syn{i:04d}", path=path, view="PA", boxes=boxes)],
                             findings=findings, source="synthetic"))
    return studies


def _phantom_available() -> bool:
    from .data import data_dir

    try:
        import cxr.phantom.simulate  # noqa: F401
        import cxr.sources  # noqa: F401
    except ImportError:
        return False
    return (data_dir() / "phantom" / "chest_ct.nii.gz").exists()


def tiny_config(**overrides):
    """The settings of the tiny run: tiny backbone, 64 px, 2 epochs per phase, cascade on with
    thresholds scaled so that the training pairs of a frequent label split in two."""
    from .training import TrainConfig

    settings = dict(backbone="tiny", rnn="gru", image_size=64, crop=56, epochs=2, rnn_epochs=30,
                    batch_size=8, rnn_batch_size=16, lr=3e-3, rnn_lr=1e-2, rnn_hidden=32, rnn_embed=16,
                    min_label_count=2, min_cluster_members=6, images_per_cluster=4, num_workers=0,
                    fractions=(0.6, 0.2, 0.2), seed=0, progress=False, localize_threshold=0.5,
                    ground_epochs=3, attn_dim=16)
    settings.update(overrides)
    return TrainConfig(**settings)


def make_tiny_run(out_dir: str | Path, n: int = 28, size: int = 64, phantom: bool | None = None,
                  **overrides) -> Path:
    """Train a tiny cascade into `out_dir/run` (returns it). Images: `n` phantom radiographs
    simulated into `out_dir/data` when the phantom CT is available (else synthetic ones)."""
    import torch

    from .training import train

    out_dir = Path(out_dir)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny tensors: a second thread only adds waiting on a busy machine
    try:
        use_phantom = _phantom_available() if phantom is None else phantom
        if use_phantom:
            from .phantom.simulate import simulate
            from .sources import open_source

            data = simulate(out_dir / "data", n=n, size=size, seed=0, workers=1, progress=False)
            spec = f"phantom:{data}"
            studies = open_source(spec)
        else:
            studies = synthetic_studies(out_dir / "data", n=n, size=size)
            spec = f"folder:{out_dir / 'data'}"
        config = tiny_config(data=spec, image_size=size, crop=size - size // 8, **overrides)
        return train(config, out_dir / "run", studies=studies)
    finally:
        torch.set_num_threads(threads)


@contextmanager
def archive_migrated(url: str, revision: str, down: bool = False):
    """A connection (in one transaction) to the archive at `url` after Alembic took it up (or
    `down`) to `revision`: how a test writes rows as an older cxr did, then opens the file with
    today's `Archive` to check the upgrade keeps them."""
    from alembic import command
    from alembic.config import Config
    from sqlalchemy import create_engine

    from .archive.db import MIGRATIONS

    cfg = Config()
    cfg.set_main_option("script_location", str(MIGRATIONS))
    engine = create_engine(url)
    try:
        with engine.begin() as conn:
            cfg.attributes["connection"] = conn
            (command.downgrade if down else command.upgrade)(cfg, revision)
            yield conn
    finally:
        engine.dispose()

"""Images for training: decoded and resized once into a disk cache, then served to torch.

Decoding a DICOM or a 3000-px PNG costs far more than a training step of a small CNN, so every
image is decoded and resized once into a memory-mapped uint16 `.npy` (N, S, S) keyed by a hash of
the file list and size. Epochs then read pages from the page cache: loading never starves the model.
Augmentation (random crop, small rotation and scale, intensity jitter) runs on the batch, on the
training device.
"""
from __future__ import annotations

import hashlib
import math
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import Dataset

from .atomic import replacing, write_atomic
from .errors import CxrError
from .preprocess import STRETCH, preprocess

SCALE = 65535.0


def cache_key(paths: list[str | Path], size: int) -> str:
    h = hashlib.sha1(f"v2-stretch:{size}".encode())
    for p in paths:
        p = Path(p)
        try:
            st = p.stat()
            h.update(f"{p.resolve()}|{st.st_size}|{int(st.st_mtime)}\n".encode())
        except OSError:
            h.update(f"{p}|missing\n".encode())
    return h.hexdigest()[:16]


def build_cache(paths: list[str | Path], size: int, cache_dir: str | Path, workers: int = 2,
                progress: bool = True) -> tuple[np.ndarray, dict[int, str]]:
    """Decode + resize every image once into `cache_dir/images-<hash>-<size>.npy` (uint16) and
    return it memory-mapped read-only, with {row: problem} for files that could not be read (their
    rows are black; the caller leaves them out). An existing complete cache is reused as is."""
    import json

    from .images import load_image

    cache_dir = Path(cache_dir)
    cache_dir.mkdir(parents=True, exist_ok=True)
    final = cache_dir / f"images-{cache_key(paths, size)}-{size}.npy"
    failed_file = final.with_suffix(".failed.json")
    if final.exists():
        failed = json.loads(failed_file.read_text()) if failed_file.exists() else {}
        return np.load(final, mmap_mode="r"), {int(k): v for k, v in failed.items()}
    failed: dict[int, str] = {}

    def one(i: int) -> None:
        try:
            array[i] = np.round(preprocess(load_image(paths[i]), size, STRETCH) * SCALE).astype(np.uint16)
        except CxrError as exc:
            failed[i] = str(exc)

    from tqdm.auto import tqdm

    with replacing(final) as tmp:
        array = np.lib.format.open_memmap(tmp, mode="w+", dtype=np.uint16, shape=(len(paths), size, size))
        with ThreadPoolExecutor(max(1, workers)) as pool:
            for _ in tqdm(pool.map(one, range(len(paths))), total=len(paths), desc="caching images",
                          unit="img", disable=not progress, leave=False):
                pass
        array.flush()
        array = None  # close the memory map before the rename
        if failed:  # written before the cache: a complete cache always has its list of failures
            write_atomic(failed_file, json.dumps({str(k): v for k, v in sorted(failed.items())}, indent=1))
    return np.load(final, mmap_mode="r"), failed


class XrayDataset(Dataset):
    """(image (1, S', S') float in [0, 1], target vector, index) from a cache array.

    With `crop` < S a random crop (training) is taken; `crop=None` gives the whole image.
    `indices` selects (and may repeat, for data dropout / duplication) rows of the cache.
    """

    def __init__(self, images: np.ndarray, targets: np.ndarray, indices=None, crop: int | None = None):
        self.images, self.targets = images, np.asarray(targets, dtype=np.float32)
        self.indices = np.arange(len(images)) if indices is None else np.asarray(indices)
        self.crop = crop

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, k: int):
        i = int(self.indices[k])
        img = self.images[i]
        if self.crop and self.crop < img.shape[0]:
            y, x = (int(v) for v in torch.randint(0, img.shape[0] - self.crop + 1, (2,)))
            img = img[y:y + self.crop, x:x + self.crop]
        x = torch.from_numpy(np.asarray(img, dtype=np.float32) / SCALE)[None]
        return x, torch.from_numpy(self.targets[i]), i


def augment(batch: torch.Tensor, rotation: float = 5.0, scale: float = 0.05,
            intensity: float = 0.1, generator: torch.Generator | None = None) -> torch.Tensor:
    """Small rotation (degrees) and scale, then contrast/brightness/gamma jitter, per image.
    `batch` (B, 1, H, W) in [0, 1]; works on any device."""
    b = batch.shape[0]
    dev = batch.device

    def rand(*shape):
        return (torch.rand(*shape, generator=generator) * 2 - 1).to(dev)

    if rotation or scale:
        angle = rand(b) * math.radians(rotation)
        s = 1 + rand(b) * scale
        cos, sin = torch.cos(angle) / s, torch.sin(angle) / s
        theta = torch.stack([torch.stack([cos, -sin, torch.zeros_like(cos)], 1),
                             torch.stack([sin, cos, torch.zeros_like(cos)], 1)], 1)
        grid = F.affine_grid(theta.to(batch.dtype), list(batch.shape), align_corners=False)
        batch = F.grid_sample(batch, grid, padding_mode="border", align_corners=False)
    if intensity:
        gamma = torch.exp(rand(b, 1, 1, 1) * intensity)
        contrast = 1 + rand(b, 1, 1, 1) * intensity
        bright = rand(b, 1, 1, 1) * intensity / 2
        batch = ((batch.clamp(0, 1) ** gamma - 0.5) * contrast + 0.5 + bright).clamp(0, 1)
    return batch


def data_dropout_indices(targets: np.ndarray, normal_col: int | None, rng: np.random.Generator,
                         keep_factor: float = 4.0, max_duplicate: int = 4) -> np.ndarray:
    """One epoch's image indices under Shin et al.'s data dropout.

    Each normal image is kept with probability min(1, keep_factor * n_max / n_normal), n_max being
    the largest disease class; each disease image is repeated min(max_duplicate, n_max // n_c)
    times for its rarest class c (the repeats differ by augmentation). Images with no label at all
    are kept once."""
    targets = np.asarray(targets) > 0
    n = len(targets)
    disease_cols = [c for c in range(targets.shape[1]) if c != normal_col]
    disease = targets[:, disease_cols]
    counts = disease.sum(0)
    n_max = int(counts.max()) if counts.size else 0
    normal = targets[:, normal_col] if normal_col is not None else np.zeros(n, dtype=bool)
    normal_only = normal & ~disease.any(1)
    n_normal = int(normal.sum())
    keep_p = 1.0 if n_normal == 0 or n_max == 0 else min(1.0, keep_factor * n_max / n_normal)
    rarest = np.where(disease, counts[None, :], np.iinfo(np.int64).max).min(1) if disease.size else np.zeros(n)
    reps = np.where(disease.any(1) if disease.size else False,
                    np.clip(n_max // np.maximum(rarest, 1), 1, max_duplicate), 1).astype(np.int64)
    reps[normal_only & (rng.random(n) >= keep_p)] = 0
    out = np.repeat(np.arange(n, dtype=np.int64), reps)
    rng.shuffle(out)
    return out


def normal_keep_probability(targets: np.ndarray, normal_col: int, keep_factor: float = 4.0) -> float:
    targets = np.asarray(targets) > 0
    disease = np.delete(targets, normal_col, axis=1)
    n_max = int(disease.sum(0).max()) if disease.size else 0
    n_normal = int(targets[:, normal_col].sum())
    return 1.0 if n_normal == 0 or n_max == 0 else min(1.0, keep_factor * n_max / n_normal)

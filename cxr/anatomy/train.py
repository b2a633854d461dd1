"""Training the anatomy network on the CT phantom (reproduces the shipped weights).

    python -m cxr.anatomy.train --out cxr/anatomy/weights        # about 1.5 minutes on 2 cores

Every film is a phantom rendering (`cxr.phantom`: the one CT, in a new pose, build, breath,
exposure and heart size each time, PA or AP, a third with one finding drawn in) and its labels
are the renderer's own organ masks (`Rendering.anatomy`): nothing is labelled by hand. The films
are then moved, scaled, tilted, smoothly deformed, given another gamma, sharpness and noise
(`augment`) so that the network learns neither the phantom's framing nor its one CT's shapes.
Real films are used only to score it (`benchmarks/anatomy.py`: the NIH expert boxes of
Cardiomegaly; `benchmarks/anatomy_recipes.py`: the recipes, several seeds each).
"""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from ..atomic import replacing, write_atomic
from .model import FEATURES, ORGANS, SIZE, build_net, net_input, stretch

RENDER_SIZE = 256
WARP = 0.12  # the deformation `augment` draws by default (benchmarks/anatomy_recipes.py: why)
# one finding in a third of the films: a larger heart (Cardiomegaly) in a quarter, so the network
# sees the whole range of heart sizes, and findings that change the lungs' or the heart's edges
FINDINGS = ("cardiomegaly", "effusion", "opacity", "atelectasis", "hypoinflation", "hyperdistention")


def render_films(n: int, seed: int = 0, phantom=None, progress=None, size: int = SIZE):
    """(images (n, size, size) float32 in [0, 1], masks (n, organs, size, size) float32)."""
    from ..phantom.render import Phantom
    from ..phantom.spec import FindingSpec

    phantom = phantom or Phantom.load()
    rng = np.random.default_rng(seed)
    images, masks = [], []
    for k in range(n):
        findings = []
        u = rng.random()
        if u < 0.25:
            findings = [FindingSpec(kind="cardiomegaly")]
        elif u < 0.5:
            findings = [FindingSpec(kind=str(rng.choice(FINDINGS[1:])))]
        view = "AP" if rng.random() < 0.3 else "PA"
        r = phantom.render(findings, seed=int(seed * 1_000_003 + k), size=RENDER_SIZE, view=view)
        images.append(r.image)
        masks.append(np.stack([r.anatomy[o] for o in ORGANS]))
        if progress:
            progress(k + 1, n)
    x = F.interpolate(torch.from_numpy(np.stack(images)).float()[:, None], size=(size, size), mode="area")
    y = F.interpolate(torch.from_numpy(np.stack(masks)).float(), size=(size, size), mode="area") > 0.5
    return x, y.float()


def augment(x: torch.Tensor, y: torch.Tensor, gen: torch.Generator, warp: float = WARP):
    """Random tilt (+-8 degrees), scale (0.8-1.25), shift (+-15%), gamma, noise; then the same
    percentile stretch as at use (`stretch`). With `warp` > 0 also a smooth random deformation
    (displacements of up to about `warp` of the film's half-width, from a 4 x 4 grid), a width
    scaled apart from the height (+-12%), and a random blur or sharpening: one CT's heart and
    lungs given other shapes, and other films' processing."""
    n = len(x)
    angle = (torch.rand(n, generator=gen) - 0.5) * 2 * np.radians(8)
    scale = 0.8 + 0.45 * torch.rand(n, generator=gen)
    aspect = 1 + (torch.rand(n, generator=gen) - 0.5) * 0.24 if warp else torch.ones(n)
    tx, ty = (torch.rand(2, n, generator=gen) - 0.5) * 0.3
    cos, sin = torch.cos(angle) / scale, torch.sin(angle) / scale
    theta = torch.stack([torch.stack([cos * aspect, -sin, tx], 1), torch.stack([sin * aspect, cos, ty], 1)], 1)
    grid = F.affine_grid(theta, list(x.shape), align_corners=False)
    if warp:
        coarse = torch.randn(n, 2, 4, 4, generator=gen) * warp / 2
        grid = grid + F.interpolate(coarse, size=x.shape[-2:], mode="bicubic", align_corners=True).permute(0, 2, 3, 1)
    xa = F.grid_sample(x, grid, padding_mode="border", align_corners=False)
    ya = F.grid_sample(y, grid, padding_mode="zeros", align_corners=False) > 0.5
    gamma = torch.exp((torch.rand(n, 1, 1, 1, generator=gen) - 0.5) * 0.8)
    xa = xa.clamp(0, 1) ** gamma
    if warp:
        sharp = (torch.rand(n, 1, 1, 1, generator=gen) - 0.4) * 1.5  # -0.6 (blur) .. 0.9 (sharpen)
        xa = xa + sharp * (xa - F.avg_pool2d(xa, 5, 1, 2, count_include_pad=False))
    xa = stretch(xa)
    return xa + 0.03 * torch.randn(xa.shape, generator=gen), ya.float()


def loss_of(logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Binary cross-entropy plus soft Dice per organ (the heart is a tenth of the film)."""
    p = torch.sigmoid(logits)
    dice = 1 - (2 * (p * y).sum((2, 3)) + 1) / (p.sum((2, 3)) + y.sum((2, 3)) + 1)
    return F.binary_cross_entropy_with_logits(logits, y) + dice.mean()


def train(out: str | Path, n: int = 1200, epochs: int = 8, seed: int = 0, batch: int = 32,
          lr: float = 3e-3, size: int = SIZE, features=FEATURES, warp: float = WARP, log=print) -> dict:
    """Render `n` films, train, write anatomy.safetensors + anatomy.json into `out`."""
    from safetensors.torch import save_file

    torch.manual_seed(seed)
    t0 = time.time()
    x, y = render_films(n, seed, size=size)
    log(f"rendered {n} films in {time.time() - t0:.0f} s")
    net = build_net(features)
    opt = torch.optim.AdamW(net.parameters(), lr=lr, weight_decay=1e-4)
    gen = torch.Generator().manual_seed(seed)
    for epoch in range(epochs):
        for group in opt.param_groups:
            group["lr"] = lr * 0.5 * (1 + np.cos(np.pi * epoch / epochs))
        net.train()
        order, total = torch.randperm(n, generator=gen), 0.0
        for s in range(0, n, batch):
            b = order[s:s + batch]
            xa, ya = augment(x[b], y[b], gen, warp)
            loss = loss_of(net(net_input(xa)), ya)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            total += float(loss.detach()) * len(b)
        log(f"epoch {epoch + 1}/{epochs} loss {total / n:.4f} ({time.time() - t0:.0f} s)")
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    with replacing(out / "anatomy.safetensors") as tmp:
        save_file({k: v.contiguous() for k, v in net.state_dict().items()}, str(tmp))
    meta = {"organs": list(ORGANS), "size": size, "features": list(features), "films": n,
            "epochs": epochs, "seed": seed, "warp": warp, "lr": lr, "batch": batch, "render_size": RENDER_SIZE,
            "seconds": round(time.time() - t0, 1), "torch": torch.__version__}
    write_atomic(out / "anatomy.json", json.dumps(meta, indent=1) + "\n")
    return meta


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description="train the anatomy network on the CT phantom")
    ap.add_argument("--out", default=str(Path(__file__).resolve().parent / "weights"))
    ap.add_argument("--films", type=int, default=1200)
    ap.add_argument("--epochs", type=int, default=8)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--size", type=int, default=SIZE, help="the network's input side in pixels")
    ap.add_argument("--features", type=int, nargs=6, default=list(FEATURES),
                    help="the U-Net's widths (MONAI BasicUNet: five levels and the last)")
    ap.add_argument("--warp", type=float, default=WARP,
                    help="smooth random deformation, in shares of the half-width (0: none)")
    args = ap.parse_args(argv)
    train(args.out, args.films, args.epochs, args.seed, size=args.size, features=args.features, warp=args.warp)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

"""Training speed of each CNN backbone: images/s of forward + backward + optimiser step.

Setting: 1-channel 224x224 crops (the paper's random crop of 256 images), batch 16, the
multi-label BCE loss over 18 targets (Shin et al.'s 17 patterns + normal), Adam, on whatever
device torch picks (CUDA when present, else CPU with torch's default threads). A plain MONAI
DenseNet-121 (no CAM head, MONAI's own classifier) is measured in the same run as the baseline;
every backbone's ratio is against it.

    python benchmarks/train_speed.py [--steps 5] [--backbones nin googlenet densenet121 tiny] [--json OUT]
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from cxr.metrics import markdown_table  # noqa: E402
from cxr.machine import cpu_name  # noqa: E402
from cxr.models.cnn import BACKBONES, create_cnn  # noqa: E402


def steps_per_second(model: nn.Module, batch: int, size: int, steps: int, warmup: int,
                     n_classes: int, device: torch.device) -> dict:
    model.to(device).train()
    opt = torch.optim.Adam(model.parameters(), lr=1e-4)
    loss_fn = nn.BCEWithLogitsLoss()
    g = torch.Generator().manual_seed(0)
    x = torch.rand(batch, 1, size, size, generator=g).to(device)
    y = (torch.rand(batch, n_classes, generator=g) < 0.2).float().to(device)
    times = []
    for i in range(warmup + steps):
        t0 = time.perf_counter()
        opt.zero_grad(set_to_none=True)
        loss = loss_fn(model(x), y)
        loss.backward()
        opt.step()
        if device.type == "cuda":
            torch.cuda.synchronize()
        if i >= warmup:
            times.append(time.perf_counter() - t0)
    step = sorted(times)[len(times) // 2]  # median step time
    return {"images_per_s": batch / step, "step_s_median": step,
            "step_s_min": min(times), "params_m": sum(p.numel() for p in model.parameters()) / 1e6}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--backbones", nargs="+", default=["nin", "googlenet", "densenet121", "tiny"],
                    choices=BACKBONES)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--size", type=int, default=224)
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--classes", type=int, default=18)
    ap.add_argument("--json", type=Path)
    args = ap.parse_args(argv)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    torch.manual_seed(0)

    from monai.networks.nets import DenseNet121

    results = {}
    print(f"device {device}, torch threads {torch.get_num_threads()}, batch {args.batch}, "
          f"{args.size}x{args.size}, {args.steps} timed steps", flush=True)
    baseline = steps_per_second(DenseNet121(spatial_dims=2, in_channels=1, out_channels=args.classes),
                                args.batch, args.size, args.steps, args.warmup, args.classes, device)
    results["monai_densenet121 (baseline)"] = baseline
    print(f"  baseline MONAI DenseNet-121: {baseline['images_per_s']:.1f} images/s", flush=True)
    for name in args.backbones:
        r = steps_per_second(create_cnn(name, args.classes), args.batch, args.size, args.steps,
                             args.warmup, args.classes, device)
        r["ratio_vs_baseline"] = r["images_per_s"] / baseline["images_per_s"]
        results[name] = r
        print(f"  {name}: {r['images_per_s']:.1f} images/s", flush=True)

    rows = [[name, r["params_m"], r["images_per_s"], r["step_s_median"],
             r.get("ratio_vs_baseline", 1.0)] for name, r in results.items()]
    print()
    print(markdown_table(["backbone", "params (M)", "train images/s", "step s (median)",
                          "x baseline"], rows, digits=2))
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps({
            "benchmark": "train_speed", "device": str(device), "threads": torch.get_num_threads(),
            "cpu": cpu_name(), "torch": torch.__version__,
            "batch": args.batch, "size": args.size, "steps": args.steps, "results": results,
        }, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())

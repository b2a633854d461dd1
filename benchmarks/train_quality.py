"""Train the quality gate's network and write gate.safetensors + gate.json (the shipped weights
are made with the defaults: see cxr/quality/weights/MODEL_CARD.md).

    OMP_NUM_THREADS=2 python benchmarks/train_quality.py --nih DATA/nih/bbox256 \
        --ct DATA/phantom/chest_ct.nii.gz --labels DATA/phantom/chest_ct_labels.nii.gz \
        --structures DATA/phantom/structures.csv --out cxr/quality/weights
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from cxr.errors import CxrError  # noqa: E402


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--nih", required=True, help="folder of the NIH films (PNG; or with images/)")
    ap.add_argument("--ct", help="chest CT (NIfTI, HU); default: the data cache")
    ap.add_argument("--labels", help="its label map (NIfTI); default: the data cache")
    ap.add_argument("--structures", help="its structures.csv; default: the data cache")
    ap.add_argument("--out", default="cxr/quality/weights")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--n-train", type=int, default=24000)
    ap.add_argument("--n-calib", type=int, default=4000)
    ap.add_argument("--epochs", type=int, default=6)
    ap.add_argument("--phantom-renders", type=int, default=600)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args(argv)
    import torch

    from cxr.quality.train import train

    torch.set_num_threads(args.threads)
    try:
        train(args.nih, args.out, ct=args.ct, labels=args.labels, structures=args.structures,
              seed=args.seed, n_train=args.n_train, n_calib=args.n_calib, epochs=args.epochs,
              n_phantom=args.phantom_renders, log=lambda m: print(m, flush=True))
    except CxrError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())

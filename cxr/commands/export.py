"""`cxr export RUN --onnx [--out FILE]`: the run's CNN as an ONNX graph for fast CPU engines.

Writes RUN/model.onnx (or FILE) and, beside it, FILE.json with the graph's sha256 and the sha256
of the weights it came from (`cxr.engines`). The Reader then runs it with `--engine onnxruntime`
or `--engine openvino` (on `cxr annotate`, `cxr index`, `cxr serve`). The export is checked: the
graph passes onnx.checker and, run by ONNX Runtime when installed, gives PyTorch's logits to 1e-3.
"""
from __future__ import annotations

from pathlib import Path


def configure(parser) -> None:
    parser.add_argument("run", type=Path, help="trained run directory (cxr train --out)")
    parser.add_argument("--onnx", action="store_true", required=True,
                        help="export the CNN (trunk + head, with the feature maps for CAMs) to ONNX")
    parser.add_argument("--out", type=Path, default=None,
                        help="where to write the graph (default RUN/model.onnx, which --engine reads)")


def run(args) -> int:
    import numpy as np
    import torch

    from ..checkpoint import weights_hash
    from ..engines import ONNX_NAME, OnnxRuntimeEngine, export_onnx, meta_path
    from ..errors import CxrError
    from ..reader import Reader

    reader = Reader.load(args.run, device="cpu", gate=False)
    out = args.out or Path(args.run).expanduser() / ONNX_NAME
    if out.is_dir():
        raise CxrError("--out is a folder; give a file name such as model.onnx", out)
    arch, size = reader.spec.architecture, reader.image_size
    meta = export_onnx(reader.cnn, size, arch.in_chans, out, weights_hash(args.run))
    try:
        engine = OnnxRuntimeEngine(out, torch.get_num_threads())
    except CxrError:
        engine = None  # onnxruntime not installed: the checker's verdict is all we have
    if engine is not None:
        x = np.random.default_rng(0).standard_normal((2, arch.in_chans, size, size)).astype(np.float32)
        with torch.no_grad():
            want = reader.cnn(torch.from_numpy(x)).numpy()
        got = engine(x)[1]
        diff = float(np.abs(got - want).max())
        if diff > 1e-3:
            raise CxrError(f"the exported graph's logits differ from PyTorch's by {diff:.2g}", out)
    print(f"cxr export: {out} (opset {meta['opset']}, sha256 {meta['sha256'][:16]}...; "
          f"{meta_path(out).name} beside it)")
    return 0

"""The CNN trunk + head of a run as an ONNX graph, and the engines that run it.

    cxr export RUN --onnx            # RUN/model.onnx + RUN/model.onnx.json (sha256s, opset)
    Reader.load(RUN, engine="onnxruntime")      # or "openvino", or "torch" (the default)

Hospitals read on CPU servers, where ONNX Runtime and OpenVINO run a fixed graph faster than
eager PyTorch. Only the CNN moves: the graph takes the preprocessed batch (B, 1, S, S) (the run's
`cxr.preprocess` path, the same for every engine) and gives the three things the Reader uses,
`maps` (B, C, h, w) for the CAMs, `logits` (B, K) and `embeddings` (B, C). Calibration, CAM boxes
and the RNN annotator (small; a few ms per finding) stay in NumPy / PyTorch for every engine.

The JSON beside the graph records the sha256 of the graph and of the weights it was exported
from, so a Reader never runs a graph that belongs to other weights (it says to export again).
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch

from .atomic import replacing, write_atomic
from .errors import CxrError
from .hashing import file_sha256

ENGINES = ("torch", "onnxruntime", "openvino")
ONNX_NAME = "model.onnx"
OPSET = 18
OUTPUTS = ("maps", "logits", "embeddings")


class _Trunk(torch.nn.Module):
    """The Reader's CNN as one graph: what `Reader.forward` needs from it, nothing else."""

    def __init__(self, cnn: torch.nn.Module):
        super().__init__()
        self.cnn = cnn

    def forward(self, x):
        maps = self.cnn.forward_features(x)
        return maps, self.cnn.forward_head(maps), self.cnn.pool(maps)


def meta_path(onnx_path: str | Path) -> Path:
    onnx_path = Path(onnx_path)
    return onnx_path.with_name(onnx_path.name + ".json")


def export_onnx(cnn: torch.nn.Module, image_size: int, in_chans: int, out: str | Path,
                weights_sha256: str) -> dict:
    """Export `cnn` (eval mode, CPU) to `out` with a dynamic batch axis, check it with
    onnx.checker, and write the JSON beside it; returns that JSON's content."""
    import onnx

    out = Path(out)
    trunk = _Trunk(cnn).cpu().eval()
    example = torch.zeros(2, in_chans, image_size, image_size)
    with replacing(out) as tmp, torch.no_grad():
        # the TorchScript exporter: one self-contained file, a dynamic batch axis, no onnxscript
        torch.onnx.export(trunk, (example,), str(tmp), input_names=["x"], output_names=list(OUTPUTS),
                          dynamic_axes={"x": {0: "batch"}, **{o: {0: "batch"} for o in OUTPUTS}},
                          opset_version=OPSET, do_constant_folding=True, dynamo=False)
        onnx.checker.check_model(str(tmp), full_check=True)
    meta = {"format": "cxr-onnx/1", "onnx": out.name, "sha256": file_sha256(out),
            "weights_sha256": weights_sha256, "opset": OPSET, "input": "x",
            "input_shape": ["batch", in_chans, image_size, image_size], "outputs": list(OUTPUTS),
            "torch": torch.__version__, "onnx_version": onnx.__version__}
    write_atomic(meta_path(out), json.dumps(meta, indent=1))
    return meta


def verified_onnx(onnx_path: str | Path, weights_sha256: str) -> Path:
    """The graph at `onnx_path`, after checking its JSON: present, the graph's own sha256, and
    exported from these weights. Anything else is one CxrError saying what to do."""
    onnx_path = Path(onnx_path)
    again = f"run `cxr export {onnx_path.parent} --onnx`"
    meta_file = meta_path(onnx_path)
    if not onnx_path.exists() or not meta_file.exists():
        raise CxrError(f"no exported ONNX graph; {again}", onnx_path)
    try:
        meta = json.loads(meta_file.read_text())
    except ValueError as exc:
        raise CxrError(f"not JSON ({exc}); {again}", meta_file) from None
    if meta.get("sha256") != file_sha256(onnx_path):
        raise CxrError(f"the graph does not match the sha256 in {meta_file.name}; {again}", onnx_path)
    if meta.get("weights_sha256") != weights_sha256:
        raise CxrError(f"exported from other weights than the run's; {again}", onnx_path)
    return onnx_path


def ort_session(model: str | bytes, threads: int):
    """An ONNX Runtime CPU session of a graph (a path or its bytes) with `threads` threads that
    do not spin while idle (the Reader's other work shares those cores)."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    return ort.InferenceSession(model, options, providers=["CPUExecutionProvider"])


class OnnxRuntimeEngine:
    """The exported graph under ONNX Runtime's CPU provider (float32, as PyTorch)."""

    name = "onnxruntime"

    def __init__(self, onnx_path: Path, threads: int):
        try:
            import onnxruntime as ort
        except ImportError:
            raise CxrError("engine onnxruntime needs `pip install onnxruntime` (cxr[fast])") from None
        self.session = ort_session(str(onnx_path), threads)

    def __call__(self, x: np.ndarray) -> list[np.ndarray]:
        return self.session.run(list(OUTPUTS), {"x": x})


class OpenVinoEngine:
    """The exported graph compiled by OpenVINO for the CPU, held at float32 (OpenVINO would
    otherwise pick bf16 on CPUs that have it, and the scores would no longer match)."""

    name = "openvino"

    def __init__(self, onnx_path: Path, threads: int):
        try:
            import openvino as ov
        except ImportError:
            raise CxrError("engine openvino needs `pip install openvino` (cxr[fast])") from None
        core = ov.Core()
        self.model = core.compile_model(str(onnx_path), "CPU", {
            "INFERENCE_PRECISION_HINT": "f32", "INFERENCE_NUM_THREADS": threads,
            "PERFORMANCE_HINT": "LATENCY"})
        self.outputs = [self.model.output(name) for name in OUTPUTS]
        self.request = self.model.create_infer_request()

    def __call__(self, x: np.ndarray) -> list[np.ndarray]:
        result = self.request.infer({"x": x})
        return [np.asarray(result[o]) for o in self.outputs]


def open_engine(name: str, onnx_path: str | Path, weights_sha256: str, threads: int | None = None):
    """An engine for the exported graph (`torch` needs none: the Reader runs its module)."""
    if name not in ENGINES:
        raise CxrError(f"unknown engine {name!r}; choose one of {', '.join(ENGINES)}")
    path = verified_onnx(onnx_path, weights_sha256)
    threads = int(threads or torch.get_num_threads())
    return (OnnxRuntimeEngine if name == "onnxruntime" else OpenVinoEngine)(path, threads)

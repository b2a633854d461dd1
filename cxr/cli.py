"""`cxr` command: a table of sub-commands, each a module with `configure(parser)` and `run(args)`.

Only the chosen command's module is imported, so `cxr mine` never pays for torch or FastAPI.
"""
from __future__ import annotations

import argparse
import importlib
import sys

from .errors import CxrError

COMMANDS: dict[str, tuple[str, str]] = {
    "demo": ("cxr.commands.demo", "simulate a set, train the cascade, evaluate, write report.html"),
    "fetch": ("cxr.fetch", "put a public data file in the cache (~/.cache/cxr or $CXR_DATA_DIR)"),
    "mine": ("cxr.reports.cli", "mine findings from Open-i reports (MeSH terms and free text)"),
    "labels": ("cxr.reports.labels_cli", "print the label space mined from Open-i reports"),
    "simulate": ("cxr.phantom.cli", "simulate chest radiographs with known findings from a CT"),
    "train": ("cxr.commands.train", "train the CNN/RNN cascade on a data source"),
    "evaluate": ("cxr.commands.evaluate", "AUC, BLEU, context accuracy, localisation, calibration"),
    "check": ("cxr.commands.check", "quality gate alone: is it a chest film, which view, which way up"),
    "export": ("cxr.commands.export", "export a run's CNN to ONNX for the onnxruntime / openvino engines"),
    "annotate": ("cxr.commands.annotate", "annotate images (PNG/JPEG/DICOM) with a trained run"),
    "index": ("cxr.archive.cli_index", "index an image archive into a searchable database"),
    "search": ("cxr.archive.cli_search", "search an indexed archive by finding or by image"),
    "serve": ("cxr.service.cli", "serve the REST API and web viewer"),
    "listen": ("cxr.net.cli_listen", "a DICOM node: receive films by C-STORE, read, send SR back"),
}


def _usage() -> str:
    width = max(map(len, COMMANDS))
    lines = ["usage: cxr COMMAND [options]   (cxr COMMAND -h for help)", "", "commands:"]
    lines += [f"  {name:<{width}}  {help_}" for name, (_, help_) in COMMANDS.items()]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(_usage())
        return 0
    if argv[0] == "--version":
        from . import __version__
        print(__version__)
        return 0
    name = argv[0]
    if name not in COMMANDS:
        print(f"cxr: unknown command {name!r}\n\n{_usage()}", file=sys.stderr)
        return 2
    module_name, help_ = COMMANDS[name]
    module = importlib.import_module(module_name)
    parser = argparse.ArgumentParser(prog=f"cxr {name}", description=help_)
    module.configure(parser)
    args = parser.parse_args(argv[1:])
    try:
        return int(module.run(args) or 0)
    except CxrError as exc:
        print(f"cxr {name}: error: {exc}", file=sys.stderr)
        return 2
    except BrokenPipeError:  # `cxr search ... | head`: the reader left; not an error
        sys.stderr.close()
        return 0
    except OSError as exc:  # a path the user gave that the OS refused (a file as a folder, ...)
        where = f"{exc.filename}: " if exc.filename else ""
        print(f"cxr {name}: error: {where}{exc.strerror or exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"cxr {name}: interrupted; run the same command again to resume", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())

"""The package's layering, checked on its source: inference imports no training code, no two
modules import each other (directly or round a circle), and files are written only through
`cxr.atomic` (a reader never sees half a file)."""
from __future__ import annotations

import ast
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "cxr"


def _modules() -> dict[str, Path]:
    out = {}
    for f in PACKAGE.rglob("*.py"):
        parts = list(f.relative_to(ROOT).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        out[".".join(parts)] = f
    return out


def _imports(name: str, path: Path, known: dict[str, Path]) -> set[str]:
    """Modules of the package that `name` imports (at module level or inside functions)."""
    package = name if path.name == "__init__.py" else name.rsplit(".", 1)[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[:len(package.split(".")) - node.level + 1]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            candidates = [target] + [f"{target}.{a.name}" for a in node.names]
        elif isinstance(node, ast.Import):
            candidates = [a.name for a in node.names]
        else:
            continue
        found |= {c for c in candidates if c in known and c != name}
    return found


def test_no_import_circles():
    known = _modules()
    graph = {m: _imports(m, f, known) for m, f in known.items()}
    circles = []

    def reach(start: str) -> set[str]:
        seen, todo = set(), list(graph[start])
        while todo:
            m = todo.pop()
            if m not in seen:
                seen.add(m)
                todo += graph[m]
        return seen

    for m in graph:
        back = [d for d in graph[m] if m in reach(d) and not (m.startswith(d + ".") or d.startswith(m + "."))]
        circles += [f"{m} <-> {d}" for d in back]
    assert circles == []


def test_reading_an_image_imports_no_training(tiny_run):
    """`import cxr.reader`, reading and localising an image, and the archive and service
    modules load no module of `cxr.training`."""
    code = (
        "import sys, numpy as np\n"
        "import cxr.reader, cxr.archive.index, cxr.archive.dicom_out, cxr.service.app\n"
        "r = cxr.reader.Reader.load(sys.argv[1], device='cpu')\n"
        # a smooth gradient passes the gate's cheap checks, so its network runs too
        "image = np.add.outer(np.linspace(0, .5, 40), np.linspace(0, .5, 48)).astype(np.float32)\n"
        "r(image); r.localise(image, r.targets[:1])\n"
        "print(sorted(m for m in sys.modules if m == 'cxr.training' or m.startswith('cxr.training.')))\n")
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    out = subprocess.run([sys.executable, "-c", code, str(tiny_run)], capture_output=True, text=True,
                         env=env, cwd=ROOT, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip().splitlines()[-1] == "[]"


# Writes that are not data files: a lock file (its content is never read) and an upload spooled
# to a private temporary file for decoding.
NOT_DATA = {("cxr/training/pipeline.py", "open"), ("cxr/service/app.py", "fdopen")}


def test_files_are_written_through_atomic():
    """No module but cxr/atomic.py writes a file by name: `write_text`, `write_bytes`, or
    `open(..., "w"/"a")`, except into a temporary from `cxr.atomic.replacing` (which is also
    what writers that take a path, such as PIL's save, are given)."""
    offenders = []
    for f in PACKAGE.rglob("*.py"):
        rel = f.relative_to(ROOT).as_posix()
        if rel == "cxr/atomic.py":
            continue
        tree = ast.parse(f.read_text())
        temporaries = {item.optional_vars.id for node in ast.walk(tree) if isinstance(node, ast.With)
                       for item in node.items if isinstance(item.optional_vars, ast.Name)
                       and isinstance(item.context_expr, ast.Call)
                       and getattr(item.context_expr.func, "id", "") == "replacing"}
        for node in ast.walk(tree):
            if not isinstance(node, ast.Call):
                continue
            fn = node.func
            name = fn.attr if isinstance(fn, ast.Attribute) else getattr(fn, "id", "")
            if name in ("write_text", "write_bytes"):
                offenders.append(f"{rel}:{node.lineno} {name}")
            elif name in ("open", "fdopen") and (rel, name) not in NOT_DATA and not (
                    node.args and isinstance(node.args[0], ast.Name) and node.args[0].id in temporaries):
                mode = node.args[1] if len(node.args) > 1 else next(
                    (k.value for k in node.keywords if k.arg == "mode"), None)
                if isinstance(mode, ast.Constant) and isinstance(mode.value, str) and set(mode.value) & set("wax+"):
                    offenders.append(f"{rel}:{node.lineno} {name}(..., {mode.value!r})")
    assert offenders == []


def test_run_spec_and_evaluate_help_need_no_torch():
    """Reading a run's spec (and `cxr evaluate -h`) imports neither torch nor the training code."""
    code = ("import sys, cxr.runspec, cxr.commands.evaluate\n"
            "print(sorted(m for m in ('torch', 'cxr.training') if m in sys.modules))\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         env={**os.environ, "PYTHONPATH": str(ROOT)}, cwd=ROOT, timeout=60)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "[]"


def test_benchmarks_import_names_the_package_has():
    """Every `from cxr... import name` in benchmarks/ resolves (a moved function breaks them
    without any test importing them)."""
    import importlib

    missing = []
    for f in sorted((ROOT / "benchmarks").glob("*.py")):
        for node in ast.walk(ast.parse(f.read_text())):
            if isinstance(node, ast.ImportFrom) and node.level == 0 and (node.module or "").split(".")[0] == "cxr":
                module = importlib.import_module(node.module)
                for alias in node.names:
                    if not hasattr(module, alias.name):
                        try:
                            importlib.import_module(f"{node.module}.{alias.name}")
                        except ImportError:
                            missing.append(f"{f.name}: {node.module}.{alias.name}")
    assert missing == []

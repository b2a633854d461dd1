"""The `cxr` entry point: command table, one-line errors for what the OS refuses."""
from __future__ import annotations

import subprocess
import sys

import numpy as np

from cxr.cli import COMMANDS, main
from cxr.results import DetectedFinding, Result


def test_every_command_has_help(capsys):
    assert main([]) == 0
    listed = capsys.readouterr().out
    assert all(name in listed for name in COMMANDS)


def _run_command(body: str) -> subprocess.CompletedProcess:
    """Run `cxr x` where command x's run() is `body`, in a fresh interpreter."""
    code = (
        "import sys, types; from cxr import cli\n"
        f"def run(args):\n    {body}\n"
        "m = types.ModuleType('m'); m.configure = lambda p: None; m.run = run\n"
        "sys.modules['m'] = m; cli.COMMANDS['x'] = ('m', 'test')\n"
        "sys.exit(cli.main(['x']))\n"
    )
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)


def test_os_error_is_one_line():
    """A path the OS refuses (a file used as a folder) is one line naming it, exit 2."""
    proc = _run_command("raise NotADirectoryError(20, 'Not a directory', '/tmp/a_file/out')")
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode == 2 and lines == ["cxr x: error: /tmp/a_file/out: Not a directory"]


def test_broken_pipe_is_quiet():
    """`cxr search ... | head` must not end in a traceback."""
    proc = _run_command("raise BrokenPipeError()")
    assert proc.returncode == 0 and "Traceback" not in proc.stderr


def test_result_repr_is_short():
    r = Result(scores={"Opacity": 0.9, "normal": 0.1},
               findings=[DetectedFinding("Opacity", 0.9, "opacity lung base left")],
               embedding=np.zeros(1024, np.float32), model_id="m")
    assert len(repr(r)) < 200 and "Opacity 0.90" in repr(r)

"""The `cxr` entry point: command table, one-line errors for what the OS refuses."""
from __future__ import annotations

import re
import subprocess
import sys

import numpy as np
import pytest

from cxr.cli import COMMANDS, main
from cxr.results import DetectedFinding, Result


# What the README promises of each command: its positional arguments and options. Written out here,
# not taken from the code, so that a command that loses an option, or a new command with no entry,
# fails.
PROMISED = {
    "demo": ["--out", "--quick", "--backbone", "--device"],
    "fetch": ["NAME", "--path", "--force", "--list"],
    "mine": ["reports", "--json", "--text"],
    "labels": ["reports", "--json", "--min-count", "--parts"],
    "simulate": ["--out", "--n", "--size", "--seed", "--workers", "--dicom", "--masks", "--ct", "--labels",
                 "--reports", "--terms", "--normal-share", "--geometry"],
    "train": ["--data", "--out", "--backbone", "--rnn", "--pretrained", "--min-cluster-members",
              "--images-per-cluster", "--data-dropout", "--class-weighted"],
    "evaluate": ["run", "--split", "--out", "--data"],
    "annotate": ["run", "images", "--json", "--overlay", "--beams", "--engine"],
    "export": ["run", "--onnx", "--out"],
    "check": ["images", "--json", "--views", "--gate"],
    "index": ["run", "source", "--db", "--ray", "--dicom-out", "--retry-failed", "--engine"],
    "search": ["--db", "--severity", "--min-score", "--and", "--like", "--limit", "--json", "--failed"],
    "serve": ["run", "--db", "--port", "--host", "--engine", "--tokens", "--tls-cert", "--tls-key",
              "--audit-log"],
    "listen": ["run", "--ae-title", "--port", "--allow", "--send-to", "--db", "--spool"],
}


def test_the_command_list_names_every_command(capsys):
    assert set(PROMISED) == set(COMMANDS)
    assert main([]) == 0
    listed = capsys.readouterr().out
    for name in PROMISED:
        assert f"\n  {name} " in listed, name


@pytest.mark.parametrize("name", sorted(PROMISED))
def test_command_help(name, capsys):
    """`cxr NAME -h` exits 0 and prints a usage line, a description and every promised option."""
    with pytest.raises(SystemExit) as done:
        main([name, "-h"])
    assert done.value.code == 0
    text = capsys.readouterr().out
    assert text.startswith(f"usage: cxr {name} ") and "\noptions:\n" in text
    assert COMMANDS[name][1] in " ".join(text.split())
    missing = [arg for arg in PROMISED[name]
               if not re.search(rf"^\s+{arg}( |,|$)" if arg.startswith("--") else rf"\b{arg}\b", text, re.M)]
    assert not missing, f"cxr {name} -h lacks {missing}"


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

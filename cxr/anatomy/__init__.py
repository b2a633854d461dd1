"""Heart and lungs on a frontal chest film (`AnatomyModel`): where a finding of a whole organ is.

A class map says where the evidence for Cardiomegaly lies (often one heart border), not where the
heart is, so its box was a small square inside the heart. Findings of a whole organ are boxed
from this model's masks instead: the heart's extent for Cardiomegaly, both lungs' for hyper- and
hypoinflation and emphysema (`ORGAN_OF_FINDING`), and the heart and thorax widths give the
cardiothoracic ratio. The network is trained on the CT phantom's own organ masks (no film is
labelled by hand), see `cxr/anatomy/weights/MODEL_CARD.md` and `python -m cxr.anatomy.train`.
"""
from .model import (CTR_GRADES, ORGAN_OF_FINDING, ORGANS, AnatomyModel, Organs, grade_of_ratio,
                    graded_by_measurement, organ_of)

__all__ = ["AnatomyModel", "Organs", "ORGANS", "ORGAN_OF_FINDING", "CTR_GRADES", "grade_of_ratio",
           "graded_by_measurement", "organ_of"]

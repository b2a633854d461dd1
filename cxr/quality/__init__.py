"""The quality gate: is this a chest radiograph, which view, which way up, before reading it.

`checks` are cheap tests on the pixels (size, aspect, colour, blank, grey levels, noise); `model`
is the small network that answers kind / rotation / polarity / mirroring with calibrated
probabilities; `gate` turns both into a decision (`QualityGate`, `QualityReport`).
"""

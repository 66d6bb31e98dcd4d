"""Saliency of the classification branch at inference (``--saliency true``): maps, their write-out on the
T1C grid, a PNG report per case and an index page (docs/saliency.md)."""

from .maps import (
    DEFAULT_LAYER,
    METHODS,
    AllTaskProbs,
    SaliencyMaps,
    randomised_copy,
    scale_to_unit,
)
from .transforms import SaliencyMapsd, saliency_key, saliency_postprocessing, saliency_tasks
from .writer import SaliencyWriter, saliency_handlers

__all__ = ["DEFAULT_LAYER", "METHODS", "AllTaskProbs", "SaliencyMaps", "SaliencyMapsd", "SaliencyWriter",
           "randomised_copy", "saliency_handlers", "saliency_key", "saliency_postprocessing",
           "saliency_tasks", "scale_to_unit"]

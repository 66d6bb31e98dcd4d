"""The IGReg multi-task network (`IGRegNet`, the bundle's `network_def`) and its parts."""

from scripts.networks.igreg_net import ClassificationBranch, IGRegNet, MultiScaleNeck, SegmentationDecoder
from scripts.networks.outputs import HeadOutput
from scripts.networks.reference_weights import load_reference_surrogate_weights, load_reference_weights

__all__ = ["IGRegNet", "MultiScaleNeck", "ClassificationBranch", "SegmentationDecoder", "load_reference_weights",
           "load_reference_surrogate_weights", "HeadOutput"]

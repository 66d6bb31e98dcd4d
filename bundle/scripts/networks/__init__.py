"""The IGReg multi-task network (`IGRegNet`, the bundle's `network_def`) and its parts."""

from scripts.networks.igreg_net import ClassificationBranch, IGRegNet, MultiScaleNeck, SegmentationDecoder

__all__ = ["IGRegNet", "MultiScaleNeck", "ClassificationBranch", "SegmentationDecoder"]

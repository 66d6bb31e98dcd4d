"""The saliency step of inference.yaml's post-processing: maps on the network's grid, then on the T1C
file's own grid through the same `Invertd` path as the predicted mask (trilinear for the maps)."""

from __future__ import annotations

from typing import Any, Hashable, Mapping, Sequence

import torch
from monai.data import MetaTensor
from monai.transforms import Compose, Identity, Invertd, MapTransform
from torch import nn

from scripts.options import OptionError

from .maps import DEFAULT_LAYER, METHODS, SaliencyMaps

VIEW_KEY = "saliency_view"  # the report's data on the network's grid: image, mask, maps


def saliency_key(task: str) -> str:
    """The post-processing key of a task's map (`saliency_<task>`)."""
    return f"saliency_{task}"


class SaliencyMapsd(MapTransform):
    """Per case: `saliency_<task>` = the task's map [1, *S] on the network's (preprocessed) grid, with the
    image's transform trace so that `Invertd` maps it back; `saliency_view` = {image, mask, maps} on that
    grid for the report (on the CPU)."""

    def __init__(self, maps: SaliencyMaps, image_key: str = "image") -> None:
        super().__init__(image_key)
        self.maps = maps

    def __call__(self, data: Mapping[Hashable, Any]) -> dict:
        d = dict(data)
        image = d[self.keys[0]]
        device = next(self.maps.network.parameters()).device
        maps, classes, seg = self.maps(torch.as_tensor(image).as_subclass(torch.Tensor)[None].to(device))
        for task, m in maps.items():
            d[saliency_key(task)] = MetaTensor(m[0].to(image.device), meta=dict(getattr(image, "meta", {})))
        d[VIEW_KEY] = {"image": torch.as_tensor(image).as_subclass(torch.Tensor).detach().float().cpu(),
                       "mask": seg[0].argmax(0).cpu().to(torch.uint8),
                       "maps": {t: m[0, 0].cpu() for t, m in maps.items()}, "classes": classes}
        return d


def saliency_tasks(tasks: Sequence[str], enabled: bool, method: str = "gradcam") -> list[str]:
    """The tasks that get maps: all of them with ``--saliency``, none without; an unknown method is refused
    here, before the output folder is prepared."""
    if enabled and method not in METHODS:
        raise OptionError(f"option --saliency_method must be one of {', '.join(METHODS)}, got {method!r}")
    return list(tasks) if enabled else []


def saliency_postprocessing(network: nn.Module, tasks: Sequence[str], preprocessing: Any, enabled: bool,
                            method: str = "gradcam", layer: str = DEFAULT_LAYER,
                            occlusion: Mapping | None = None, image_key: str = "image") -> Any:
    """The saliency transforms for inference.yaml's post-processing when `enabled` (``--saliency``), else
    MONAI's `Identity` (no saliency work, no maps)."""
    if not enabled:
        return Identity()
    keys = [saliency_key(t) for t in tasks]
    return Compose([
        SaliencyMapsd(SaliencyMaps(network, tasks, method, layer, occlusion), image_key),
        Invertd(keys, transform=preprocessing, orig_keys=image_key, nearest_interp=False, to_tensor=True),
    ])

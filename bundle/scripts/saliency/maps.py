"""Per-task saliency maps of the classification branch: Grad-CAM, Grad-CAM++ (MONAI's `GradCAM`,
`GradCAMpp`) or occlusion sensitivity (MONAI's `OcclusionSensitivity`), each scaled to [0, 1].

IGRegNet returns a dict of heads; `scripts.networks.HeadOutput` shows a CAM one task's logits at a time
(its `head` set per task, so one set of CAM hooks serves every task) and
:class:`AllTaskProbs` shows the occlusion one vector of every task's class probabilities.
"""

from __future__ import annotations

import copy
import warnings
from contextlib import contextmanager
from typing import Dict, Iterator, List, Mapping, Sequence

import torch
from monai.data import MetaTensor
from monai.visualize import GradCAM, GradCAMpp, OcclusionSensitivity
from torch import Tensor, nn

from scripts.networks import HeadOutput

METHODS = ("gradcam", "gradcampp", "occlusion")
DEFAULT_LAYER = "classifier.spatial"  # IGRegNet's last spatial map of the classification branch (docs/saliency.md)


class AllTaskProbs(nn.Module):
    """The class probabilities of every task, concatenated: [B, sum of the tasks' classes]."""

    def __init__(self, network: nn.Module, tasks: Sequence[str]) -> None:
        super().__init__()
        self.network = network
        self.tasks = list(tasks)

    def forward(self, x: Tensor) -> Tensor:
        out = self.network(x)
        return torch.cat([out[t].float().softmax(-1) for t in self.tasks], -1)


def scale_to_unit(maps: Tensor) -> Tensor:
    """Each map of [B, 1, *S] divided by its maximum (zero stays zero; an all-zero map stays zero).

    MONAI's default CAM post-processing maps (min, max) to (1, 0), flipping the magnitudes; a map here
    keeps "more" meaning "more evidence"."""
    peak = maps.flatten(1).amax(1).clamp_min(1e-12).view(-1, *[1] * (maps.ndim - 1))
    return (maps.clamp_min(0) / peak).float()


@contextmanager
def frozen_until(network: nn.Module, layer: nn.Module) -> Iterator[None]:
    """Within the block, no parameter of `network` records gradients and the input of `layer` starts a
    fresh graph: a CAM's backward pass runs only from the logits back to `layer`, not through the
    encoder (whose gradients a CAM does not use)."""
    flags = [(p, p.requires_grad) for p in network.parameters()]
    for p, _ in flags:
        p.requires_grad_(False)
    handle = layer.register_forward_pre_hook(
        lambda _m, args: tuple(a.detach().requires_grad_(True) if torch.is_tensor(a) else a for a in args))
    try:
        yield
    finally:
        handle.remove()
        for p, flag in flags:
            p.requires_grad_(flag)


class SaliencyMaps:
    """`maps(image[1, C, *S])` -> ({task: map [1, 1, *S] in [0, 1]}, {task: predicted class}, seg logits).

    Each task's map explains its predicted class. `method` is one of :data:`METHODS`; `layer` the
    module (name in `network.named_modules()`) whose output a CAM weighs; `occlusion` holds the
    keyword arguments of MONAI's `OcclusionSensitivity` (mask_size, overlap, n_batch, mode). An
    occlusion map is the drop of the predicted class's probability when the region around a voxel
    is occluded (rises are set to 0)."""

    def __init__(self, network: nn.Module, tasks: Sequence[str], method: str = "gradcam",
                 layer: str = DEFAULT_LAYER, occlusion: Mapping | None = None) -> None:
        if method not in METHODS:
            raise ValueError(f"saliency_method must be one of {', '.join(METHODS)}, got {method!r}")
        self.network, self.tasks, self.method, self.layer = network, list(tasks), method, layer
        modules = dict(network.named_modules())
        if method != "occlusion" and layer not in modules:
            raise ValueError(f"saliency_layer {layer!r} is not a module of {type(network).__name__}")
        self.target = modules.get(layer)
        self.occlusion = {"mask_size": 16, "overlap": 0.5, "n_batch": 4, "mode": "gaussian", **(occlusion or {})}
        self._wrapper = HeadOutput(network, self.tasks[0])
        self._cam = None
        if method != "occlusion":
            cam_class = GradCAM if method == "gradcam" else GradCAMpp
            hooks = (set(self.target._forward_hooks), set(self.target._backward_hooks))
            self._cam = cam_class(self._wrapper, target_layers=f"network.{layer}", postprocessing=scale_to_unit)
            self._hooks = (set(self.target._forward_hooks) - hooks[0], set(self.target._backward_hooks) - hooks[1])

    def close(self) -> None:
        """Remove the CAM's hooks from the network (MONAI's `ModelWithHooks` keeps no handles); the maps
        cannot be computed afterwards."""
        if self._cam is not None:
            for key in self._hooks[0]:
                self.target._forward_hooks.pop(key, None)
            for key in self._hooks[1]:
                self.target._backward_hooks.pop(key, None)
            self._cam = None

    def __call__(self, image: Tensor) -> tuple[Dict[str, Tensor], Dict[str, int], Tensor]:
        x = torch.as_tensor(image).float()
        was_training = self.network.training
        self.network.eval()
        try:
            with torch.no_grad():
                out = self.network(x)
            classes = {t: int(out[t].argmax(-1)[0]) for t in self.tasks}
            maps = self._occlusion(x, out, classes) if self.method == "occlusion" else self._cams(x, classes)
        finally:
            self.network.train(was_training)
        return maps, classes, out["seg"]

    def _cams(self, x: Tensor, classes: Mapping[str, int]) -> Dict[str, Tensor]:
        if self._cam is None:
            raise RuntimeError("SaliencyMaps was closed")
        maps: Dict[str, Tensor] = {}
        with torch.enable_grad(), frozen_until(self.network, self.target):
            for task in self.tasks:
                self._wrapper.head = task
                maps[task] = self._cam(x, class_idx=classes[task]).detach()
        return maps

    def _occlusion(self, x: Tensor, out: Mapping[str, Tensor], classes: Mapping[str, int]) -> Dict[str, Tensor]:
        probs = AllTaskProbs(self.network, self.tasks)
        sens = OcclusionSensitivity(probs, verbose=False, activate=False, **self.occlusion)
        with torch.no_grad(), warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)  # MONAI's indexing with lists, deprecated in torch 2.9
            occluded, _ = sens(x)  # [1, N, *S]: the probabilities with the region around each voxel occluded
        occluded = occluded.as_tensor() if isinstance(occluded, MetaTensor) else occluded
        maps: Dict[str, Tensor] = {}
        offset = 0
        for task in self.tasks:
            column = offset + classes[task]
            p = out[task].float().softmax(-1)[0, classes[task]]
            maps[task] = scale_to_unit(p - occluded[:, column:column + 1])
            offset += out[task].shape[-1]
        return maps


def randomised_copy(network: nn.Module, seed: int = 0, layers: List[str] | None = None) -> nn.Module:
    """A copy of `network` whose parameters (all, or those of the submodules whose names start with one of
    `layers`) are re-drawn from their initialisers: the model-randomisation test of Adebayo et al. (2018)."""
    clone = copy.deepcopy(network)
    torch.manual_seed(seed)
    targets = [m for n, m in clone.named_modules() if layers is None or any(n.startswith(x) for x in layers)]
    for module in targets:
        if hasattr(module, "reset_parameters") and module is not clone:
            module.reset_parameters()
    return clone

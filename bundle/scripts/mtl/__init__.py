"""Multi-task training strategies behind one interface, one module per method (in the style of LibMTL's
`weighting/`): `base` (the interface `MTLStrategy`, the batch layout, the update guard), `equal`, `igreg`,
`uncertainty`, `pcgrad` and `cagrad` (the last two on `surgery`, with the helpers of `gradients`).

This package holds the registry: `STRATEGIES` (name -> builder) and `build_strategy`. It imports the method
modules; they import `base` (and `gradients`, `surgery`), never this package.
"""

from __future__ import annotations

from typing import Callable

import torch

from scripts.mtl.base import MTLStrategy, OptimizerFactory
from scripts.mtl.cagrad import CAGrad
from scripts.mtl.equal import EqualWeighting
from scripts.mtl.igreg import IGReg
from scripts.mtl.pcgrad import PCGrad
from scripts.mtl.uncertainty import UncertaintyOnly
from scripts.networks import IGRegNet

__all__ = ["STRATEGIES", "build_strategy", "MTLStrategy", "EqualWeighting", "IGReg", "UncertaintyOnly", "PCGrad",
           "CAGrad"]


def _igreg(**switches: bool) -> Callable[..., MTLStrategy]:
    def build(network: IGRegNet, optimizer: OptimizerFactory, amp: bool, igreg: dict) -> MTLStrategy:
        return IGReg(network, optimizer, amp, **{**igreg, **switches})
    return build


# name -> builder(network, optimizer, amp, igreg options); other strategies register here
STRATEGIES: dict[str, Callable[..., MTLStrategy]] = {
    "igreg": _igreg(),
    "igreg_no_dpa": _igreg(use_dpa=False),
    "igreg_no_stdgp": _igreg(use_stdgp=False),
    "equal": lambda network, optimizer, amp, igreg: EqualWeighting(network, optimizer, amp),
    "uncertainty": lambda network, optimizer, amp, igreg: UncertaintyOnly(network, optimizer, amp),
    "pcgrad": lambda network, optimizer, amp, igreg: PCGrad(network, optimizer, amp),
    "cagrad": lambda network, optimizer, amp, igreg: CAGrad(network, optimizer, amp),
}


def build_strategy(name: str, network: IGRegNet, optimizer: OptimizerFactory, amp: bool = False,
                   igreg: dict | None = None, channels_last: bool = False) -> MTLStrategy:
    """The strategy called `name` (a key of `STRATEGIES`); `igreg` holds the IGReg options.
    `channels_last` stores every 3D convolution weight of the strategy (network, surrogates,
    prototype projection) channels-last, which the convolutions then also use for their outputs:
    the same model, faster on CPU (oneDNN) and with AMP on GPU."""
    if name not in STRATEGIES:
        raise ValueError(f"unknown strategy {name!r}; known: {sorted(STRATEGIES)}")
    strategy = STRATEGIES[name](network, optimizer, amp, dict(igreg or {}))
    if channels_last:
        strategy.to(memory_format=torch.channels_last_3d)  # in place: the optimizers keep their parameters
    return strategy

"""Fixture sections for the network: the reference `Backbone`'s eval-mode outputs."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import torch
from parity.registry import save, section
from parity.seeded import pack_names_and_shapes, seeded_input, seeded_state

BACKBONE = {"weight_seed": 11, "input_seed": 12, "batch": 2, "size": (32, 32, 48)}


@section("backbone")
def backbone(ref: SimpleNamespace, out_dir: Path) -> None:
    """Classification logits of every task (`predictcls`) and the tumor probability (`predictseg`)
    of the reference `Backbone` (num_channels 24) with seeded weights, in eval mode."""
    net = ref.Backbone_IGReg.Backbone(n_classes=2, num_channels=24).eval()
    state = seeded_state([(k, v.shape) for k, v in net.state_dict().items()], BACKBONE["weight_seed"])
    net.load_state_dict(state)
    x = seeded_input((BACKBONE["batch"], 2, *BACKBONE["size"]), BACKBONE["input_seed"])
    with torch.no_grad():
        logits = torch.stack([net.predictcls(x, t) for t in range(3)])
        prob = net.predictseg(x)[:, 1]
    save(out_dir, "backbone", logits=logits, tumor_prob=prob, input_sum=x.double().sum(),
         weight_seed=BACKBONE["weight_seed"], input_seed=BACKBONE["input_seed"], size=BACKBONE["size"],
         **pack_names_and_shapes(state))

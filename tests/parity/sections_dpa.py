"""Fixture sections for DPA, from the reference's `IGReg_utiles` and `kmeans_pytorch`: the directed
margin and heterogeneity losses, the alignment loss on fixed voxels and its sample count, and the
prototypes' k-means."""

from __future__ import annotations

import importlib
from pathlib import Path
from types import SimpleNamespace

import torch
from parity.registry import save, section

DPA = {"seed": 51, "dim": 8, "nc_neg": 3, "nc_pos": 2, "m": 0.5, "size": (6, 5, 4), "align_voxels": 40}
ALIGN_COUNT = {"grid": (3, 4, 5), "stride": 4}
KMEANS = {"seed": 52, "points": 240, "dim": 8, "k": 3, "init_seed": 7}


def _bank(ref: SimpleNamespace, gen: torch.Generator):
    """The reference's PropCluster with distinct, non-normalised prototypes (as after its k-means)."""
    prop = ref.IGReg_utiles.PropCluster(nc_pos=DPA["nc_pos"], nc_neg=DPA["nc_neg"], m=DPA["m"], dim_proj=DPA["dim"])
    with torch.no_grad():
        prop.Clusterfunction.cluster.copy_(2 * torch.randn(DPA["nc_neg"] + DPA["nc_pos"], DPA["dim"], generator=gen))
    return prop


@section("dpa_losses")
def dpa_losses(ref: SimpleNamespace, out_dir: Path) -> None:
    """Margin and heterogeneity of one labelled volume, and the alignment of a fixed set of voxels."""
    gen = torch.Generator().manual_seed(DPA["seed"])
    prop = _bank(ref, gen)
    feats = torch.randn(1, DPA["dim"], *DPA["size"], generator=gen)
    mask = (torch.rand(1, *DPA["size"], generator=gen) > 0.6).long()
    onehot = torch.stack((1 - mask, mask), 1).float()
    ce, dice = torch.nn.CrossEntropyLoss(), ref.loss_utiles.SoftDiceLoss(smooth=1e-5, do_bg=False)
    margin, het = prop.get_margin_het_loss(feats, onehot, ce, dice)
    voxels = torch.randn(DPA["align_voxels"], DPA["dim"], generator=gen)
    align = prop.Clusterfunction(voxels, ce)
    save(out_dir, "dpa_losses", prototypes=prop.Clusterfunction.cluster, feats=feats, mask=mask, margin=margin,
         heterogeneity=het, voxels=voxels, align=align, m=DPA["m"], temperature=prop.Clusterfunction.T,
         nc_neg=DPA["nc_neg"], nc_pos=DPA["nc_pos"])


@section("align_count")
def align_count(ref: SimpleNamespace, out_dir: Path) -> None:
    """How many voxels the reference's alignment draws from a pair brought to full resolution
    (stride-4 grid upsampled by 4 per axis), counted in the call that computes the loss."""
    gen = torch.Generator().manual_seed(DPA["seed"] + 1)
    prop = _bank(ref, gen)
    full = [ALIGN_COUNT["stride"] * s for s in ALIGN_COUNT["grid"]]
    pair = torch.nn.functional.interpolate(torch.randn(2, DPA["dim"], *ALIGN_COUNT["grid"], generator=gen),
                                           size=full, mode="trilinear", align_corners=True)
    seen = []
    forward = prop.Clusterfunction.forward
    prop.Clusterfunction.forward = lambda emb, loss: seen.append(emb.shape[0]) or forward(emb, loss)
    prop.get_cluster_loss(pair, torch.nn.CrossEntropyLoss())
    save(out_dir, "align_count", grid=ALIGN_COUNT["grid"], stride=ALIGN_COUNT["stride"], samples=seen[0])


@section("kmeans")
def kmeans(ref: SimpleNamespace, out_dir: Path) -> None:
    """`kmeans_pytorch.kmeans` (Euclidean, seeded start) on three noisy clusters of raw features;
    the start's point indices are recovered from its `initialize`."""
    module = importlib.import_module("model.kmeans_pytorch")
    gen = torch.Generator().manual_seed(KMEANS["seed"])
    centers = 3 * torch.randn(KMEANS["k"], KMEANS["dim"], generator=gen)
    x = torch.cat([c + torch.randn(KMEANS["points"] // KMEANS["k"], KMEANS["dim"], generator=gen) for c in centers])
    start = module.initialize(x, KMEANS["k"], seed=KMEANS["init_seed"])
    init = torch.stack([torch.nonzero((x == row).all(1)).flatten()[0] for row in start])
    _, result = module.kmeans(X=x, num_clusters=KMEANS["k"], distance="euclidean", device=torch.device("cpu"),
                              tqdm_flag=False, seed=KMEANS["init_seed"])
    save(out_dir, "kmeans", x=x, init=init, centers=result)

"""DPA against the reference's `PropCluster` / `Clusterfunction` and `kmeans_pytorch`: the directed
margin and heterogeneity losses, the alignment loss on fixed voxels, the alignment's sample count
and the prototypes' k-means."""

import torch
from parity.registry import load

from scripts.dpa import PrototypeBank, kmeans_reference


def bank_of(fx: dict) -> PrototypeBank:
    prototypes = torch.from_numpy(fx["prototypes"])
    bank = PrototypeBank(in_channels=1, dim=prototypes.shape[1], nc_neg=int(fx["nc_neg"]), nc_pos=int(fx["nc_pos"]),
                         temperature=float(fx["temperature"]), margin=float(fx["m"]))
    bank.prototypes.data = prototypes
    return bank


def test_margin_and_heterogeneity_match_reference_at_one_resolution():
    fx = load("dpa_losses")
    bank = bank_of(fx)
    tumor = torch.from_numpy(fx["mask"]).float()[:, None]
    margin, het = bank.margin_heterogeneity(torch.from_numpy(fx["feats"]), tumor)
    torch.testing.assert_close(margin, torch.tensor(float(fx["margin"])), rtol=1e-5, atol=0)
    torch.testing.assert_close(het, torch.tensor(float(fx["heterogeneity"])), rtol=1e-5, atol=1e-7)
    assert 0.05 < float(fx["heterogeneity"]) < 0.95 and float(fx["margin"]) > 1     # neither term saturated


def test_alignment_of_fixed_voxels_matches_reference():
    fx = load("dpa_losses")
    align = bank_of(fx).infonce(torch.from_numpy(fx["voxels"]))
    torch.testing.assert_close(align, torch.tensor(float(fx["align"])), rtol=1e-5, atol=0)


def test_alignment_draws_as_many_samples_as_the_reference():
    """The reference draws 1/64 of the pair's full-resolution voxels; the bundle, at stride 4, uses
    every grid voxel of the pair once: the same count."""
    fx = load("align_count")
    grid, stride = [int(s) for s in fx["grid"]], int(fx["stride"])
    bank = PrototypeBank(in_channels=1, dim=8, nc_neg=2, nc_pos=2)
    seen = []
    bank.infonce = lambda feats: seen.append(feats.shape[0]) or feats.sum()
    bank.alignment_loss(torch.randn(2, 8, *grid), 1 / 64, upsampling=stride ** 3)
    assert seen == [int(fx["samples"])]


def test_kmeans_from_the_same_start_reaches_the_reference_centers():
    fx = load("kmeans")
    x, init = torch.from_numpy(fx["x"]), torch.from_numpy(fx["init"])
    centers = kmeans_reference(x, init.numel(), init=init)
    torch.testing.assert_close(centers, torch.from_numpy(fx["centers"]), rtol=1e-5, atol=1e-5)
    assert centers.norm(dim=1).min() > 2                           # raw centers, not normalised

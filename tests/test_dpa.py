"""DPA: k-means initialisation, mask to feature grid, and the three prototype losses."""

import pytest
import torch
import torch.nn.functional as F

from scripts.dpa import PrototypeBank, VoxelPool, kmeans_reference, kmeans_spherical, mask_to_grid


def two_clusters(n=200, dim=8, seed=0):
    gen = torch.Generator().manual_seed(seed)
    a = torch.randn(n, dim, generator=gen) * 0.1 + 3 * torch.eye(dim)[0]
    b = torch.randn(n, dim, generator=gen) * 0.1 - 3 * torch.eye(dim)[0]
    return a, b


@pytest.mark.parametrize("kmeans", [kmeans_reference, kmeans_spherical])
def test_kmeans_separates_two_clusters(kmeans):
    torch.manual_seed(0)
    a, b = two_clusters()
    centers = kmeans(torch.cat((a, b)), 2)
    assign = torch.cdist(F.normalize(torch.cat((a, b)), dim=1), F.normalize(centers, dim=1)).argmin(1)
    assert assign[:200].unique().numel() == 1 and assign[200:].unique().numel() == 1
    assert assign[0] != assign[-1]
    expected = a.mean(0) if kmeans is kmeans_reference else F.normalize(F.normalize(a, dim=1).mean(0), dim=0)
    torch.testing.assert_close(centers[assign[0]], expected)


@pytest.mark.parametrize("kmeans", [kmeans_reference, kmeans_spherical])
def test_kmeans_with_fewer_points_than_clusters(kmeans):
    centers = kmeans(torch.randn(2, 4), 5)
    assert centers.shape == (5, 4) and torch.isfinite(centers).all()


def test_reference_kmeans_keeps_raw_centers_and_starts_from_the_given_points():
    x = torch.tensor([[0.0, 0.0], [0.0, 2.0], [10.0, 0.0], [10.0, 2.0], [5.0, 100.0]])
    centers = kmeans_reference(x, 2, init=torch.tensor([0, 4]))
    torch.testing.assert_close(centers, torch.tensor([[5.0, 1.0], [5.0, 100.0]]))
    centers = kmeans_reference(x, 2, init=torch.tensor([0, 1]))      # another start: still a fixed point
    assign = torch.cdist(x, centers).argmin(1)
    torch.testing.assert_close(centers, torch.stack([x[assign == c].mean(0) for c in range(2)]))


@pytest.mark.parametrize("method", ["reference", "spherical"])
def test_prototype_initialisation_follows_the_super_classes(method):
    torch.manual_seed(0)
    tumor, background = two_clusters(dim=16)
    bank = PrototypeBank(in_channels=4, dim=16, nc_neg=3, nc_pos=2)
    assert not bank.initialized
    bank.initialize(3 * tumor, background, method)
    assert bank.initialized
    cos = bank.cosine(torch.cat((tumor, background)))
    nearest = cos.argmax(1)
    assert (nearest[:200] >= 3).all() and (nearest[200:] < 3).all()
    norms = bank.prototypes.norm(dim=1)
    if method == "spherical":
        torch.testing.assert_close(norms, torch.ones(5))
    else:                                                    # the features' own scale, as in the reference
        assert (norms[3:] > 8).all() and (norms[:3] < 4).all()
    with pytest.raises(ValueError, match="k-means method"):
        bank.initialize(tumor, background, "kmedoids")


def test_voxel_pool_splits_and_caps():
    pool = VoxelPool(cap=10)
    z = torch.randn(2, 3, 4, 4, 4)
    tumor = torch.zeros(2, 1, 4, 4, 4)
    tumor[0, 0, :2] = 1.0
    pool.add(z, tumor)
    assert pool.tumor[0].shape == (10, 3) and pool.background[0].shape == (10, 3)
    tumor_rows = z[0].flatten(1).t()[:32]
    assert all((tumor_rows == v).all(1).any() for v in pool.tumor[0])


def test_mask_to_grid_gives_tumor_fraction():
    mask = torch.zeros(1, 1, 8, 8, 8)
    mask[..., :4, :4, :2] = 1
    frac = mask_to_grid(mask, (2, 2, 2))
    assert frac.shape == (1, 1, 2, 2, 2)
    assert frac[0, 0, 0, 0, 0] == 0.5 and frac[0, 0, 1, 1, 1] == 0


def loop_margin_heterogeneity(bank, z, labels):
    """Plain per-pair reading of the design for a hard mask: z [B, D, *s], labels [B, *s] in {0, 1}."""
    vox = F.normalize(z.flatten(2).transpose(1, 2), dim=-1)
    cos = vox @ F.normalize(bank.prototypes, dim=1).t()
    y = labels.flatten(1).long()
    ce, dice = [], []
    for i in range(bank.nc_neg):
        for j in range(bank.nc_pos):
            logits = torch.stack((cos[..., i], cos[..., bank.nc_neg + j]), -1)
            logits = (logits - bank.margin * F.one_hot(y, 2)) / bank.temperature
            ce.append(F.cross_entropy(logits.reshape(-1, 2), y.reshape(-1)))
            p = logits.softmax(-1)[..., 1]
            dice.append(1 - ((2 * (p * y).sum(1) + 1e-5) / (p.sum(1) + y.sum(1) + 1e-5)).mean())
    return torch.stack(ce).mean(), torch.stack(dice).mean()


def test_vectorised_losses_match_the_pairwise_loop():
    torch.manual_seed(0)
    bank = PrototypeBank(in_channels=4, dim=8, nc_neg=3, nc_pos=4, temperature=0.1)
    z = torch.randn(2, 8, 4, 3, 5)
    labels = (torch.rand(2, 4, 3, 5) > 0.6).float()
    margin, het = bank.margin_heterogeneity(z, labels[:, None])
    ref_margin, ref_het = loop_margin_heterogeneity(bank, z, labels)
    torch.testing.assert_close(margin, ref_margin)
    torch.testing.assert_close(het, ref_het)


def test_alignment_loss_targets_the_nearest_prototype():
    torch.manual_seed(0)
    bank = PrototypeBank(in_channels=4, dim=8, nc_neg=2, nc_pos=2, temperature=0.5)
    bank.prototypes.data = F.normalize(torch.randn(4, 8), dim=1)     # distinct, as after k-means
    z = bank.prototypes.detach()[1][None, :, None, None, None].repeat(1, 1, 2, 2, 2)
    near = bank.alignment_loss(z, 1.0)
    far = bank.alignment_loss(-z + 0.3 * bank.prototypes.detach()[0][None, :, None, None, None], 1.0)
    assert near < far


@pytest.mark.parametrize("size", [(1, 1, 1), (4, 6, 2), (10, 12, 10)])
@pytest.mark.parametrize("fill", ["empty", "full", "partial"])
def test_losses_finite_and_differentiable_for_any_size(size, fill):
    torch.manual_seed(0)
    bank = PrototypeBank(in_channels=6)
    embedding = torch.randn(2, 6, *size, requires_grad=True)
    mask = torch.zeros(2, 1, *(4 * s for s in size))
    if fill == "full":
        mask += 1
    elif fill == "partial":
        mask[:, :, ::3] = 1
    z = bank.project(embedding)
    margin, het = bank.margin_heterogeneity(z[1:], mask_to_grid(mask[1:], size))
    align = bank.alignment_loss(z, 1 / 64)
    total = margin + het + align
    assert all(torch.isfinite(t) for t in (margin, het, align))
    total.backward()
    for grad in (embedding.grad, bank.prototypes.grad, bank.proj.weight.grad):
        assert grad is not None and torch.isfinite(grad).all()
    assert bank.prototypes.grad.abs().sum() > 0


def test_alignment_samples_the_reference_share_of_the_full_volume():
    """1/64 of the full-resolution voxels at stride 4 (64 voxels per feature voxel) is every feature
    voxel once: no random subset, the loss equals InfoNCE over the whole grid."""
    torch.manual_seed(0)
    bank = PrototypeBank(in_channels=4, dim=8, nc_neg=2, nc_pos=2, temperature=0.5)
    z = torch.randn(2, 8, 3, 4, 5)
    every_voxel = bank.infonce(z.flatten(2).transpose(1, 2).reshape(-1, 8))
    torch.testing.assert_close(bank.alignment_loss(z, 1 / 64, upsampling=64), every_voxel)
    torch.manual_seed(1)
    torch.testing.assert_close(bank.alignment_loss(z, 1 / 64, upsampling=64), every_voxel)


def test_alignment_with_a_smaller_share_samples_a_subset():
    bank = PrototypeBank(in_channels=4, dim=8, nc_neg=2, nc_pos=2, temperature=0.5)
    z = torch.randn(1, 8, 4, 4, 4)
    seen = []
    bank.infonce = lambda feats: seen.append(feats.shape[0]) or feats.sum()
    bank.alignment_loss(z, 1 / 64, upsampling=8)
    bank.alignment_loss(z, 1 / 64, upsampling=1)
    assert seen == [8, 1]

"""DPA, dynamic prototype alignment: a prototype bank over projected decoder features `M_t`.

Everything runs at the feature grid (stride 4): the segmentation mask is brought down to that grid
as a per-voxel tumor fraction instead of the projection being upsampled to full resolution, and
every (background prototype, tumor prototype) pair is handled in one batched computation.
"""

from __future__ import annotations

from typing import List, Sequence, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from scripts.objective import soft_dice


def mask_to_grid(mask: Tensor, size: Sequence[int]) -> Tensor:
    """Binary mask [B, 1, *S] -> tumor fraction of each feature voxel [B, 1, *size] (average pooling)."""
    return F.adaptive_avg_pool3d(mask.float(), list(size))


def voxels(x: Tensor) -> Tensor:
    """[B, C, *s] -> [B, V, C] (V = flattened space)."""
    return x.flatten(2).transpose(1, 2)


@torch.no_grad()
def kmeans_reference(x: Tensor, k: int, tol: float = 1e-4, max_iter: int = 1000, init: Tensor | None = None) -> Tensor:
    """Lloyd's k-means as the reference runs it (`kmeans_pytorch`, Euclidean): `k` distinct random
    points as the first centers (or the points `init` indexes), then alternate nearest-center
    assignment and per-cluster means until the summed center shift, squared, falls below `tol`; an
    empty cluster takes a random point. Raw (not normalised) points and centers. `x` [N, D] -> [k, D].
    `max_iter` bounds the loop (the reference has no bound). With fewer points than clusters, points
    are drawn with replacement."""
    x = x.float()
    n = x.shape[0]
    if n == 0:
        raise ValueError("k-means needs at least one point")
    if n < k:
        return x[torch.randint(n, (k,), device=x.device)]
    index = torch.randperm(n, device=x.device)[:k] if init is None else init.to(x.device)
    centers = x[index].clone()
    for _ in range(max_iter):
        assign = torch.cdist(x, centers).argmin(1)
        previous = centers.clone()
        for c in range(k):
            members = x[assign == c]
            centers[c] = members.mean(0) if members.shape[0] else x[torch.randint(n, (1,), device=x.device)][0]
        if torch.linalg.vector_norm(centers - previous, dim=1).sum() ** 2 < tol:
            break
    return centers


@torch.no_grad()
def kmeans_spherical(x: Tensor, k: int, iters: int = 30) -> Tensor:
    """Lloyd's k-means of L2-normalised points with k-means++ seeding and `iters` rounds; returns the
    normalised centers. `x` [N, D] -> [k, D]. With fewer points than clusters, points are drawn with
    replacement. An empty cluster keeps its previous center."""
    x = F.normalize(x.float(), dim=1)
    n = x.shape[0]
    if n == 0:
        raise ValueError("k-means needs at least one point")
    if n <= k:
        return x[torch.randint(n, (k,), device=x.device)] if n < k else x.clone()
    centers = x[torch.randint(n, (1,), device=x.device)]
    nearest = torch.cdist(x, centers).squeeze(1) ** 2
    for _ in range(1, k):
        pick = torch.multinomial(nearest + 1e-12, 1)
        centers = torch.cat((centers, x[pick]), 0)
        nearest = torch.minimum(nearest, (x - x[pick]).pow(2).sum(1))
    for _ in range(iters):
        assign = torch.cdist(x, centers).argmin(1)
        sums = torch.zeros_like(centers).index_add_(0, assign, x)
        counts = torch.bincount(assign, minlength=k).to(x.dtype)[:, None]
        centers = torch.where(counts > 0, sums / counts.clamp_min(1), centers)
    return F.normalize(centers, dim=1)


KMEANS = {"reference": kmeans_reference, "spherical": kmeans_spherical}


class PrototypeBank(nn.Module):
    """1x1x1 projection of `M_t` and `nc_neg` background + `nc_pos` tumor prototypes (rows of
    `prototypes`, background first). Similarities are cosines divided by `temperature`.

    As in the reference, the prototypes start all equal (ones): the margin and alignment losses then
    give the features no gradient, until `initialize` puts the k-means centers in their place.

    Args:
        in_channels: channels of `M_t`.
        dim: projection width.
        nc_neg, nc_pos: prototypes per super-class.
        temperature: cosine scaling.
        margin: subtracted from the true class's cosine in the directed margin loss.
    """

    def __init__(self, in_channels: int, dim: int = 64, nc_neg: int = 6, nc_pos: int = 6,
                 temperature: float = 0.01, margin: float = 0.5) -> None:
        super().__init__()
        self.proj = nn.Conv3d(in_channels, dim, 1)
        self.prototypes = nn.Parameter(torch.ones(nc_neg + nc_pos, dim))  # all equal until `initialize`
        self.register_buffer("initialized", torch.zeros((), dtype=torch.bool))
        self.nc_neg, self.nc_pos = nc_neg, nc_pos
        self.temperature, self.margin = temperature, margin

    def project(self, embedding: Tensor) -> Tensor:
        """`M_t` [B, C, *s] -> projected features [B, dim, *s] in float32."""
        return self.proj(embedding).float()

    def cosine(self, z: Tensor) -> Tensor:
        """Cosine of each feature vector [..., dim] with each prototype -> [..., K]."""
        return F.normalize(z, dim=-1) @ F.normalize(self.prototypes, dim=1).t()

    def alignment_loss(self, z: Tensor, fraction: float, upsampling: float = 1.0) -> Tensor:
        """Unsupervised InfoNCE (`infonce`) on sampled voxels of `z` [B, dim, *s].

        `fraction` is the share of the voxels of the full-resolution volume, which has `upsampling`
        voxels per feature voxel (64 for the stride-4 `M_t`). The reference draws that share of the
        voxels of the pair upsampled to the input size; each such voxel's feature is a trilinear mix of
        its neighbours on the feature grid, so 1/64 of the full volume at stride 4 is as many samples
        as the grid has voxels: the feature grid's voxels are then all used, once each. A smaller share
        draws a random subset of the grid's voxels.
        """
        flat = voxels(z).reshape(-1, z.shape[1])
        n = max(1, round(flat.shape[0] * fraction * upsampling))
        if n < flat.shape[0]:
            flat = flat[torch.randperm(flat.shape[0], device=z.device)[:n]]
        return self.infonce(flat)

    def infonce(self, feats: Tensor) -> Tensor:
        """InfoNCE of feature vectors [N, dim]: each vector's nearest prototype is its positive, every
        other prototype a negative (cosines over the temperature, mean cross-entropy)."""
        logits = self.cosine(feats) / self.temperature
        return F.cross_entropy(logits, logits.detach().argmax(1))

    def margin_heterogeneity(self, z: Tensor, tumor: Tensor) -> Tuple[Tensor, Tensor]:
        """Directed margin loss and heterogeneity Dice loss over all (background i, tumor j) pairs.

        Args:
            z: projected features of the segmentation rows [B, dim, *s].
            tumor: tumor fraction of each feature voxel [B, 1, *s] (see `mask_to_grid`).

        For each pair, a voxel's 2-way logits are its cosines with prototype i and prototype j, with
        the margin subtracted from the true class, over the temperature. A partially tumorous voxel
        takes the fraction-weighted mix of the two targets (exact for pure voxels). The margin loss is
        the mean cross-entropy over voxels and pairs; the heterogeneity loss is 1 - the mean
        per-sample soft Dice of each pair's tumor probability against the tumor fraction.
        """
        cos = self.cosine(voxels(z))                                          # [B, V, K]
        diff = cos[..., None, self.nc_neg:] - cos[..., :self.nc_neg, None]  # cos_j - cos_i [B, V, neg, pos]
        y = voxels(tumor)[..., None]                                          # [B, V, 1, 1]
        m, t = self.margin, self.temperature
        ce_tumor = F.softplus((m - diff) / t)          # true class tumor: logits (cos_i, cos_j - m)
        ce_background = F.softplus((m + diff) / t)     # true class background: logits (cos_i - m, cos_j)
        margin_loss = (y * ce_tumor + (1 - y) * ce_background).mean()
        prob = torch.sigmoid((diff - m * (2 * y - 1)) / t)                    # tumor probability per pair
        dice = soft_dice(prob.flatten(2), y.flatten(2))                       # [B, pairs]
        return margin_loss, 1 - dice.mean()

    @torch.no_grad()
    def initialize(self, tumor_feats: Tensor, background_feats: Tensor, method: str = "reference") -> None:
        """k-means of each super-class's projected voxels [N, dim]; the centers become the prototypes.
        Background voxels are subsampled to the number of tumor voxels. `method`: "reference" (the
        reference's k-means of the raw features: raw centers, whose norm also sets how far one Lion
        step turns a prototype) or "spherical" (k-means++ on normalised features, unit centers)."""
        if method not in KMEANS:
            raise ValueError(f"unknown k-means method {method!r}; use one of {sorted(KMEANS)}")
        n = tumor_feats.shape[0]
        if n == 0:
            raise ValueError("prototype initialisation found no tumor voxel in the segmentation cases")
        bg = background_feats[torch.randperm(background_feats.shape[0], device=background_feats.device)[:n]]
        cluster = KMEANS[method]
        self.prototypes.copy_(torch.cat((cluster(bg, self.nc_neg), cluster(tumor_feats, self.nc_pos)), 0))
        self.initialized.fill_(True)


class VoxelPool:
    """Collects projected voxels of the two super-classes over several batches, keeping a random
    subset of at most `cap` voxels per class."""

    def __init__(self, cap: int = 20000) -> None:
        self.cap = cap
        self.tumor: List[Tensor] = []
        self.background: List[Tensor] = []

    def add(self, z: Tensor, tumor: Tensor) -> None:
        """`z` [B, dim, *s] projected features, `tumor` [B, 1, *s] tumor fraction: a voxel is tumor
        when more than half of it is."""
        flat, frac = voxels(z).reshape(-1, z.shape[1]), tumor.flatten()
        self.tumor = [self._cap(torch.cat(self.tumor + [flat[frac > 0.5]]))]
        self.background = [self._cap(torch.cat(self.background + [flat[frac <= 0.5]]))]

    def _cap(self, x: Tensor) -> Tensor:
        if x.shape[0] <= self.cap:
            return x
        return x[torch.randperm(x.shape[0], device=x.device)[:self.cap]]

"""IGReg: DPA prototype losses and STDGP surrogates with the gated feature regularizer, all terms under
uncertainty weighting; `TERMS` names its loss terms."""

from __future__ import annotations

import random
from typing import Iterable, List

import ignite.distributed as idist
import torch
from torch import Tensor, nn

from scripts.distributed import broadcast_module
from scripts.dpa import KMEANS, PrototypeBank, VoxelPool, mask_to_grid
from scripts.mtl.base import (
    BatchLayout,
    MTLStrategy,
    OptimizerFactory,
    TaskForward,
    average_with_terms,
    non_finite_names,
    split_parts,
    take_rows,
)
from scripts.networks import IGRegNet
from scripts.objective import UncertaintyWeighting
from scripts.stdgp import (
    DISTANCES,
    Surrogate,
    gated_feature_regularizer,
    projected_update,
    synced_task_gradients,
    task_gradients,
)

TERMS = ("cls", "seg", "margin", "heterogeneity", "align", "feature_reg")


class IGReg(MTLStrategy):
    """IGReg: the multi-task network trained with DPA and STDGP under uncertainty weighting.

    One `step` is one outer iteration: copy the main classification path (not the heads) into the task surrogates,
    `surrogate_steps` projected surrogate updates, then the main update on the uncertainty-weighted
    sum of cls, seg, margin, heterogeneity, align and feature_reg.

    As in the reference, each surrogate step trains on its own batch (the batch's parts 1, 2, ...,
    which the loader adds when asked through `surrogate_batches`), encoded by the main encoder
    without gradients; the feature regularizer then compares surrogates and main network on the main
    batch (part 0), which the surrogates have not seen. A step given fewer parts (a hand-made batch)
    lets the remaining surrogate steps reuse the main batch's encoder features. The main forward
    runs first: the main parameters do not change during the surrogate steps, so this is the same
    computation as running the surrogates first.

    Args:
        network, optimizer, amp: see `MTLStrategy`; the optimizer factory also builds one optimizer
            per surrogate (`optimizers` = [main, surrogate per task...]).
        use_dpa: prototype losses (margin, heterogeneity, align); off = the "no DPA" ablation.
        use_stdgp: surrogates and the feature regularizer; off = the "no STDGP" ablation.
        surrogate_steps: surrogate updates per outer iteration.
        nc_neg, nc_pos, proto_dim, temperature, margin: the prototype bank (see `PrototypeBank`).
        align_fraction: share of the full-resolution voxels of the pair that the alignment loss samples
            (the reference's 1/64; see `PrototypeBank.alignment_loss` for the feature grid).
        feature_distance: l2 | mse | cosine, for the feature regularizer.
        init_voxels: most voxels per super-class kept for the k-means initialisation.
        kmeans: the prototypes' k-means, "reference" or "spherical" (see `PrototypeBank.initialize`).
        prototype_warmup: outer iterations before the prototypes' k-means, as in the reference, where the
            prototypes stay constant (all equal) until its first epoch ends and k-means then runs on the
            network trained so far; 0 runs it on the untrained network before the first iteration.
    """

    def __init__(self, network: IGRegNet, optimizer: OptimizerFactory, amp: bool = False, use_dpa: bool = True,
                 use_stdgp: bool = True, surrogate_steps: int = 2, nc_neg: int = 6, nc_pos: int = 6,
                 proto_dim: int = 64, temperature: float = 0.01, margin: float = 0.5, align_fraction: float = 1 / 64,
                 feature_distance: str = "l2", init_voxels: int = 20000, prototype_warmup: int = 0,
                 kmeans: str = "reference") -> None:
        super().__init__(network, optimizer, amp)
        if feature_distance not in DISTANCES:
            raise ValueError(f"feature_distance must be one of {DISTANCES}, got {feature_distance!r}")
        self.use_dpa, self.use_stdgp = use_dpa, use_stdgp
        self.surrogate_steps = surrogate_steps
        self.align_fraction = align_fraction
        self.feature_distance = feature_distance
        self.init_voxels = init_voxels
        if prototype_warmup < 0:
            raise ValueError(f"prototype_warmup must be 0 or more iterations, got {prototype_warmup}")
        self.prototype_warmup = int(prototype_warmup)
        if kmeans not in KMEANS:
            raise ValueError(f"kmeans must be one of {sorted(KMEANS)}, got {kmeans!r}")
        self.kmeans = kmeans
        terms = ["cls", "seg"] + (["margin", "heterogeneity", "align"] if use_dpa else [])
        terms += ["feature_reg"] if use_stdgp else []
        self.weighting = UncertaintyWeighting(terms).to(self.device)
        main_params = list(network.parameters()) + list(self.weighting.parameters())
        if use_dpa:
            self.dpa = PrototypeBank(network.num_channels, proto_dim, nc_neg, nc_pos, temperature, margin)
            self.dpa.to(self.device)
            main_params += list(self.dpa.parameters())
        self.optimizers = [self.make_optimizer(main_params)]
        if use_stdgp:
            self.surrogates = nn.ModuleList([Surrogate(network) for _ in network.tasks])
            self.optimizers += [self.make_optimizer(s.parameters()) for s in self.surrogates]
            self.surrogate_batches = surrogate_steps
            self.surrogates_synced = False  # True while the surrogates' copies of the main path are unchanged

    # ---- DPA ------------------------------------------------------------------------------------
    def initialization_due(self, iterations_done: int) -> bool:
        """The prototypes' k-means is due once `prototype_warmup` iterations are done, until it has run."""
        return self.use_dpa and iterations_done >= self.prototype_warmup and not bool(self.dpa.initialized)

    @torch.no_grad()
    def initialize(self, seg_batches: Iterable[dict]) -> None:
        """k-means initialisation of the prototypes from the segmentation cases of `seg_batches`
        (skipped without DPA or when the prototypes were already initialised, e.g. on resume).
        Under torch.distributed rank 0 computes them, then broadcasts the whole state (the prototypes,
        and the BatchNorm statistics its forward passes moved) to the other ranks."""
        if not self.use_dpa or bool(self.dpa.initialized):
            return
        if idist.get_rank() == 0:
            self._kmeans_prototypes(seg_batches)
        broadcast_module(self)

    @torch.no_grad()
    def _kmeans_prototypes(self, seg_batches: Iterable[dict]) -> None:
        pool, net, was_training = VoxelPool(self.init_voxels), self.network, self.network.training
        net.train()
        for batch in seg_batches:
            has_seg = batch.get("has_seg", torch.ones(batch["image"].shape[0], dtype=torch.bool))
            rows = torch.nonzero(has_seg.cpu()).flatten().tolist()
            if not rows:
                continue
            with self.autocast():
                scales, _ = net.neck(net.encoder(take_rows(batch["image"], rows)))
                z = self.dpa.project(net.decoder.embed(scales))
            pool.add(z, mask_to_grid(take_rows(batch["seg"], rows), z.shape[2:]))
        net.train(was_training)
        if not pool.tumor:
            raise ValueError("prototype initialisation received no segmentation case (has_seg all False)")
        self.dpa.initialize(pool.tumor[0], pool.background[0], self.kmeans)

    def dpa_losses(self, out: TaskForward, batch: dict, layout: BatchLayout) -> dict[str, Tensor]:
        """Alignment over all decoder rows (seg rows and the random classification row); margin and
        heterogeneity over the seg rows."""
        zero = batch["image"].new_zeros((), dtype=torch.float32)
        if out.embedding is None:
            return {"margin": zero, "heterogeneity": zero, "align": zero}
        with self.autocast():
            z = self.dpa.project(out.embedding)
        upsampling = batch["image"][0, 0].numel() / z[0, 0].numel()
        losses = {"align": self.dpa.alignment_loss(z, self.align_fraction, upsampling),
                  "margin": zero, "heterogeneity": zero}
        n = len(layout.seg_rows)
        if n:
            tumor = mask_to_grid(take_rows(batch["seg"], layout.seg_rows), z.shape[2:])
            losses["margin"], losses["heterogeneity"] = self.dpa.margin_heterogeneity(z[:n], tumor)
        return losses

    # ---- STDGP ----------------------------------------------------------------------------------
    def sync_surrogates(self) -> None:
        """Copy the main classification path, all but the task heads, into every surrogate."""
        for s in self.surrogates:
            s.load_from(self.network)
        self.surrogates_synced = True

    @staticmethod
    def task_batches(features: List[Tensor], label: Tensor, task_rows: List[List[int]]) -> list:
        """`(task, detached encoder features of its rows, its labels)` for each task with rows
        (`task_rows` index the rows of `features` and `label`)."""
        return [(t, [take_rows(f, rows).detach() for f in features], take_rows(label[:, t], rows))
                for t, rows in enumerate(task_rows) if rows]

    @torch.no_grad()
    def encoded_task_batches(self, batch: dict, layout: BatchLayout) -> list:
        """`task_batches` of a surrogate step's own batch: all its rows through the main encoder, without
        gradients, in training mode as the main forward (so, as in the reference, the encoder's BatchNorm
        statistics are those of the whole batch, segmentation case included); the tasks' rows are then taken."""
        if not layout.cls_rows:
            return []
        with self.autocast():
            features = self.network.encoder(batch["image"])
        return self.task_batches(features, batch["label"], layout.task_rows)

    def surrogate_update(self, task_batches: list) -> Tensor:
        """One projected step of every surrogate (surrogate k dominated by task k); returns the mean
        over surrogates of their summed task losses before the step.

        Right after `sync_surrogates` the surrogates differ only in their heads, so their task gradients
        come from one forward per task (`synced_task_gradients`, the same numbers). The per-task
        gradients are averaged across ranks before the projection; when a loss or a gradient is not
        finite no surrogate is updated ("surrogate" goes to `skipped`).
        """
        pairs = list(zip(self.surrogates, self.optimizers[1:]))
        if self.surrogates_synced:
            per_surrogate = synced_task_gradients(self.surrogates, task_batches, self.autocast)
        else:
            per_surrogate = [task_gradients(s, task_batches, self.autocast) for s in self.surrogates]
        grads = [g for g, _, _ in per_surrogate]
        tasks, loss = per_surrogate[0][1], torch.stack([lo for _, _, lo in per_surrogate]).mean()
        if non_finite_names(average_with_terms(grads, {"surrogate": loss}), grads, "surrogate"):
            self.skipped.append("surrogate")
            return loss
        for k, ((s, opt), g) in enumerate(zip(pairs, grads)):
            projected_update(s, opt, g, tasks, k)
        self.surrogates_synced = False
        return loss

    def feature_regularizer(self, out: TaskForward, task_batches: list, layout: BatchLayout) -> tuple[Tensor, Tensor]:
        """Gated pull of the main `F_t` toward surrogate k's feature on task k's rows; the gate
        compares surrogate k's true-class probability with the main step's own for the same row."""
        main_f, sur_f, main_p, sur_p = [], [], [], []
        for t, feats, labels in task_batches:
            with torch.no_grad(), self.autocast():
                feature, logits = self.surrogates[t].task_logits(feats, t)
            pos = layout.task_pos[t]
            main_logits = take_rows(out.cls_logits[t], pos).detach().float()
            main_f.append(take_rows(out.cls_feature, pos))
            sur_f.append(feature.float())
            main_p.append(main_logits.softmax(1).gather(1, labels[:, None]).squeeze(1))
            sur_p.append(logits.float().softmax(1).gather(1, labels[:, None]).squeeze(1))
        return gated_feature_regularizer(torch.cat(main_f), torch.cat(sur_f), torch.cat(main_p), torch.cat(sur_p),
                                         self.feature_distance)

    # ---- the objective, for the diagnostics -----------------------------------------------------
    def objective_terms(self, batch: dict) -> dict[str, Tensor]:
        """Each term of the main update under its uncertainty weight exp(-s): the classification tasks
        one by one (sharing the weight of "cls"), seg, margin, heterogeneity, align and feature_reg. The
        alignment pairs the first classification case (no random draw); the feature regularizer compares
        with the surrogates as the last iteration left them (the step re-copies and trains them first)."""
        batch = split_parts(batch)[0]
        layout = BatchLayout.of(batch)
        extra = layout.cls_rows[:1] if self.use_dpa else []
        out = self.forward_tasks(batch, layout, extra)
        terms = {t: self.weighting.weight("cls") * loss for t, loss in zip(self.network.tasks, out.task_losses)}
        terms["seg"] = self.weighting.weight("seg") * out.seg_loss
        if self.use_dpa:
            terms.update({k: self.weighting.weight(k) * v for k, v in self.dpa_losses(out, batch, layout).items()})
        batches = self.task_batches(out.features, batch["label"], layout.task_rows) if self.use_stdgp else []
        if batches:
            regularizer, _ = self.feature_regularizer(out, batches, layout)
            terms["feature_reg"] = self.weighting.weight("feature_reg") * regularizer
        return terms

    # ---- the outer iteration --------------------------------------------------------------------
    def step(self, batch: dict) -> dict[str, Tensor]:
        self.skipped = []
        batch, *surrogate_parts = split_parts(batch)
        layout = BatchLayout.of(batch)
        surrogate_layouts = [BatchLayout.of(part) for part in surrogate_parts]
        extra = [layout.cls_rows[random.randrange(len(layout.cls_rows))]] if self.use_dpa and layout.cls_rows else []
        out = self.forward_tasks(batch, layout, extra)
        losses = {"cls": torch.stack(out.task_losses).sum(), "seg": out.seg_loss}
        present: dict[str, Tensor | bool] = {"cls": any(layout.task_rows), "seg": bool(layout.seg_rows)}
        logs: dict[str, Tensor] = {}
        if self.use_dpa:
            losses.update(self.dpa_losses(out, batch, layout))
            present.update(margin=bool(layout.seg_rows), heterogeneity=bool(layout.seg_rows),
                           align=out.embedding is not None)
        if self.use_stdgp:
            batches = self.task_batches(out.features, batch["label"], layout.task_rows)
            self.sync_surrogates()
            if batches:
                for i in range(self.surrogate_steps):
                    own = (self.encoded_task_batches(surrogate_parts[i], surrogate_layouts[i])
                           if i < len(surrogate_parts) else batches)
                    if own:
                        logs["surrogate"] = self.surrogate_update(own)
                losses["feature_reg"], gate = self.feature_regularizer(out, batches, layout)
                present["feature_reg"] = True  # as the reference: 0 when none is gated, its log-variance still counts
                logs["gated"] = gate.float().mean()
            else:
                losses["feature_reg"], present["feature_reg"] = torch.zeros_like(out.seg_loss), False
        total = self.weighting(losses, present)
        self._update(self.optimizers[0], total, losses)
        logs.update({name: loss.detach() for name, loss in losses.items()})
        return {"loss": total.detach(), **logs, **self._task_logs(out)}

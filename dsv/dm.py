"""Distribution Matching (Zhao & Bilen, WACV 2023): the cheapest strong dataset-distillation baseline.

Synthetic images start from real ones. Every iteration samples a freshly initialised ConvNet, embeds a
batch of real images and all synthetic images of each class (penultimate features), and moves the
synthetic images to bring the per-class mean embeddings together:

    L = Σ_c ‖ mean_i ψ(A_c(x_real,c,i)) − mean_j ψ(A_c(x_syn,c,j)) ‖²

where A_c is one DSA augmentation drawn per class and applied identically (same parameters) to the real
and the synthetic batch of that class. Images are updated by SGD (momentum 0.5), as in the DM code.
In few-shot mode the real pool is just the few images per class the caller passes in. Note: when the
synthetic set is initialised from exactly that pool (IPC == shots), the class means already coincide
and the gradient is zero, so DM returns its initialisation; initialise from noise (DM's ``--init noise``)
or from a different real subset in that setting.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import cast

import torch
from torch import Tensor

from dsv.augment import AugmentConfig, augment, augment_groups, parse_augment
from dsv.checks import at_least, positive
from dsv.device import to_device
from dsv.models import ModelConfig, build_seeded


@dataclass(frozen=True)
class DMConfig:
    """Distribution Matching settings (defaults follow the DM paper, except the iteration count).

    Attributes:
        iterations: outer iterations; the DM paper runs 20000 (the full benchmark's value), the default
            is a modest 1000 because one iteration of the width-128 ConvNet on 10 classes costs seconds
            on a CPU.
        lr_img: SGD learning rate on the synthetic images (DM: 1.0).
        momentum: SGD momentum on the images (DM: 0.5).
        batch_real: real images per class per iteration (DM: 256; capped at the pool size).
        model: the randomly initialised embedding network (DM: the DD benchmark ConvNet-3, width 128).
        augment: the augmentation (:func:`dsv.augment.parse_augment`), drawn once per batch ("dsa" or a "batch:"
            spec), so the same generator seed gives the same transform on real and synthetic images.
    """

    iterations: int = 1000
    lr_img: float = 1.0
    momentum: float = 0.5
    batch_real: int = 256
    model: ModelConfig = ModelConfig(name="convnet", width=128, depth=3, norm="instance", pool="avg")
    augment: str = "dsa"

    def __post_init__(self) -> None:
        at_least(self, 1, "iterations")
        positive(self, "lr_img")
        if not 0.0 <= self.momentum < 1.0:
            raise ValueError(f"momentum must be in [0, 1), got {self.momentum}")
        at_least(self, 1, "batch_real")
        if parse_augment(self.augment).per_sample:
            raise ValueError(f"augment = {self.augment!r} draws per image: real and synthetic batches of a class "
                             "must share one augmentation (DSA's Siamese mode: 'dsa' or a 'batch:' spec)")


@dataclass(frozen=True)
class DMEvent:
    """Progress passed to the callback of :func:`distribution_matching`."""

    iteration: int
    total: int
    loss: float  # loss of this iteration


@dataclass
class DMResult:
    """Synthetic set and the loss of every iteration.

    Attributes:
        x: (M, C, H, W) synthetic images (normalised space, like the inputs).
        y: (M,) int labels (those of ``y_init``; DM does not change labels).
        losses: loss per iteration (before that iteration's update).
    """

    x: Tensor
    y: Tensor
    losses: list[float] = field(default_factory=list)


def _seed(g: torch.Generator) -> int:
    return int(torch.randint(0, 2**31 - 1, (1,), generator=g))


def distribution_matching(
    x_real: Tensor,
    y_real: Tensor,
    x_init: Tensor,
    y_init: Tensor,
    cfg: DMConfig,
    seed: int,
    callback: Callable[[DMEvent], None] | None = None,
    report_every: int = 100,
) -> DMResult:
    """Learn a synthetic set whose class-mean embeddings match the real ones under random networks.

    Args:
        x_real: (N, C, H, W) normalised real pool (in few-shot mode, only the allowed images per class).
        y_real: (N,) int labels of the pool.
        x_init: (M, C, H, W) normalised initial synthetic images (DM initialises from real images).
        y_init: (M,) int labels of the synthetic images; every class in it needs real images.
        cfg: iterations, learning rate, network and augmentation.
        seed: seeds the network initialisations, the real batches and the augmentations.
        callback: receives a :class:`DMEvent` every ``report_every`` iterations and at the end.

    Returns:
        :class:`DMResult` with the optimised images (on ``x_init``'s device) and the loss curve.

    Raises:
        ValueError: shape mismatches, or a synthetic class with no real images.
    """
    if x_real.shape[0] != y_real.shape[0]:
        raise ValueError(f"x_real has {x_real.shape[0]} images but y_real has {y_real.shape[0]} labels")
    if x_init.shape[0] != y_init.shape[0]:
        raise ValueError(f"x_init has {x_init.shape[0]} images but y_init has {y_init.shape[0]} labels")
    if x_real.shape[1:] != x_init.shape[1:]:
        raise ValueError(f"x_real images are {tuple(x_real.shape[1:])} but x_init are {tuple(x_init.shape[1:])}")
    device = x_init.device
    y_real, y_syn = y_real.cpu().long(), y_init.cpu().long()
    classes = y_syn.unique().tolist()
    real_idx: dict[int, Tensor] = {}
    for c in classes:
        idx = (y_real == c).nonzero(as_tuple=True)[0]
        if idx.numel() == 0:
            raise ValueError(f"class {c} has synthetic images but no real images in x_real")
        real_idx[c] = idx
    syn_idx = {c: (y_syn == c).nonzero(as_tuple=True)[0].to(device) for c in classes}
    num_classes = int(max(int(y_real.max()), int(y_syn.max()))) + 1

    g = torch.Generator().manual_seed(seed)
    x_real = x_real.to(device)  # resident for the whole run: no per-iteration gather on the host
    x_syn = x_init.detach().clone().requires_grad_(True)
    opt = torch.optim.SGD([x_syn], lr=cfg.lr_img, momentum=cfg.momentum)
    losses: list[Tensor] = []
    for it in range(cfg.iterations):
        net = build_seeded(cfg.model, tuple(x_init.shape[1:]), num_classes, _seed(g)).to(device)
        net.train()  # as in DM; the instance/group norms behave the same in both modes
        for p in net.parameters():
            p.requires_grad_(False)
        picks, aug_seeds = [], []
        for c in classes:
            pool = real_idx[c]
            picks.append(pool[torch.randperm(pool.numel(), generator=g)[: cfg.batch_real]])
            aug_seeds.append(_seed(g))
        picks = list(to_device(torch.cat(picks), device).split([p.numel() for p in picks]))  # one copy
        # Same seed, per-batch parameters: identical transform on the real and synthetic images of c.
        real_batches, syn_batches = _augment_pairs(
            [x_real[pick] for pick in picks], [x_syn[syn_idx[c]] for c in classes], aug_seeds, parse_augment(cfg.augment))
        embed = cast(Callable[[Tensor], Tensor], net.embed)  # every dsv model has .embed
        with torch.no_grad():
            emb_real = embed(torch.cat(real_batches))  # (Σ_c B_c, D)
        emb_syn = embed(torch.cat(syn_batches))  # (M, D)
        loss = x_syn.new_zeros(())
        r0 = s0 = 0
        for rb, sb in zip(real_batches, syn_batches):
            mean_real = emb_real[r0 : r0 + rb.shape[0]].mean(dim=0)  # (D,)
            mean_syn = emb_syn[s0 : s0 + sb.shape[0]].mean(dim=0)  # (D,)
            loss = loss + ((mean_real - mean_syn) ** 2).sum()
            r0, s0 = r0 + rb.shape[0], s0 + sb.shape[0]
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        losses.append(loss.detach())
        if callback is not None and ((it + 1) % report_every == 0 or it + 1 == cfg.iterations):
            callback(DMEvent(iteration=it + 1, total=cfg.iterations, loss=float(loss.detach())))
    return DMResult(x=x_syn.detach(), y=y_init.clone(), losses=torch.stack(losses).cpu().tolist())


def _augment_pairs(real: list[Tensor], syn: list[Tensor], seeds: list[int], cfg: AugmentConfig
                   ) -> tuple[list[Tensor], list[Tensor]]:
    """Augment each class's real and synthetic batch with the generator of its seed (both get the same draws).

    With batch-wide draws (``per_sample`` off) that do not depend on the batch's size (no "noise" op), a class's
    real and synthetic images are one batch to the augmentation, and when every class's batch has the same
    size all classes go through :func:`dsv.augment.augment_groups` at once: the same images as two
    ``augment`` calls per class, in one kernel per op.
    """
    def gen(seed: int) -> torch.Generator:
        return torch.Generator().manual_seed(seed)

    if cfg.per_sample or "noise" in cfg.ops:
        return ([augment(r, cfg, gen(s)) for r, s in zip(real, seeds)],
                [augment(x, cfg, gen(s)) for x, s in zip(syn, seeds)])
    pairs = [torch.cat([r, x]) for r, x in zip(real, syn)]
    if len({p.shape[0] for p in pairs}) == 1:
        out = list(augment_groups(torch.cat(pairs), cfg, [gen(s) for s in seeds]).split(pairs[0].shape[0]))
    else:
        out = [augment(p, cfg, gen(s)) for p, s in zip(pairs, seeds)]
    return [o[: r.shape[0]] for o, r in zip(out, real)], [o[r.shape[0] :] for o, r in zip(out, real)]

"""Differentiable image augmentations with explicit random generators.

Two uses:
* the DeepKKT manifold term (paper Algorithm 1): one random augmentation A(x) per step;
* DSA-style augmentation when training students (the DD benchmark protocol).

Every op is differentiable w.r.t. the images (warps use ``F.affine_grid``/``F.grid_sample``)
and draws its randomness only from the ``torch.Generator`` passed in, so a seed fixes the result.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

# The ops of Algorithm 1's manifold term (paper, CIFAR-10 / ImageNet settings).
KKT_OPS: tuple[str, ...] = ("translate", "crop", "flip", "noise")
# The DSA set of the dataset-distillation benchmark (Zhao & Bilen 2021).
DSA_OPS: tuple[str, ...] = ("color", "crop_pad", "cutout", "flip", "scale", "rotate")
ALL_OPS: tuple[str, ...] = (
    "translate", "crop", "crop_pad", "cutout", "flip", "noise", "scale", "rotate", "color",
)


@dataclass(frozen=True)
class AugmentConfig:
    """Which ops to sample from and their strengths.

    Attributes:
        ops: the ops sampled from; one op is drawn per call (``one_per_call``) or all are applied.
        one_per_call: draw a single op per call (Algorithm 1 and DSA do this) instead of chaining all.
        per_sample: draw op parameters per sample (True) or once for the whole batch (DSA's Siamese mode).
        translate: max shift as a fraction of the side (paper: 0.125).
        crop: random-resized-crop strength: the crop keeps a side fraction in [1 - crop, 1] (paper: 0.2).
        crop_pad: DSA crop: shift by up to this fraction with zero fill (0.125).
        cutout: side of the erased square as a fraction of the side (paper ImageNet: 0.15; DSA: 0.5).
        flip: probability of a horizontal flip (0.5).
        noise: std of additive gaussian noise in input units (paper: "0.01 likely"; unreported for CIFAR).
        scale: DSA scale ratio (1.2).
        rotate: DSA max rotation in degrees (15).
        brightness: DSA brightness range (1.0).
        saturation: DSA saturation range (2.0).
        contrast: DSA contrast range (0.5).
    """

    ops: tuple[str, ...] = KKT_OPS
    one_per_call: bool = True
    per_sample: bool = True
    translate: float = 0.125
    crop: float = 0.2
    crop_pad: float = 0.125
    cutout: float = 0.15
    flip: float = 0.5
    noise: float = 0.01
    scale: float = 1.2
    rotate: float = 15.0
    brightness: float = 1.0
    saturation: float = 2.0
    contrast: float = 0.5

    def __post_init__(self) -> None:
        unknown = [o for o in self.ops if o not in ALL_OPS]
        if unknown:
            raise ValueError(f"ops: unknown op(s) {unknown}; allowed: {', '.join(ALL_OPS)}")
        if not 0.0 <= self.flip <= 1.0:
            raise ValueError(f"flip is a probability in [0, 1], got {self.flip}")
        for name in ("translate", "crop", "crop_pad", "cutout", "noise"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be >= 0, got {getattr(self, name)}")


def dsa_config() -> AugmentConfig:
    """The DD benchmark's DSA parameters (BASELINES.md), one op sampled per batch."""
    return AugmentConfig(ops=DSA_OPS, cutout=0.5, per_sample=False)


def _uniform(n: int, lo: float, hi: float, g: torch.Generator, device: torch.device) -> Tensor:
    return (torch.rand(n, generator=g) * (hi - lo) + lo).to(device)


def _warp(x: Tensor, theta: Tensor) -> Tensor:
    """Apply (B, 2, 3) affine maps with zero padding; differentiable in x."""
    grid = F.affine_grid(theta.to(x.dtype), list(x.shape), align_corners=False)
    return F.grid_sample(x, grid, mode="bilinear", padding_mode="zeros", align_corners=False)


def _affine(a: Tensor, b: Tensor, c: Tensor, d: Tensor, tx: Tensor, ty: Tensor) -> Tensor:
    return torch.stack([torch.stack([a, b, tx], -1), torch.stack([c, d, ty], -1)], -2)


def apply_op(op: str, x: Tensor, cfg: AugmentConfig, g: torch.Generator) -> Tensor:
    """Apply one named op to (B, C, H, W) images with randomness from ``g``."""
    b = x.shape[0]
    n = b if cfg.per_sample else 1
    dev = x.device

    def draw(lo: float, hi: float) -> Tensor:
        v = _uniform(n, lo, hi, g, dev)
        return v.expand(b) if n == 1 else v

    one, zero = torch.ones(b, device=dev), torch.zeros(b, device=dev)
    if op == "flip":
        mask = (draw(0.0, 1.0) < cfg.flip).to(x.dtype).view(b, 1, 1, 1)
        return mask * x.flip(-1) + (1 - mask) * x
    if op in ("translate", "crop_pad"):
        m = cfg.translate if op == "translate" else cfg.crop_pad
        # affine_grid coordinates span [-1, 1], so a shift of fraction f is 2f.
        return _warp(x, _affine(one, zero, zero, one, 2 * draw(-m, m), 2 * draw(-m, m)))
    if op == "crop":
        s = draw(1.0 - cfg.crop, 1.0)  # kept side fraction: zoom in by 1/s
        room = 1.0 - s
        tx, ty = draw(-1.0, 1.0) * room, draw(-1.0, 1.0) * room
        return _warp(x, _affine(s, zero, zero, s, tx, ty))
    if op == "scale":
        sx, sy = draw(1.0 / cfg.scale, cfg.scale), draw(1.0 / cfg.scale, cfg.scale)
        return _warp(x, _affine(sx, zero, zero, sy, zero, zero))
    if op == "rotate":
        t = draw(-cfg.rotate, cfg.rotate) * (math.pi / 180.0)
        return _warp(x, _affine(torch.cos(t), -torch.sin(t), torch.sin(t), torch.cos(t), zero, zero))
    if op == "cutout":
        h, w = x.shape[-2:]
        ch, cw = max(1, int(h * cfg.cutout)), max(1, int(w * cfg.cutout))
        cy, cx = draw(0.0, 1.0) * h, draw(0.0, 1.0) * w
        ys = torch.arange(h, device=dev).view(1, h, 1)
        xs = torch.arange(w, device=dev).view(1, 1, w)
        inside = ((ys - cy.view(b, 1, 1)).abs() < ch / 2) & ((xs - cx.view(b, 1, 1)).abs() < cw / 2)
        return x * (~inside).unsqueeze(1).to(x.dtype)
    if op == "noise":
        eps = torch.randn(x.shape, generator=g).to(dev, x.dtype)
        return x + cfg.noise * eps
    if op == "color":
        x = x + (draw(0.0, 1.0) - 0.5).view(b, 1, 1, 1) * cfg.brightness
        mean_c = x.mean(dim=1, keepdim=True)
        x = (x - mean_c) * (draw(0.0, 1.0) * cfg.saturation).view(b, 1, 1, 1) + mean_c
        mean_all = x.mean(dim=(1, 2, 3), keepdim=True)
        return (x - mean_all) * (draw(0.0, 1.0) + cfg.contrast).view(b, 1, 1, 1) + mean_all
    raise ValueError(f"unknown augmentation op {op!r}; allowed: {', '.join(ALL_OPS)}")


def augment(x: Tensor, cfg: AugmentConfig, generator: torch.Generator) -> Tensor:
    """Randomly augment a batch of images.

    Args:
        x: (B, C, H, W) images (any value range; ops are range-agnostic).
        cfg: ops and strengths.
        generator: CPU generator; the only source of randomness.

    Returns:
        (B, C, H, W) augmented images, differentiable w.r.t. ``x``.
    """
    if x.dim() != 4 or not cfg.ops:
        return x  # tabular/toy inputs: augmentation does not apply
    if cfg.one_per_call:
        k = int(torch.randint(len(cfg.ops), (1,), generator=generator))
        return apply_op(cfg.ops[k], x, cfg, generator)
    for op in cfg.ops:
        x = apply_op(op, x, cfg, generator)
    return x

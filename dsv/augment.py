"""Differentiable image augmentations with explicit random generators, named in one vocabulary.

Every config that augments (``FitConfig``, ``KKTConfig``, ``GenerateConfig``, ``DMConfig``) has one key,
``augment``, a string (:func:`parse_augment`):

* a preset: ``none``; ``flip_crop`` (flip + 4-pixel-style crop-pad, chained: classifier training); ``dsa`` (one
  of the DD benchmark's DSA ops per batch, drawn once for the whole batch: students, DM); ``kkt`` (one of
  Algorithm 1's translate/crop/flip/noise per step, per-image parameters: the DeepKKT manifold term);
  ``generate`` (translate, cutout and noise chained, per image: generation's augmented views; no flip: an image
  optimised under random flips becomes mirror-symmetric, and classes have an orientation);
* or explicit ops: op names joined by ``|`` (one op drawn per call) or ``+`` (every op, in order), each
  optionally with its strength (``translate=0.2``, ``flip=1.0``, ``cutout=0.5``; color's three are fixed),
  after an optional mode: ``batch:`` (one draw for the whole batch, DSA's Siamese mode) or ``each:`` (with
  ``|``: every image draws its own op). E.g. ``each:translate|crop|flip|noise``, ``translate+cutout+noise``.

Every op is differentiable w.r.t. the images (warps use ``F.affine_grid``/``F.grid_sample``)
and draws its randomness only from the ``torch.Generator`` passed in, so a seed fixes the result.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from dsv.device import to_device

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
        op_per_sample: with ``one_per_call``, draw the op itself per sample too (each image gets its own
            augmentation draw; needs ``per_sample``): candidates of one class are then never pushed by the
            same transform at a step. Default off (Algorithm 1: one op per step for the batch).
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
    op_per_sample: bool = False
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
        if self.op_per_sample and not (self.per_sample and self.one_per_call):
            raise ValueError("op_per_sample needs per_sample and one_per_call")
        for name, allowed, ok in (("flip", "in [0, 1]", 0 <= self.flip <= 1), ("crop", "in [0, 1)", 0 <= self.crop < 1),
                                  ("cutout", "in [0, 1]", 0 <= self.cutout <= 1), ("scale", ">= 1", self.scale >= 1),
                                  *((n, ">= 0", getattr(self, n) >= 0) for n in ("translate", "crop_pad", "noise",
                                                                                  "rotate", "brightness",
                                                                                  "saturation", "contrast"))):
            if not ok:
                raise ValueError(f"{name} must be {allowed}, got {getattr(self, name)}")


# The presets of the vocabulary (module docstring), written in it.
PRESETS: dict[str, str] = {
    "none": "",
    "flip_crop": "flip+crop_pad",
    "dsa": "batch:color|crop_pad|cutout=0.5|flip|scale|rotate",
    "kkt": "translate|crop|flip|noise",
    "generate": "translate+cutout+noise",
}


@functools.cache
def parse_augment(spec: str) -> AugmentConfig:
    """The :class:`AugmentConfig` a spec of the vocabulary (module docstring) names; ValueError naming the problem."""
    text = PRESETS.get(spec, spec).strip()
    mode, _, body = text.rpartition(":")
    if mode not in ("", "batch", "each"):
        raise ValueError(f"augment = {spec!r}: the mode is 'batch:' or 'each:', got {mode!r}:; presets: "
                         f"{', '.join(PRESETS)}")
    if "|" in body and "+" in body:
        raise ValueError(f"augment = {spec!r}: join the ops with '|' (one per call) or '+' (all), not both")
    ops, strengths = [], {}
    for part in filter(None, body.replace("+", "|").split("|")):
        name, eq, value = part.strip().partition("=")
        if name not in ALL_OPS:
            raise ValueError(f"augment = {spec!r}: unknown op {name!r}; ops: {', '.join(ALL_OPS)}; presets: "
                             f"{', '.join(PRESETS)}")
        if eq and name == "color":
            raise ValueError(f"augment = {spec!r}: color takes no strength (brightness, saturation, contrast)")
        ops.append(name)
        try:
            strengths.update({name: float(value)} if eq else {})
        except ValueError:
            raise ValueError(f"augment = {spec!r}: the strength of {name} is a number, got {value!r}") from None
    if mode == "each" and "+" in body:
        raise ValueError(f"augment = {spec!r}: 'each:' draws one op per image, so its ops are joined by '|'")
    try:
        return AugmentConfig(ops=tuple(ops), one_per_call="|" in body, per_sample=mode != "batch",
                             op_per_sample=mode == "each", **strengths)
    except ValueError as exc:
        raise ValueError(f"augment = {spec!r}: {exc}") from None


def _ranges(op: str, cfg: AugmentConfig) -> tuple[tuple[float, float], ...]:
    """The uniform ranges an op draws from, in the order it draws them."""
    if op == "flip":
        return ((0.0, 1.0),)
    if op in ("translate", "crop_pad"):
        m = cfg.translate if op == "translate" else cfg.crop_pad
        return ((-m, m), (-m, m))
    if op == "crop":
        return ((1.0 - cfg.crop, 1.0), (-1.0, 1.0), (-1.0, 1.0))
    if op == "scale":
        return ((1.0 / cfg.scale, cfg.scale), (1.0 / cfg.scale, cfg.scale))
    if op == "rotate":
        return ((-cfg.rotate, cfg.rotate),)
    if op == "cutout":
        return ((0.0, 1.0), (0.0, 1.0))
    if op == "color":
        return ((0.0, 1.0), (0.0, 1.0), (0.0, 1.0))
    if op == "noise":
        return ()
    raise ValueError(f"unknown augmentation op {op!r}; allowed: {', '.join(ALL_OPS)}")


def draw_op(op: str, shape: Sequence[int], cfg: AugmentConfig, g: torch.Generator) -> Tensor:
    """The random parameters of one op for a batch of ``shape``, drawn on the CPU from ``g`` only.

    Returns a (k, n) tensor of uniform draws (k per op, n = B per sample or 1 for the batch), or for
    "noise" the (B, C, H, W) gaussian noise. :func:`apply_op` moves it to the images' device in one copy that
    does not wait for the device (:func:`dsv.device.to_device`): no host round trip per draw.
    """
    if op == "noise":
        return torch.randn(tuple(shape), generator=g)
    n = int(shape[0]) if cfg.per_sample else 1
    rows = [torch.rand(n, generator=g) * (hi - lo) + lo for lo, hi in _ranges(op, cfg)]
    return torch.stack(rows)


def _warp(x: Tensor, theta: Tensor) -> Tensor:
    """Apply (B, 2, 3) affine maps with zero padding; differentiable in x."""
    grid = F.affine_grid(theta.to(x.dtype), list(x.shape), align_corners=False)
    return F.grid_sample(x, grid, mode="bilinear", padding_mode="zeros", align_corners=False)


def _affine(a: Tensor, b: Tensor, c: Tensor, d: Tensor, tx: Tensor, ty: Tensor) -> Tensor:
    return torch.stack([torch.stack([a, b, tx], -1), torch.stack([c, d, ty], -1)], -2)


def apply_drawn(op: str, x: Tensor, p: Tensor, cfg: AugmentConfig) -> Tensor:
    """Apply one named op to (B, C, H, W) images with parameters ``p`` from :func:`draw_op` (on x's device;
    (k, 1) draws are shared by the batch, (k, B) are per image)."""
    b = x.shape[0]
    dev = x.device
    if op == "noise":
        return x + cfg.noise * p.to(dev, x.dtype)
    v = p.expand(-1, b) if p.shape[1] == 1 else p
    one, zero = torch.ones(b, device=dev), torch.zeros(b, device=dev)
    if op == "flip":
        mask = (v[0] < cfg.flip).to(x.dtype).view(b, 1, 1, 1)
        return mask * x.flip(-1) + (1 - mask) * x
    if op in ("translate", "crop_pad"):
        # affine_grid coordinates span [-1, 1], so a shift of fraction f is 2f.
        return _warp(x, _affine(one, zero, zero, one, 2 * v[0], 2 * v[1]))
    if op == "crop":
        s = v[0]  # kept side fraction: zoom in by 1/s
        room = 1.0 - s
        tx, ty = v[1] * room, v[2] * room
        return _warp(x, _affine(s, zero, zero, s, tx, ty))
    if op == "scale":
        return _warp(x, _affine(v[0], zero, zero, v[1], zero, zero))
    if op == "rotate":
        t = v[0] * (math.pi / 180.0)
        return _warp(x, _affine(torch.cos(t), -torch.sin(t), torch.sin(t), torch.cos(t), zero, zero))
    if op == "cutout":
        h, w = x.shape[-2:]
        ch, cw = max(1, int(h * cfg.cutout)), max(1, int(w * cfg.cutout))
        cy, cx = v[0] * h, v[1] * w
        ys = torch.arange(h, device=dev).view(1, h, 1)
        xs = torch.arange(w, device=dev).view(1, 1, w)
        inside = ((ys - cy.view(b, 1, 1)).abs() < ch / 2) & ((xs - cx.view(b, 1, 1)).abs() < cw / 2)
        return x * (~inside).unsqueeze(1).to(x.dtype)
    if op == "color":
        x = x + (v[0] - 0.5).view(b, 1, 1, 1) * cfg.brightness
        mean_c = x.mean(dim=1, keepdim=True)
        x = (x - mean_c) * (v[1] * cfg.saturation).view(b, 1, 1, 1) + mean_c
        mean_all = x.mean(dim=(1, 2, 3), keepdim=True)
        return (x - mean_all) * (v[2] + cfg.contrast).view(b, 1, 1, 1) + mean_all
    raise ValueError(f"unknown augmentation op {op!r}; allowed: {', '.join(ALL_OPS)}")


def apply_op(op: str, x: Tensor, cfg: AugmentConfig, g: torch.Generator) -> Tensor:
    """Apply one named op to (B, C, H, W) images with randomness from ``g``."""
    return apply_drawn(op, x, to_device(draw_op(op, x.shape, cfg, g), x.device), cfg)


def augment(x: Tensor, cfg: AugmentConfig | str, generator: torch.Generator) -> Tensor:
    """Randomly augment a batch of images.

    Args:
        x: (B, C, H, W) images (any value range; ops are range-agnostic).
        cfg: ops and strengths, or a spec of the vocabulary (:func:`parse_augment`).
        generator: CPU generator; the only source of randomness.

    Returns:
        (B, C, H, W) augmented images, differentiable w.r.t. ``x``.
    """
    cfg = parse_augment(cfg) if isinstance(cfg, str) else cfg
    if x.dim() != 4 or not cfg.ops:
        return x  # tabular/toy inputs: augmentation does not apply
    if cfg.one_per_call and cfg.op_per_sample:
        which = torch.randint(len(cfg.ops), (x.shape[0],), generator=generator)  # (B,) one op per image
        out = torch.empty_like(x)
        for j, op in enumerate(cfg.ops):
            rows = (which == j).nonzero(as_tuple=True)[0]
            if rows.numel():
                idx = to_device(rows, x.device)
                out = out.index_copy(0, idx, apply_op(op, x.index_select(0, idx), cfg, generator))
        return out
    if cfg.one_per_call:
        k = int(torch.randint(len(cfg.ops), (1,), generator=generator))
        return apply_op(cfg.ops[k], x, cfg, generator)
    for op in cfg.ops:
        x = apply_op(op, x, cfg, generator)
    return x


def augment_groups(x: Tensor, cfg: AugmentConfig, generators: Sequence[torch.Generator]) -> Tensor:
    """:func:`augment` for S independent streams at once: ``x`` holds S consecutive blocks of B images and block
    s is augmented exactly as ``augment(block_s, cfg, generators[s])`` would (same draws, in the same order, from
    its own generator), with one kernel per op for all blocks instead of one per block.

    Args:
        x: (S·B, C, H, W) images, block s = rows [s·B, (s+1)·B).
        cfg: ops and strengths.
        generators: one CPU generator per block.

    Returns:
        (S·B, C, H, W) augmented images, differentiable w.r.t. ``x``.
    """
    s = len(generators)
    if s == 0 or x.shape[0] % s:
        raise ValueError(f"augment_groups: {x.shape[0]} images do not split into {s} equal blocks")
    if x.dim() != 4 or not cfg.ops:
        return x
    b = x.shape[0] // s
    shape = (b, *x.shape[1:])
    if not cfg.one_per_call:  # every op on every block; each block's draws in its own order
        draws = [[draw_op(op, shape, cfg, g) for op in cfg.ops] for g in generators]
        for j, op in enumerate(cfg.ops):
            x = apply_drawn(op, x, to_device(_blocks([d[j] for d in draws], b), x.device), cfg)
        return x
    chosen: list[str] = []
    params: list[Tensor] = []
    for g in generators:
        op = cfg.ops[int(torch.randint(len(cfg.ops), (1,), generator=g))]
        chosen.append(op)
        params.append(draw_op(op, shape, cfg, g))
    ops = sorted(set(chosen), key=cfg.ops.index)
    if len(ops) == 1:
        return apply_drawn(ops[0], x, to_device(_blocks(params, b), x.device), cfg)
    out = torch.empty_like(x)
    for op in ops:
        members = [i for i, c in enumerate(chosen) if c == op]
        rows = to_device(torch.cat([torch.arange(i * b, (i + 1) * b) for i in members]), x.device)
        drawn = to_device(_blocks([params[i] for i in members], b), x.device)
        out.index_copy_(0, rows, apply_drawn(op, x.index_select(0, rows), drawn, cfg))
    return out


def _blocks(draws: Sequence[Tensor], b: int) -> Tensor:
    """Concatenate per-block draws along the image axis: (k, 1) or (k, B) -> (k, S·B); noise (B, ...) -> (S·B, ...)."""
    if draws[0].dim() == 2:
        return torch.cat([d.expand(-1, b) for d in draws], dim=1)
    return torch.cat(list(draws), dim=0)

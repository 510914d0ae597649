"""The classifier as a generator (paper §5.4): class samples, interpolation and editing by inversion.

The teacher stays frozen. Images x (normalised input space) are optimised so that the teacher assigns
them a (soft) target y = (1 − δ)·y_a + δ·y_b, under the recipe the authors published for generation
(../PAPER.md, "What the authors' own materials add") and the image priors of model inversion:

- **coarse-to-fine**: x is parameterised at 1/2^``levels`` of the input side; after each equal share
  of the steps the parameter is upsampled ×2 (bilinear) and optimisation continues at the finer grid, so
  the coarse structure is fixed before any pixel-level detail can be;
- **augmented views**: each step scores ``views`` randomly jittered (translate), cut-out and
  noised copies of x (all ops chained, per-sample draws), never x itself, so only patterns that survive
  those transforms lower the loss;
- **priors** on the un-augmented x: total variation and squared norm, both *means over pixels* (so one
  weight works for any image size; the paper's β2 = 40 and β3 = 1e-6 multiply sums over a 224² ImageNet
  image and do not transfer). The defaults were chosen with an independent judge on Fashion-MNIST and digits
  (benchmarks/results/generate-*.md): TV is off (it cost judge accuracy on digits and helped nowhere), one
  augmented view per step (more were no better, at proportionally more cost);
- **feature statistics** (DeepInversion): for teachers with BatchNorm layers, the batch mean and variance
  of every BN layer's input are pulled to its running statistics (``beta_bn``; a no-op without BN);
- **stationarity** (optional, ``beta_stat``): the DeepKKT term L_stat of :mod:`dsv.kkt` with λ fitted
  jointly (λ = s·u, u ≥ 0, s = the best uniform multiplier), as in :func:`dsv.extract.extract`.

:func:`generate_images` is the one optimiser; :func:`sample`, :func:`interpolate` and :func:`edit_images`
are its three uses, and :func:`showcase` makes all three with one recipe. Independent quality measures (a judge and a Fréchet distance) are in :mod:`dsv.judge`.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from dsv.augment import augment, parse_augment
from dsv.checks import at_least, one_of
from dsv.kernel import (
    PARAM_SUBSETS,
    frozen,
    soft_cross_entropy,
    stationarity_distance,
    stationarity_params,
    target_classes,
    uniform_lambda,
    weighted_grad_sum,
)
from dsv.kkt import capture_features, norm_loss, repulsion, tv_loss


@dataclass(frozen=True)
class GenerateConfig:
    """One generation run (every key is a ``generate.recipe`` param of the pipeline).

    Attributes:
        steps: optimisation steps in total, split equally over the ``levels + 1`` resolutions.
        levels: coarse-to-fine halvings: x starts at side/2^levels and is upsampled ×2 after each share of
            the steps (the authors' recipe: "downscaled the image two times first"). 0 = optimise at full
            resolution from the start (what editing uses), which leaves samples the judge recognises far less
            often (benchmarks/results/generate-fashion_mnist.md).
        min_side: no level is coarser than this many pixels (a halving that would go below is skipped): on
            8 px digits a 4 px start costs judge accuracy.
        lr: Adam learning rate of x (normalised input units).
        views: augmented copies of x scored per step (their losses averaged).
        augment: the augmentation of the views (:func:`dsv.augment.parse_augment`); "generate" chains the paper's
            ImageNet-generation ops (translate 0.125, cutout 0.15, noise 0.01) with per-image draws. Left out:
            crop (at 28 px a 0.8 crop removes the garment's outline) and the paper's flip (an image optimised under
            random flips becomes mirror-symmetric, a sandal pointing both ways; classes have an orientation).
        beta_tv: weight of the total-variation prior (mean absolute neighbour difference).
        beta_norm: weight of the squared-norm prior (mean squared value of x in normalised units).
        beta_bn: weight of the BatchNorm feature-statistics prior (0 or a teacher without BN: off).
        beta_stat: weight of the DeepKKT stationarity term (0 = plain inversion with priors).
        beta_repel: weight of the within-class repulsion of the teacher's features (:func:`dsv.kkt.repulsion`):
            the images of one class are pushed apart so they do not all become the class's one mode. 0 = off
            (the default 0.05 was chosen on Fashion-MNIST and digits, benchmarks/results/diversity-*.md).
        param_subset: θ of the stationarity term ("last", "free", "all": :func:`dsv.kkt.stationarity_params`).
        lr_lam: Adam learning rate of u (λ = s·u) when ``beta_stat`` > 0.
        clamp_pixels: keep x inside the valid pixel range after every step.
        log_every: trace interval in steps.
    """

    steps: int = 200
    levels: int = 2
    min_side: int = 7
    lr: float = 0.1
    views: int = 1
    augment: str = "generate"
    beta_tv: float = 0.0
    beta_norm: float = 0.01
    beta_bn: float = 0.01
    beta_stat: float = 0.0
    beta_repel: float = 0.05
    param_subset: str = "last"
    lr_lam: float = 0.1
    clamp_pixels: bool = True
    log_every: int = 25

    def __post_init__(self) -> None:
        at_least(self, 0, "steps", "levels")
        at_least(self, 1, "min_side", "views", "log_every")
        one_of("param_subset", self.param_subset, PARAM_SUBSETS)
        for key in ("lr", "lr_lam"):
            if not getattr(self, key) > 0:
                raise ValueError(f"{key} must be > 0, got {getattr(self, key)}")
        parse_augment(self.augment)
        for key in ("beta_tv", "beta_norm", "beta_bn", "beta_stat", "beta_repel"):
            if getattr(self, key) < 0:
                raise ValueError(f"{key} must be >= 0, got {getattr(self, key)}")


@dataclass
class Generated:
    """Images made by :func:`generate_images`.

    Attributes:
        x: (K, C, H, W) images in normalised input space.
        y: (K,) int or (K, C) soft targets, as given.
        probs: (K, C) teacher probabilities of ``x``.
        trace: one dict per logged step (step, level, side, loss, ce, tv, norm, bn, stat, acc_target, conf_target).
    """

    x: Tensor
    y: Tensor
    probs: Tensor
    trace: list[dict[str, float]]


class _BNStats:
    """Context: forward hooks on every BatchNorm layer (when ``on``) collecting ‖μ_batch − μ_run‖ + ‖σ²_batch −
    σ²_run‖ (DeepInversion); false when it has none."""

    def __init__(self, model: nn.Module, on: bool) -> None:
        self.terms: list[Tensor] = []
        self.handles = [m.register_forward_hook(self._hook) for m in model.modules()
                        if on and isinstance(m, nn.modules.batchnorm._BatchNorm) and m.running_mean is not None]

    def __enter__(self) -> _BNStats:
        return self

    def _hook(self, module: nn.Module, inputs: tuple[Tensor, ...], _out: Tensor) -> None:
        x = inputs[0]
        dims = [0] + list(range(2, x.dim()))
        mean = x.mean(dim=dims)
        var = x.var(dim=dims, unbiased=False)
        self.terms.append(torch.norm(mean - module.running_mean, 2) + torch.norm(var - module.running_var, 2))  # type: ignore[operator]

    def take(self, like: Tensor) -> Tensor:
        out = torch.stack(self.terms).sum() if self.terms else like.new_zeros(())
        self.terms = []
        return out

    def __bool__(self) -> bool:
        return bool(self.handles)

    def __exit__(self, *exc: object) -> None:
        for h in self.handles:
            h.remove()


def _sides(shape: tuple[int, int], levels: int, min_side: int = 7) -> list[tuple[int, int]]:
    """The grid of each level, coarsest first, ending at the full ``shape``; none below ``min_side`` px."""
    out = [shape]
    for _ in range(levels):
        h, w = out[0]
        if min((h + 1) // 2, (w + 1) // 2) < min_side:
            break
        out.insert(0, ((h + 1) // 2, (w + 1) // 2))
    return out


def noise_start(n: int, in_shape: tuple[int, ...], cfg: GenerateConfig, generator: torch.Generator,
                std: float = 1.0) -> Tensor:
    """(n, *in_shape) noise starts whose coarsest level is white noise of std ``std``.

    The noise is drawn on the coarsest grid of ``cfg`` and upsampled by nearest neighbour, so the area
    downsampling at the start of :func:`generate_images` gives it back (exactly for integer factors). Noise drawn
    at full resolution would be averaged down (std 1 → 0.25 for a 4× smaller grid): every sample would start
    near the mean image.
    """
    full = (int(in_shape[-2]), int(in_shape[-1]))
    coarse = _sides(full, cfg.levels, cfg.min_side)[0]
    z = std * torch.randn((n, in_shape[0], *coarse), generator=generator)
    return F.interpolate(z, size=full, mode="nearest") if coarse != full else z


def _resize(z: Tensor, side: tuple[int, int]) -> Tensor:
    if tuple(z.shape[-2:]) == tuple(side):
        return z
    return F.interpolate(z, size=side, mode="bilinear", align_corners=False)


def generate_images(
    teacher: nn.Module,
    x0: Tensor,
    y: Tensor,
    cfg: GenerateConfig,
    seed: int = 0,
    pixel_bounds: tuple[Tensor, Tensor] | None = None,
    callback: Callable[[dict[str, float]], None] | None = None,
    stop_conf: float | None = None,
) -> Generated:
    """Optimise images ``x0`` towards targets ``y`` under the generation recipe (module docstring).

    Args:
        teacher: the trained classifier (frozen; its parameters and BN statistics are unchanged after).
        x0: (K, C, H, W) starting images in normalised space (noise, foreign images or real images to edit).
        y: (K,) int targets or (K, C) soft targets.
        cfg: the recipe.
        seed: seeds the augmentation draws.
        pixel_bounds: per-channel (lo, hi) of the valid range in normalised space, (C,) each.
        callback: receives every trace row.
        stop_conf: freeze an image as soon as the teacher gives its (hard) target at least this probability
            (editing: the smallest change that flips the prediction); None optimises every image to the end.

    Raises:
        ValueError: for inputs that are not images (generation needs (K, C, H, W)).
        FloatingPointError: when the loss becomes NaN or infinite (the message names the step).
    """
    if x0.dim() != 4:
        raise ValueError(f"generation needs image inputs (K, C, H, W), got shape {tuple(x0.shape)}")
    if x0.shape[0] != y.shape[0]:
        raise ValueError(f"x0 has {x0.shape[0]} images but y has {y.shape[0]} targets")
    device = next(teacher.parameters()).device
    dtype = next(teacher.parameters()).dtype
    g = torch.Generator().manual_seed(seed)
    y = y.to(device)
    hard = target_classes(y)
    stat_on = cfg.beta_stat > 0
    lo = hi = None
    if cfg.clamp_pixels and pixel_bounds is not None:
        lo = pixel_bounds[0].to(device, dtype).view(1, -1, 1, 1)
        hi = pixel_bounds[1].to(device, dtype).view(1, -1, 1, 1)
    full = (int(x0.shape[-2]), int(x0.shape[-1]))
    sides = _sides(full, cfg.levels, cfg.min_side)
    shares = [cfg.steps // len(sides) + (1 if i < cfg.steps % len(sides) else 0) for i in range(len(sides))]
    trace: list[dict[str, float]] = []
    u = torch.ones(x0.shape[0], device=device, dtype=dtype, requires_grad=True)
    scale = 1.0
    with frozen(teacher, grad=False), _BNStats(teacher, cfg.beta_bn > 0) as bn:
        params = stationarity_params(teacher, cfg.param_subset, x0[:8].to(device, dtype)) if stat_on else []
        for p in params:
            p.requires_grad_(True)
        z = F.interpolate(x0.to(device, dtype), size=sides[0], mode="area") if sides[0] != full else x0.to(device, dtype)
        z = z.detach().clone()
        if stat_on:
            scale = uniform_lambda(teacher, x0.to(device, dtype), y, cfg.param_subset)
        step = 0
        for level, (side, share) in enumerate(zip(sides, shares)):
            z = _resize(z, side).detach().requires_grad_(True)
            groups = [{"params": [z], "lr": cfg.lr}] + ([{"params": [u], "lr": cfg.lr_lam}] if stat_on else [])
            opt = torch.optim.Adam(groups)
            for i in range(share + (1 if level == len(sides) - 1 else 0)):
                x = _resize(z, full)
                views = torch.cat([augment(x, cfg.augment, g) for _ in range(cfg.views)])
                y_views = y.repeat(cfg.views, *([1] * (y.dim() - 1)))
                zero = x.new_zeros(())
                rep = zero
                if cfg.beta_repel > 0:
                    with capture_features(teacher) as cap:
                        logits = teacher(views)
                    assert cap.last is not None
                    rep = repulsion(cap.last, y_views)
                else:
                    logits = teacher(views)
                ce = soft_cross_entropy(logits, y_views).mean()
                total = ce + cfg.beta_repel * rep
                bn_term = bn.take(x) if bn else zero
                tv = tv_loss(x) if cfg.beta_tv > 0 else zero
                nrm = norm_loss(x) / x[0].numel() if cfg.beta_norm > 0 else zero
                total = total + cfg.beta_bn * bn_term + cfg.beta_tv * tv + cfg.beta_norm * nrm
                stat = zero
                if stat_on:
                    losses = soft_cross_entropy(teacher(x), y)
                    if bn:
                        bn.take(x)  # the un-augmented pass is not part of the BN prior
                    s = weighted_grad_sum(params, losses, scale * u, create_graph=True)
                    stat = stationarity_distance(params, s, "l1")
                    total = total + cfg.beta_stat * stat
                last = level == len(sides) - 1 and i == share
                if step % cfg.log_every == 0 or last:
                    val = float(total.detach())
                    if not math.isfinite(val):
                        raise FloatingPointError(f"non-finite generation loss ({val}) at step {step}")
                    with torch.no_grad():
                        p_clean = F.softmax(teacher(x), dim=1)
                        if bn:
                            bn.take(x)
                    row = {"step": float(step), "level": float(level), "side": float(side[0]), "loss": val,
                           "ce": float(ce.detach()), "tv": float(tv.detach()), "norm": float(nrm.detach()),
                           "bn": float(bn_term.detach()), "stat": float(stat.detach()), "repel": float(rep.detach()),
                           "acc_target": float((p_clean.argmax(1) == hard).float().mean()),
                           "conf_target": float(p_clean.gather(1, hard.view(-1, 1)).mean())}
                    trace.append(row)
                    if callback is not None:
                        callback(row)
                if last:
                    break
                grads = torch.autograd.grad(total, [z, u] if stat_on else [z])
                opt.zero_grad(set_to_none=True)
                z.grad = grads[0]
                if stat_on:
                    u.grad = grads[1]
                done = None
                if stop_conf is not None:
                    with torch.no_grad():
                        done = F.softmax(teacher(x), dim=1).gather(1, hard.view(-1, 1)).squeeze(1) >= stop_conf
                        if bn:
                            bn.take(x)
                        kept = z.detach().clone()
                opt.step()
                with torch.no_grad():
                    if done is not None:  # Adam's momentum would move a finished image on (no host sync here)
                        z.copy_(torch.where(done.view(-1, *([1] * (z.dim() - 1))), kept, z))
                    if lo is not None and hi is not None:
                        z.copy_(torch.maximum(torch.minimum(z, hi), lo))
                    if stat_on:
                        u.clamp_(min=0.0)
                step += 1
        with torch.no_grad():
            x = _resize(z.detach(), full)
            probs = F.softmax(teacher(x), dim=1)
    return Generated(x=x.cpu(), y=y.cpu(), probs=probs.cpu(), trace=trace)


def sample(
    teacher: nn.Module,
    per_class: int,
    num_classes: int,
    in_shape: tuple[int, ...],
    cfg: GenerateConfig,
    seed: int = 0,
    pixel_bounds: tuple[Tensor, Tensor] | None = None,
    x0: Tensor | None = None,
    noise_std: float = 1.0,
    callback: Callable[[dict[str, float]], None] | None = None,
    target_mix: float = 0.0,
) -> Generated:
    """``per_class`` images of every class (class 0 first), from noise of std ``noise_std`` on the coarsest grid
    (:func:`noise_start`) or from ``x0`` (e.g. natural-image crops). With ``target_mix`` > 0 each image's class c is
    optimised as (1 − δ)·e_c + δ·e_{c'}, δ ~ U(0, ``target_mix``) (< 0.5), c' a random other class."""
    if not 0.0 <= target_mix < 0.5:
        raise ValueError(f"target_mix must be in [0, 0.5), got {target_mix}")
    y = torch.arange(num_classes).repeat_interleave(per_class)
    g = torch.Generator().manual_seed(seed)
    if x0 is None:
        x0 = noise_start(y.numel(), in_shape, cfg, g, noise_std)
    target = y
    if target_mix > 0:
        delta = torch.rand(y.numel(), generator=g) * target_mix
        other = (y + torch.randint(1, num_classes, (y.numel(),), generator=g)) % num_classes
        eye = torch.eye(num_classes)
        target = (1 - delta)[:, None] * eye[y] + delta[:, None] * eye[other]
    out = generate_images(teacher, x0, target, cfg, seed, pixel_bounds, callback)
    out.y = y  # the class each image is of (the mixed targets only steered the optimisation)
    return out


def soft_targets(class_a: int, class_b: int, delta: float, num_classes: int) -> Tensor:
    """y = (1 − δ)·onehot(a) + δ·onehot(b) (paper §5.4; δ = 0.6 in the paper). Shape (C,)."""
    if not 0.0 <= delta <= 1.0:
        raise ValueError(f"delta must be in [0, 1], got {delta}")
    y = torch.zeros(num_classes)
    y[class_a] += 1.0 - delta
    y[class_b] += delta
    return y


def interpolate(
    teacher: nn.Module,
    pairs: list[tuple[int, int]],
    deltas: list[float],
    num_classes: int,
    in_shape: tuple[int, ...],
    cfg: GenerateConfig,
    seed: int = 0,
    pixel_bounds: tuple[Tensor, Tensor] | None = None,
    noise_std: float = 1.0,
) -> tuple[Generated, Tensor, Tensor]:
    """Interpolation strips: for each class pair (a, b), one image per δ with soft target (1 − δ)·y_a + δ·y_b,
    every image of a strip starting from the same noise (one optimisation for all strips).

    Returns:
        (generated, pair index (K,), δ (K,)), strips in ``pairs`` order, δ ascending within a strip.
    """
    gen = torch.Generator().manual_seed(seed)
    starts = noise_start(len(pairs), in_shape, cfg, gen, noise_std)
    x0 = starts.repeat_interleave(len(deltas), dim=0)
    y = torch.stack([soft_targets(a, b, d, num_classes) for a, b in pairs for d in deltas])
    pair_idx = torch.arange(len(pairs)).repeat_interleave(len(deltas))
    delta = torch.tensor(deltas, dtype=torch.float32).repeat(len(pairs))
    return generate_images(teacher, x0, y, cfg, seed, pixel_bounds), pair_idx, delta


def edit_images(
    teacher: nn.Module,
    images: Tensor,
    targets: Tensor,
    cfg: GenerateConfig,
    seed: int = 0,
    pixel_bounds: tuple[Tensor, Tensor] | None = None,
    confidence: float = 0.9,
) -> Generated:
    """Editing (paper §5.4): real images (K, C, H, W) pushed towards ``targets`` (K,) at full resolution
    (``levels`` is forced to 0: a coarse restart would discard the image being edited), each frozen once the
    teacher gives its target ``confidence`` (the smallest edit that convinces it; at most ``cfg.steps``)."""
    return generate_images(teacher, images, targets, replace(cfg, levels=0), seed, pixel_bounds,
                           stop_conf=confidence)


@dataclass
class Showcase:
    """What :func:`showcase` makes.

    Attributes:
        samples: ``per_class`` images of every class, class 0 first.
        strips: the interpolation strips, in pair order, δ ascending within a strip.
        pair, delta: (K,) the strip and δ of each strip image.
        edits: the edited images (None when there are none); ``edit_index`` (into the test split) and
            ``edit_to`` (their targets, the next class) say which.
    """

    samples: Generated
    strips: Generated
    pair: Tensor
    delta: Tensor
    edits: Generated | None
    edit_index: Tensor
    edit_to: Tensor


def class_pairs(pairs: Sequence[Sequence[int]] | None, num_classes: int) -> list[tuple[int, int]]:
    """The strips' class pairs: ``pairs``, or when None (0, 1), (2, 3), (4, 5) (as many as the classes allow)."""
    if pairs is not None:
        return [(int(a), int(b)) for a, b in pairs]
    return [(a, a + 1) for a in range(0, min(num_classes - 1, 6), 2)]


def edit_choice(y_test: Tensor, n: int, num_classes: int) -> tuple[Tensor, Tensor]:
    """The images to edit: the first test image of classes 0, 1, ... (cycling; the k-th image of a class on the k-th
    lap), ``n`` in all (fewer when a class runs out), and each one's target, the next class (c + 1 mod C)."""
    idx, to = [], []
    per_class = [(y_test == k).nonzero(as_tuple=True)[0] for k in range(num_classes)]
    for i in range(n):
        k, lap = i % num_classes, i // num_classes
        if lap < per_class[k].numel():
            idx.append(int(per_class[k][lap]))
            to.append((k + 1) % num_classes)
    return torch.tensor(idx, dtype=torch.long), torch.tensor(to, dtype=torch.long)


def showcase(
    teacher: nn.Module,
    num_classes: int,
    in_shape: tuple[int, ...],
    cfg: GenerateConfig,
    test: tuple[Tensor, Tensor],
    *,
    per_class: int,
    pairs: Sequence[Sequence[int]] | None,
    deltas: Sequence[float],
    edits: int,
    seed: int = 0,
    pixel_bounds: tuple[Tensor, Tensor] | None = None,
    x0: Tensor | None = None,
    noise_std: float = 1.0,
    target_mix: float = 0.0,
    callback: Callable[[dict[str, float]], None] | None = None,
) -> Showcase:
    """The teacher as a generator (paper §5.4), one recipe for all: ``per_class`` samples of every class (:func:`sample`
    from noise, or from ``x0``; seed ``seed``), one interpolation strip per class pair (:func:`class_pairs`,
    :func:`interpolate`; seed + 1) and ``edits`` real test images (``test`` = (x, y), :func:`edit_choice`) pushed to
    the next class (:func:`edit_images`; seed + 2). ``callback`` receives the samples' trace rows."""
    samples = sample(teacher, per_class, num_classes, in_shape, cfg, seed=seed, pixel_bounds=pixel_bounds, x0=x0,
                     noise_std=noise_std, callback=callback, target_mix=target_mix)
    strips, pair, delta = interpolate(teacher, class_pairs(pairs, num_classes), list(deltas), num_classes, in_shape,
                                      cfg, seed=seed + 1, pixel_bounds=pixel_bounds, noise_std=noise_std)
    index, to = edit_choice(test[1], edits, num_classes)
    edited = edit_images(teacher, test[0][index], to, cfg, seed=seed + 2, pixel_bounds=pixel_bounds) if len(index) \
        else None
    return Showcase(samples, strips, pair, delta, edited, index, to)

"""Stage ``generate``: the teacher as a generator (paper §5.4), scored by the independent judge.

Three products, one recipe (``generate.recipe``, :class:`dsv.generate.GenerateConfig`):

* **samples**: ``generate.per_class`` images of every class from noise (or from the 0-shot pool);
* **interpolation strips**: for each class pair (a, b), one image per δ with soft target (1 − δ)·y_a + δ·y_b,
  all images of a strip starting from the same noise;
* **edits**: real test images pushed to the next class (c → c + 1 mod C), at full resolution.

Outputs (``artifacts/generate/``): ``generated.parquet`` (one row per image: kind, target, soft target, δ,
pair, source index, teacher and judge probabilities, PNG bytes; :func:`tasks.artifacts.write_generated_parquet`),
``generated.safetensors`` (the same images in normalised space), ``samples.png``, ``interpolation.png``,
``edits.png``, ``trace.json``; ``metrics/generate.json``: the teacher's and the judge's accuracy on the samples'
intended classes, the judge's confidence, the Fréchet distance of the samples to real test images of the same
classes beside that of raw noise and of a second real draw (the floor at this sample size), whether the strips'
ends are classified as a and b, and how many edits flip the teacher's and the judge's prediction.
Inputs that are not images (tabular data) are skipped: the stage writes an empty trace and says so.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any, Protocol

import torch
import torch.nn.functional as F

from dsv.checks import at_least, one_of, positive
from dsv.data.core import denormalize
from dsv.generate import GenerateConfig, Generated, edit_images, interpolate, sample
from dsv.judge import judge_score, matched_real
from dsv.train import predict_logits
from tasks.artifacts import (
    PARAMS_HASH_KEY,
    load_model,
    load_split,
    load_tensors,
    read_data_meta,
    save_tensors,
    write_generated_parquet,
)
from tasks.atomic import write_json
from tasks.figures import image_grid, image_matrix
from tasks.output import StageConfig, StageOutput, device_of, finish
from tasks.paths import Paths
from tasks.plain import params_hash, to_plain
from tasks.progress import Bar
from tasks.ranges import GE0, GE1, GT0, SEED, UNIT, Range, register
from tasks.tracking import StageLog

GENERATE_INITS = ("noise", "pool")


@dataclass(frozen=True)
class GenerateStageConfig:
    """Stage ``generate``: the teacher used as a generator (paper §5.4), scored by the judge.

    Attributes:
        per_class: images generated per class (the ``samples`` grid).
        init: what samples start from: "noise" (standard normal in normalised units, times ``noise_std``) or
            "pool" (crops of the 0-shot pool, ``prepare.init_pool``).
        noise_std: scale of the starting noise.
        pairs: class pairs of the interpolation strips, e.g. [[0, 1], [5, 7]]; null = (0, 1), (2, 3), (4, 5)
            (as many as the classes allow, at most three).
        deltas: δ of each strip image: soft target (1 − δ)·y_a + δ·y_b.
        edits: real test images edited, the first test image of classes 0, 1, ... (cycling), each pushed to the
            next class (c + 1 mod C). 0 = no edits.
        seed: seeds the noise, the augmentation draws and the judge's reference draws.
        recipe: the optimisation (``dsv.generate.GenerateConfig``); edits use it at full resolution.
    """

    per_class: int = 4
    init: str = "noise"
    noise_std: float = 1.0
    pairs: tuple[tuple[int, int], ...] | None = None
    deltas: tuple[float, ...] = (0.0, 0.2, 0.4, 0.6, 0.8, 1.0)
    edits: int = 10
    seed: int = 0
    recipe: GenerateConfig = field(default_factory=GenerateConfig)

    def __post_init__(self) -> None:
        one_of("init", self.init, GENERATE_INITS)
        at_least(self, 1, "per_class")
        at_least(self, 0, "edits")
        positive(self, "noise_std")
        bad = [d for d in self.deltas if not 0.0 <= d <= 1.0]
        if bad or not self.deltas:
            raise ValueError(f"deltas must be a non-empty list of values in [0, 1], got {list(self.deltas)}")
        for a, b in self.pairs or ():
            if a == b or min(a, b) < 0:
                raise ValueError(f"pairs must hold two different class indices >= 0, got [{a}, {b}]")


register(GenerateStageConfig, {"per_class": GE1, "noise_std": GT0, "pairs": Range(0, note="class indices"),
                               "deltas": UNIT, "edits": GE0, "seed": SEED})


class Config(StageConfig, Protocol):
    @property
    def generate(self) -> GenerateStageConfig: ...


def check(cfg: Any, data: dict[str, Any] | None = None) -> list[str]:
    """With ``data`` (meta.json): the interpolation pairs must name classes of the data."""
    c = len(data["classes"]) if data is not None else 0
    bad = [list(p) for p in cfg.generate.pairs or () if max(p) >= c] if data is not None else []
    return [f"generate.pairs {bad} name classes beyond the {c} of the data (indices 0-{c - 1})"] if bad else []


def run(cfg: Config, paths: Paths, log: StageLog) -> StageOutput:
    """Generate samples, strips and edits and score them; see the module docstring."""
    started = time.perf_counter()
    gcfg = cfg.generate
    meta = read_data_meta(paths.data_meta)
    if len(meta.input_shape) != 3:
        write_json(paths.generate_trace, [])
        print(f"generate: skipped, the inputs of shape {list(meta.input_shape)} are not images")
        return finish("generate", cfg, paths, [paths.generate_trace], {"skipped": 1}, started)
    device = device_of(cfg)
    teacher = load_model(paths.teacher, paths.teacher_spec, device)
    judge = load_model(paths.judge, paths.judge_spec, device)
    mean, std = meta.stats()
    bounds = ((0.0 - mean) / std, (1.0 - mean) / std)
    c, shape = meta.num_classes, tuple(meta.input_shape)
    x_test, y_test = load_split(paths.test, meta)
    recipe = gcfg.recipe
    pairs = class_pairs(gcfg.pairs, c)
    edit_idx, edit_to = _edit_choice(y_test, gcfg.edits, c)
    n_images = gcfg.per_class * c + len(pairs) * len(gcfg.deltas) + edit_idx.numel()
    trace: list[dict[str, Any]] = []
    bar = Bar(cfg.runtime.progress, 3 * recipe.steps, "generate", unit="step")

    def tracer(part: str, offset: int) -> Any:
        def on_row(row: dict[str, float]) -> None:
            trace.append({"part": part, **row})
            log.metric(f"{part}.conf_target", row["conf_target"], step=int(row["step"]))
            bar.to(offset + int(row["step"]), conf=row["conf_target"])
        return on_row

    with bar:
        x0 = _pool_starts(paths, meta, gcfg.per_class * c, gcfg.seed) if gcfg.init == "pool" else None
        samples = sample(teacher, gcfg.per_class, c, shape, recipe, seed=gcfg.seed, pixel_bounds=bounds, x0=x0,
                         noise_std=gcfg.noise_std, callback=tracer("samples", 0))
        strips, pair_idx, deltas = interpolate(teacher, pairs, list(gcfg.deltas), c, shape, recipe,
                                               seed=gcfg.seed + 1, pixel_bounds=bounds, noise_std=gcfg.noise_std)
        bar.to(2 * recipe.steps)
        edits = (edit_images(teacher, x_test[edit_idx], edit_to, recipe, seed=gcfg.seed + 2, pixel_bounds=bounds)
                 if edit_idx.numel() else None)
    gen_seconds = time.perf_counter() - started

    g = torch.Generator().manual_seed(gcfg.seed)
    # The reference: real test images with the samples' class counts; the floor: a second, disjoint draw. A small
    # test split gives what it has, and a set of fewer than 2 images gets no scores (NaN) instead of an error.
    reference = matched_real(samples.y, y_test, g, strict=False)
    used = torch.zeros_like(y_test, dtype=torch.bool)
    used[reference] = True
    second = matched_real(samples.y, y_test, g, exclude=used, strict=False)
    noise = (gcfg.noise_std * torch.randn(samples.x.shape, generator=g)).clamp(bounds[0].view(1, -1, 1, 1),
                                                                               bounds[1].view(1, -1, 1, 1))
    metrics: dict[str, Any] = {
        "images": n_images,
        "samples_teacher_acc": float((samples.probs.argmax(1) == samples.y).float().mean()),
        "per_image_seconds": round(gen_seconds / max(n_images, 1), 4),
    }
    for name, xs, ys in (("samples", samples.x, samples.y), ("noise", noise, samples.y),
                         ("real", x_test[second], y_test[second])):
        ok = reference.numel() >= 2 and xs.shape[0] >= 2
        s = judge_score(judge, xs, ys, x_test[reference]) if ok else None
        for k in ("acc", "conf", "frechet", "intra_class_cos", "collapse"):
            metrics[f"{name}_judge_{k}"] = getattr(s, k) if s is not None else float("nan")
    metrics.update(_strip_metrics(judge, strips, pair_idx, deltas, pairs))
    if edits is not None:
        metrics["edits_teacher_flip_rate"] = float((edits.probs.argmax(1) == edit_to).float().mean())
        metrics["edits_judge_flip_rate"] = float((predict_logits(judge, edits.x).argmax(1) == edit_to).float().mean())

    parts = [("sample", samples, torch.full((samples.y.numel(),), -1), torch.full((samples.y.numel(),), float("nan")),
              torch.full((samples.y.numel(),), -1)),
             ("interpolation", strips, pair_idx, deltas, torch.full((pair_idx.numel(),), -1))]
    if edits is not None:
        parts.append(("edit", edits, torch.full((edit_idx.numel(),), -1), torch.full((edit_idx.numel(),), float("nan")),
                      edit_idx))
    x_all = torch.cat([p[1].x for p in parts])
    soft = torch.cat([_soft(p[1].y, c) for p in parts])
    write_generated_parquet(
        paths.generated_parquet, x=denormalize(x_all, mean, std), kind=[p[0] for p in parts for _ in range(p[1].x.shape[0])],
        target=soft.argmax(1), soft_target=soft, delta=torch.cat([p[3] for p in parts]),
        pair=torch.cat([p[2] for p in parts]), source_index=torch.cat([p[4] for p in parts]),
        teacher_probs=torch.cat([p[1].probs for p in parts]),
        judge_probs=F.softmax(predict_logits(judge, x_all), dim=1), class_names=meta.classes,
        metadata={PARAMS_HASH_KEY: params_hash(to_plain(cfg.generate)), "dsv.dataset": meta.name},
    )
    save_tensors(paths.generated, {"x": x_all.contiguous(), "soft_target": soft.contiguous()})
    write_json(paths.generate_trace, trace)
    figures = _figures(samples, strips, edits, x_test[edit_idx] if edits is not None else None, pairs,
                       list(gcfg.deltas), edit_to, meta, mean, std)
    written = []
    for name, fig in figures.items():
        fig.savefig(paths.generate_figure(name), dpi=110)
        written.append(paths.generate_figure(name))
        log.figure(fig, f"generate/{name}.png")
    log.metrics({k: v for k, v in metrics.items() if isinstance(v, (int, float))})
    return finish("generate", cfg, paths, [paths.generated_parquet, paths.generated, paths.generate_trace, *written],
                  metrics, started, device=device)


def class_pairs(pairs: tuple[tuple[int, int], ...] | None, num_classes: int) -> list[tuple[int, int]]:
    """The interpolation strips' class pairs: ``generate.pairs``, or when null (0, 1), (2, 3), (4, 5) (as many as
    ``num_classes`` allows)."""
    if pairs is not None:
        return [(int(a), int(b)) for a, b in pairs]
    return [(a, a + 1) for a in range(0, min(num_classes - 1, 6), 2)]


def _edit_choice(y_test: torch.Tensor, n: int, num_classes: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The first test image of classes 0, 1, ... (cycling; the k-th image of a class on the k-th lap) and
    its edit target, the next class."""
    idx, to = [], []
    per_class = [(y_test == k).nonzero(as_tuple=True)[0] for k in range(num_classes)]
    for i in range(n):
        k, lap = i % num_classes, i // num_classes
        if lap < per_class[k].numel():
            idx.append(int(per_class[k][lap]))
            to.append((k + 1) % num_classes)
    return torch.tensor(idx, dtype=torch.long), torch.tensor(to, dtype=torch.long)


def _pool_starts(paths: Paths, meta: Any, n: int, seed: int) -> torch.Tensor:
    """``n`` images of the 0-shot pool (normalised like the task's inputs), drawn with a seed."""
    pool = load_tensors(paths.init_pool, ("x",))["x"]
    if pool.shape[0] == 0:
        raise ValueError("generate.init = 'pool' needs the 0-shot pool, which is empty (see prepare.init_pool)")
    mean, std = meta.stats()
    g = torch.Generator().manual_seed(seed)
    idx = torch.randint(pool.shape[0], (n,), generator=g) if pool.shape[0] < n else torch.randperm(pool.shape[0], generator=g)[:n]
    return (pool[idx] - mean.view(1, -1, 1, 1)) / std.view(1, -1, 1, 1)


def _soft(y: torch.Tensor, num_classes: int) -> torch.Tensor:
    return y.float() if y.dim() == 2 else F.one_hot(y, num_classes).float()


def _strip_metrics(judge: torch.nn.Module, strips: Generated, pair_idx: torch.Tensor,
                   deltas: torch.Tensor, pairs: list[tuple[int, int]]) -> dict[str, float]:
    """Fraction of strips whose δ = min end is classified as a and δ = max end as b (teacher, judge)."""
    if not pairs:
        return {}
    lo, hi = deltas.min(), deltas.max()
    a = torch.tensor([pairs[int(p)][0] for p in pair_idx])
    b = torch.tensor([pairs[int(p)][1] for p in pair_idx])
    out = {}
    for name, pred in (("teacher", strips.probs.argmax(1)), ("judge", predict_logits(judge, strips.x).argmax(1))):
        ends = torch.cat([pred[deltas == lo] == a[deltas == lo], pred[deltas == hi] == b[deltas == hi]])
        out[f"strips_{name}_ends_acc"] = float(ends.float().mean())
    return out


def _figures(samples: Generated, strips: Generated, edits: Generated | None, originals: torch.Tensor | None,
             pairs: list[tuple[int, int]], deltas: list[float], edit_to: torch.Tensor, meta: Any,
             mean: torch.Tensor, std: torch.Tensor) -> dict[str, Any]:
    names = meta.classes
    figs = {"samples": image_grid(denormalize(samples.x, mean, std), samples.y, names,
                                  "samples from noise: one row per target class", per_class=10)}
    k = len(deltas)
    rows = [denormalize(strips.x[i * k:(i + 1) * k], mean, std) for i in range(len(pairs))]
    if rows:
        figs["interpolation"] = image_matrix(rows, [f"{names[a][:10]}\n→ {names[b][:10]}" for a, b in pairs],
                                             [f"δ={d:g}" for d in deltas], "interpolation: soft target (1−δ)·a + δ·b")
    if edits is not None and originals is not None:
        before = denormalize(originals, mean, std)
        after = denormalize(edits.x, mean, std)
        hard_from = [names[int(t - 1) % len(names)][:10] for t in edit_to]
        figs["edits"] = image_matrix([before, after], ["real", "edited"],
                                     [hard_from, [f"→ {names[int(t)][:10]}" for t in edit_to]],
                                     "edits: real test images pushed to the next class")
    return figs

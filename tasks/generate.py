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
from dsv.generate import GenerateConfig, Showcase, class_pairs, showcase
from dsv.judge import judge_score, matched_real, nearest
from dsv.train import predict_logits
from tasks.artifacts import (
    PARAMS_HASH_KEY,
    DataMeta,
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
        target_mix: per-sample targets of the samples: each image's class c is optimised as (1 − δ)·e_c + δ·e_{c'},
            δ ~ U(0, ``target_mix``), c' a random other class (their label stays c). 0 = off.
        recipe: the optimisation (``dsv.generate.GenerateConfig``); edits use it at full resolution.
    """

    per_class: int = 4
    init: str = "noise"
    noise_std: float = 1.0
    pairs: tuple[tuple[int, int], ...] | None = None
    deltas: tuple[float, ...] = (0.0, 0.2, 0.4, 0.6, 0.8, 1.0)
    edits: int = 10
    seed: int = 0
    target_mix: float = 0.0
    recipe: GenerateConfig = field(default_factory=GenerateConfig)

    def __post_init__(self) -> None:
        one_of("init", self.init, GENERATE_INITS)
        at_least(self, 1, "per_class")
        at_least(self, 0, "edits")
        if not 0.0 <= self.target_mix < 0.5:
            raise ValueError(f"target_mix must be in [0, 0.5), got {self.target_mix}")
        positive(self, "noise_std")
        bad = [d for d in self.deltas if not 0.0 <= d <= 1.0]
        if bad or not self.deltas:
            raise ValueError(f"deltas must be a non-empty list of values in [0, 1], got {list(self.deltas)}")
        for a, b in self.pairs or ():
            if a == b or min(a, b) < 0:
                raise ValueError(f"pairs must hold two different class indices >= 0, got [{a}, {b}]")


register(GenerateStageConfig, {"per_class": GE1, "noise_std": GT0, "pairs": Range(0, note="class indices"),
                               "deltas": UNIT, "edits": GE0, "seed": SEED,
                               "target_mix": Range(0, 0.5, high_open=True, note="< 0.5 keeps the class the argmax")})


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
    started, g = time.perf_counter(), cfg.generate
    meta = read_data_meta(paths.data_meta)
    if not meta.images:
        write_json(paths.generate_trace, [])
        print(f"generate: skipped, the inputs of shape {list(meta.input_shape)} are not images")
        return finish("generate", cfg, paths, [paths.generate_trace], {"skipped": 1}, started)
    device = device_of(cfg)
    teacher = load_model(paths.teacher, paths.teacher_spec, device)
    judge = load_model(paths.judge, paths.judge_spec, device)
    test = load_split(paths.test, meta)
    trace: list[dict[str, Any]] = []
    bar = Bar(cfg.runtime.progress, 3 * g.recipe.steps, "generate", unit="step")

    def on_row(row: dict[str, float]) -> None:
        trace.append({"part": "samples", **row})
        log.metric("samples.conf_target", row["conf_target"], step=int(row["step"]))
        bar.to(int(row["step"]), conf=row["conf_target"])

    with bar:
        x0 = _pool_starts(paths, meta, g.per_class * meta.num_classes, g.seed) if g.init == "pool" else None
        out = showcase(teacher, meta.num_classes, meta.input_shape, g.recipe, test, per_class=g.per_class,
                       pairs=g.pairs, deltas=g.deltas, edits=g.edits, seed=g.seed, pixel_bounds=meta.bounds(), x0=x0,
                       noise_std=g.noise_std, target_mix=g.target_mix, callback=on_row)
    n_images = out.samples.y.numel() + out.pair.numel() + out.edit_index.numel()
    metrics = {"images": n_images, "per_image_seconds": round((time.perf_counter() - started) / max(n_images, 1), 4),
               **_scores(judge, out, test, load_split(paths.train, meta), g.seed, g.noise_std, meta.bounds(),
                         class_pairs(g.pairs, meta.num_classes))}
    _write_images(paths, out, meta, judge, params_hash(to_plain(g)))
    write_json(paths.generate_trace, trace)
    written = []
    for name, fig in _figures(out, test[0], class_pairs(g.pairs, meta.num_classes), list(g.deltas), meta).items():
        fig.savefig(paths.generate_figure(name), dpi=110)
        written.append(paths.generate_figure(name))
        log.figure(fig, f"generate/{name}.png")
    log.metrics({k: v for k, v in metrics.items() if isinstance(v, (int, float))})
    return finish("generate", cfg, paths, [paths.generated_parquet, paths.generated, paths.generate_trace, *written],
                  metrics, started, device=device)


def _write_images(paths: Paths, out: Showcase, meta: DataMeta, judge: torch.nn.Module, digest: str) -> None:
    """Every generated image, one row each, into ``generated.parquet`` (pixel units, with the teacher's and the
    judge's probabilities) and ``generated.safetensors`` (normalised)."""
    parts = [("sample", out.samples, None, None, None), ("interpolation", out.strips, out.pair, out.delta, None)]
    parts += [("edit", out.edits, None, None, out.edit_index)] if out.edits is not None else []
    x_all = torch.cat([gen.x for _, gen, *_ in parts])
    soft = torch.cat([_soft(gen.y, meta.num_classes) for _, gen, *_ in parts])

    def column(i: int, fill: float) -> torch.Tensor:  # pair, δ or source index where it applies, else fill
        return torch.cat([p[i] if p[i] is not None else torch.full((p[1].x.shape[0],), fill) for p in parts])

    write_generated_parquet(
        paths.generated_parquet, x=meta.denormalize(x_all), kind=[p[0] for p in parts for _ in range(p[1].x.shape[0])],
        target=soft.argmax(1), soft_target=soft, delta=column(3, float("nan")), pair=column(2, -1).long(),
        source_index=column(4, -1).long(), teacher_probs=torch.cat([p[1].probs for p in parts]),
        judge_probs=F.softmax(predict_logits(judge, x_all), dim=1), class_names=meta.classes,
        metadata={PARAMS_HASH_KEY: digest, "dsv.dataset": meta.name},
    )
    save_tensors(paths.generated, {"x": x_all.contiguous(), "soft_target": soft.contiguous()})


def _pool_starts(paths: Paths, meta: DataMeta, n: int, seed: int) -> torch.Tensor:
    """``n`` images of the 0-shot pool (normalised like the task's inputs), drawn with a seed."""
    pool = load_tensors(paths.init_pool, ("x",))["x"]
    if pool.shape[0] == 0:
        raise ValueError("generate.init = 'pool' needs the 0-shot pool, which is empty (see prepare.init_pool)")
    g = torch.Generator().manual_seed(seed)
    idx = torch.randint(pool.shape[0], (n,), generator=g) if pool.shape[0] < n else torch.randperm(pool.shape[0], generator=g)[:n]
    return meta.normalize(pool[idx])


def _scores(judge: torch.nn.Module, out: Showcase, test: tuple[torch.Tensor, torch.Tensor],
            train: tuple[torch.Tensor, torch.Tensor], seed: int,
            noise_std: float, bounds: tuple[torch.Tensor, torch.Tensor], pairs: list[tuple[int, int]]
            ) -> dict[str, float]:
    """The teacher's and the judge's view of the samples, raw noise and a second real draw; the strips' ends; the
    edits' flips; the samples' nearest training image (distance, and its label as a 1-NN judge). The reference: real test images with the samples' class counts; the floor: a second, disjoint
    draw. A small test split gives what it has, and a set of fewer than 2 images gets no scores (NaN)."""
    (x_test, y_test), samples, g = test, out.samples, torch.Generator().manual_seed(seed)
    reference = matched_real(samples.y, y_test, g, strict=False)
    used = torch.zeros_like(y_test, dtype=torch.bool)
    used[reference] = True
    second = matched_real(samples.y, y_test, g, exclude=used, strict=False)
    noise = (noise_std * torch.randn(samples.x.shape, generator=g)).clamp(bounds[0].view(1, -1, 1, 1),
                                                                          bounds[1].view(1, -1, 1, 1))
    metrics = {"samples_teacher_acc": float((samples.probs.argmax(1) == samples.y).float().mean())}
    for name, xs, ys in (("samples", samples.x, samples.y), ("noise", noise, samples.y),
                         ("real", x_test[second], y_test[second])):
        ok = reference.numel() >= 2 and xs.shape[0] >= 2
        s = judge_score(judge, xs, ys, x_test[reference]) if ok else None
        for k in ("acc", "conf", "frechet", "intra_class_cos", "collapse"):
            metrics[f"{name}_judge_{k}"] = getattr(s, k) if s is not None else float("nan")
    dist, idx = nearest(samples.x, train[0])
    metrics["samples_knn_acc"] = float((train[1][idx] == samples.y).double().mean())  # a judge of another family
    metrics["samples_nearest_train"] = float(dist.mean())
    if pairs:  # the strips whose δ = min end the models give class a and whose δ = max end class b
        lo, hi = out.delta == out.delta.min(), out.delta == out.delta.max()
        a, b = (torch.tensor([pairs[int(p)][i] for p in out.pair]) for i in (0, 1))
        for name, pred in (("teacher", out.strips.probs.argmax(1)), ("judge", predict_logits(judge, out.strips.x)
                                                                     .argmax(1))):
            metrics[f"strips_{name}_ends_acc"] = float(torch.cat([pred[lo] == a[lo], pred[hi] == b[hi]]).float().mean())
    if out.edits is not None:
        metrics["edits_teacher_flip_rate"] = float((out.edits.probs.argmax(1) == out.edit_to).float().mean())
        metrics["edits_judge_flip_rate"] = float((predict_logits(judge, out.edits.x).argmax(1) == out.edit_to)
                                                 .float().mean())
    return metrics


def _soft(y: torch.Tensor, num_classes: int) -> torch.Tensor:
    return y.float() if y.dim() == 2 else F.one_hot(y, num_classes).float()


def _figures(out: Showcase, x_test: torch.Tensor, pairs: list[tuple[int, int]], deltas: list[float], meta: DataMeta
             ) -> dict[str, Any]:
    names, k = meta.classes, len(deltas)
    figs = {"samples": image_grid(meta.denormalize(out.samples.x), out.samples.y, names,
                                  "samples from noise: one row per target class", per_class=10)}
    rows = [meta.denormalize(out.strips.x[i * k:(i + 1) * k]) for i in range(len(pairs))]
    if rows:
        figs["interpolation"] = image_matrix(rows, [f"{names[a][:10]}\n→ {names[b][:10]}" for a, b in pairs],
                                             [f"δ={d:g}" for d in deltas], "interpolation: soft target (1−δ)·a + δ·b")
    if out.edits is not None:
        hard_from = [names[int(t - 1) % len(names)][:10] for t in out.edit_to]
        figs["edits"] = image_matrix([meta.denormalize(x_test[out.edit_index]), meta.denormalize(out.edits.x)],
                                     ["real", "edited"], [hard_from, [f"→ {names[int(t)][:10]}" for t in out.edit_to]],
                                     "edits: real test images pushed to the next class")
    return figs

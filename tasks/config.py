"""params.yaml -> one typed, frozen :class:`PipelineConfig`, validated before anything runs.

The file has one section per stage that has settings (``prepare``, ``pretrain``, ``judge``, ``extract``,
``coreset``, ``distill``, ``generate``; ``evaluate`` only summarises and has none) plus ``runtime`` (device,
output folder, logging, parallelism; never part of a cache key). Each section is a frozen dataclass that
composes the ``dsv`` components' own config dataclasses (``ModelConfig``, ``FitConfig``,
``ExtractConfig``/``KKTConfig``/``AugmentConfig``, ``LambdaConfig``, ``DataConfig``, ``ProtocolConfig``, ...).

Defaults: the sections' defaults are the pipeline's, i.e. the main job (a 15-minute run on a 2-core CPU);
params.yaml writes every one of them out and a test keeps the two equal. A nested key left out of a file keeps
its section's default (``pretrain.fit.lr=...`` keeps the section's epochs). The ``dsv`` dataclasses keep their
own defaults, the field's and the paper's values, for people who call the library directly.

Validation is driven by the dataclass fields: unknown keys get a did-you-mean, values are checked
against the field's type hint with pydantic (strict: ``"5"`` is not an int; YAML lists become tuples),
and the dataclasses' own ``__post_init__`` range checks are reported under their full dotted key.
All problems are collected into one :class:`ConfigError` whose message is a single line.

This module decides nothing a stage computes: the stages see its work only as their params section's values,
which key their cache (so it is outside every stage's code closure, :mod:`tasks.stages`). Logic that turns a
value into behaviour (a default architecture, the merged per-init solver) lives in the stage module.

YAML is parsed exactly as DVC parses it (ruamel.yaml's safe loader, YAML 1.2: ``5e-4`` is a float;
duplicate keys are errors); aliases, non-UTF-8 text and files over 1 MiB are refused. Every float must
be finite (NaN and inf are rejected, naming the key).
"""

from __future__ import annotations

import dataclasses
import difflib
import functools
import json
import math
import os
import types
import typing
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

from pydantic import TypeAdapter, ValidationError

from dsv.baselines import ProxyConfig
from dsv.certificate import ConvergeConfig
from dsv.checks import at_least, one_of, positive
from dsv.data.registry import DATASET_NAMES, DataConfig
from dsv.dm import DMConfig
from dsv.extract import INITS, ExtractConfig
from dsv.generate import GenerateConfig
from dsv.lam import LambdaConfig
from dsv.models import ModelConfig
from dsv.protocols import METHOD_NAMES, ProtocolConfig
from dsv.train import FitConfig
from tasks.plain import to_plain
from tasks.ranges import ANY, GE0, GE1, GT0, SEED, UNIT, Range, out_of_range, register

T = TypeVar("T")

DEVICES = ("cpu", "cuda", "auto")
CUDA_GRAPHS = ("auto", "on", "off")
PROGRESS = ("auto", "on", "off")
# Keys that moved or went away, and what to write instead (an old params file gets this, not a bare "unknown key").
MOVED: dict[str, str] = {
    "evaluate": "the student protocol moved to the stage that trains the students: distill.protocol and "
                "distill.cross_model (the evaluate stage has no settings)",
    "extract.solver.kkt.eta": "the paper's η is split in two: extract.solver.kkt.eta_stat (stationarity on the "
                              "augmented copy) and extract.solver.kkt.eta_primal (the primal term on it)",
    "runtime.task_runner": "runtime.workers > 1 (or runtime.dask_address) runs the mapped units on Dask worker "
                           "processes; threads are gone",
}


class ConfigError(ValueError):
    """Invalid params: the message names every bad key and what is allowed, on one line."""


# ------------------------------------------------------------------------------------------ sections


@dataclass(frozen=True)
class RuntimeConfig:
    """Where and how to run. None of it changes the science; only the resolved device changes the bits of an
    artifact, so the device (never the rest of this section) is part of the cache key of the stages that compute
    on it (``tasks.stages.DEVICE_STAGES``).

    Attributes:
        device: "auto" (cuda when ``torch.cuda.is_available()``, else cpu), "cpu" or "cuda". Artifacts are
            bit-reproducible on CPU; on CUDA they agree with the CPU's within the spread of seeds, not bit for bit.
            The resolved device is recorded in every stage's ``timings/<stage>.json``, its MLflow run (tag
            ``device``) and the report.
        cuda_graphs: on CUDA, replay each fixed-shape training step (teacher, judge, students) from a CUDA graph
            captured once per training run: "auto" (= on when the device is cuda), "on" or "off". A step that
            cannot be captured runs eagerly (``dsv.train.StepRunner``); ignored on the CPU.
        threads: torch intra-op threads; 0 keeps torch's default.
        output_dir: folder holding ``artifacts/`` and ``metrics/``, relative to the project root.
        mlflow_experiment: MLflow experiment name.
        log_models: log the teacher and one student per (method, IPC) with ``mlflow.pytorch``.
        progress: progress bars: "auto" (only on a terminal), "on" or "off" (YAML's unquoted on/off and
            true/false booleans mean the same).
        workers: processes for the mapped units (shards, cells): 1 runs them one after another in this
            process; more starts a Dask LocalCluster of that many worker processes on 127.0.0.1 for the run
            (prefect-dask, one unit at a time each, no shared state; see :mod:`flows.runners`).
        dask_address: scheduler address of an existing Dask cluster (e.g. "tcp://127.0.0.1:8786") to run the
            mapped units on instead (``workers`` is then unused); null = as ``workers`` says.
        dvc_commit: after a successful ``dsv run`` in a DVC repository (a ``.dvc/`` folder next to
            dvc.yaml) with the default output folder, record the outputs in dvc.lock (``dvc commit``), so
            ``dvc status`` is clean and ``dvc repro`` reuses the run.
    """

    device: str = "auto"
    cuda_graphs: str = "auto"
    threads: int = 0
    output_dir: str = "."
    mlflow_experiment: str = "dsv"
    log_models: bool = True
    progress: str | bool = "auto"
    workers: int = 1
    dask_address: str | None = None
    dvc_commit: bool = True

    def __post_init__(self) -> None:
        at_least(self, 1, "workers")
        if self.dask_address is not None and (not self.dask_address.strip()
                                              or any(c.isspace() for c in self.dask_address)):
            raise ValueError(f"dask_address must be a scheduler address like 'tcp://host:8786' or null, "
                             f"got {self.dask_address!r}")
        one_of("device", self.device, DEVICES)
        one_of("cuda_graphs", self.cuda_graphs, CUDA_GRAPHS)
        if isinstance(self.progress, bool):  # YAML 1.1 reads an unquoted on/off as a boolean
            object.__setattr__(self, "progress", "on" if self.progress else "off")
        one_of("progress", str(self.progress), PROGRESS)
        at_least(self, 0, "threads")
        if not self.mlflow_experiment:
            raise ValueError("mlflow_experiment must not be empty")


@dataclass(frozen=True)
class InitPoolConfig:
    """Images of another dataset used to initialise 0-shot DSVs (no real image of the task).

    Attributes:
        dataset: any registry dataset; resized (and grey/RGB converted) to the task's image shape.
        root: where that dataset's files are looked for.
        size: number of pool images kept (seeded, stratified over the pool's classes); None keeps all.
        seed: seed of that subset.
    """

    dataset: str = "digits"
    root: str = "data"
    size: int | None = 500
    seed: int = 0

    def __post_init__(self) -> None:
        one_of("dataset", self.dataset, DATASET_NAMES)
        if self.size is not None and self.size < 1:
            raise ValueError(f"size must be >= 1 or null, got {self.size}")


@dataclass(frozen=True)
class NormalizeConfig:
    """The model's input normalisation, x' = (x - mean) / std per channel (per feature for tabular data).

    Attributes:
        mean: one value per channel (pixel units, [0, 1]) or per feature; None = the training split's.
        std: as ``mean``; every value > 0. Set both or neither, e.g. ImageNet's for a torchvision or timm
            checkpoint trained with them: mean [0.485, 0.456, 0.406], std [0.229, 0.224, 0.225].
    """

    mean: tuple[float, ...] | None = None
    std: tuple[float, ...] | None = None

    def __post_init__(self) -> None:
        if (self.mean is None) != (self.std is None):
            raise ValueError("mean and std must be set together (or both null)")
        if self.mean is not None and self.std is not None:
            if len(self.mean) != len(self.std) or not self.mean:
                raise ValueError(f"mean has {len(self.mean)} values but std has {len(self.std)}")
            if min(self.std) <= 0:
                raise ValueError(f"std must be > 0, got {list(self.std)}")


@dataclass(frozen=True)
class PrepareConfig:
    """Stage ``prepare``: load, hold out a validation split, normalise, build the 0-shot pool.

    Attributes:
        data: the dataset (name, root, per-class subset sizes).
        val_per_class: training images per class held out for model selection (never trained on).
        seed: seed of the validation split.
        init_pool: the 0-shot initialisation pool.
        normalize: the input normalisation every model sees (default: the training split's statistics; set
            it to what a checkpoint given in ``pretrain.checkpoint`` was trained with).
    """

    data: DataConfig = field(default_factory=DataConfig)
    val_per_class: int = 100
    seed: int = 0
    init_pool: InitPoolConfig = field(default_factory=InitPoolConfig)
    normalize: NormalizeConfig = field(default_factory=NormalizeConfig)

    def __post_init__(self) -> None:
        at_least(self, 0, "val_per_class")
        n = self.data.n_per_class
        if n is not None and self.val_per_class >= n:
            raise ValueError(
                f"val_per_class = {self.val_per_class} leaves no training images (data.n_per_class = {n})"
            )


@dataclass(frozen=True)
class PretrainConfig:
    """Stage ``pretrain``: the teacher Φ(·; θ*).

    Attributes:
        model: teacher architecture (the project's models, ``torchvision:<name>`` or ``timm:<name>``); ConvNet-3
            width 32 by default (width 64 costs 1.5-3.0x in the teacher-bound stages for +1.2 points of teacher
            accuracy on Fashion-MNIST and +0.3 on digits: benchmarks/results/teacher-width.md).
        checkpoint: a trained teacher's state dict (``.safetensors``, or a ``torch.save``'d state dict read
            with ``weights_only=True``; never a pickled model): the stage loads and verifies it (input shape,
            classes, test accuracy, KKT certificates) instead of training. Its content hash is part of the
            cache key; the file is never written. ``fit.weight_decay`` is then the ω the certificates assume.
        fit: teacher training (the paper's Adam, lr 1e-3, weight decay 5e-3; 5 epochs with a cosine schedule and no
            augmentation, which underfits at this budget: benchmarks/results/teacher.md), and at least 500 steps
            (5 epochs of scikit-learn's digits are 45 steps: a 12.5% teacher at width 32, 98.9% at 500 steps).
        converge: optional convergence phase after training (``dsv.certificate.ConvergeConfig``):
            full-batch L-BFGS on the final layer ("last") or every parameter ("all") until the teacher is
            a KKT point of mean CE + (ω/2)‖θ‖², ω = ``fit.weight_decay``.
        seed: seeds the initialisation and the batch order.
    """

    model: ModelConfig = field(default_factory=lambda: ModelConfig(name="convnet", width=32, depth=3))
    checkpoint: str | None = None
    fit: FitConfig = field(
        default_factory=lambda: FitConfig(
            optimizer="adam", lr=1e-3, weight_decay=5e-3, epochs=5, min_steps=500, batch_size=128, schedule="cosine",
            augment="none",
        )
    )
    converge: ConvergeConfig = field(default_factory=ConvergeConfig)
    seed: int = 0

    def __post_init__(self) -> None:
        if self.checkpoint is not None and not self.checkpoint.strip():
            raise ValueError("checkpoint must be a file path or null, got an empty string")


# Per-init solver settings that differ from ``extract.solver``: none by default. The KKT regime study
# (benchmarks/results/kkt-regime-*.md) found no per-init setting that beats the shared solver on both
# datasets at every IPC; its best n-shot setting at IPC 1 (a converged teacher, the NNLS λ step, l2, one
# spare candidate per DSV) is one override away (README, "The KKT regime"):
#   -S pretrain.converge.scope=last -S 'extract.by_init={nshot: {lam_solver: nnls, spare: 1.0, kkt: {distance: l2}}}'
# The teacher-only inits repel within a class (dsv.kkt.repulsion), as their warm-up does, and are not flipped by
# the augmented copy (an image optimised under flips becomes mirror-symmetric; classes have an orientation):
# measured on Fashion-MNIST and digits (benchmarks/results/diversity-*.md).
_TEACHER_ONLY_KKT = {"kkt": {"beta_repel": 0.05, "augment": {"ops": ["translate", "crop", "noise"]}}}
DEFAULT_BY_INIT: dict[str, dict[str, Any]] = {"0shot": _TEACHER_ONLY_KKT, "noise": _TEACHER_ONLY_KKT}


@dataclass(frozen=True)
class ExtractStageConfig:
    """Stage ``extract``: DSV synthesis for each init kind and IPC.

    Attributes:
        inits: initialisations to run: "nshot" (IPC real images per class), "0shot" (the init pool),
            "noise" (default: nshot and 0shot; noise runs in the benchmarks).
        ipcs: images per class to synthesise.
        shards: stratified shards per (init, IPC); each is a complete DeepKKT problem over every class
            with about IPC/shards candidates per class, run as its own task.
        seed: seeds candidate initialisation and the augmentation draws.
        solver: the DeepKKT optimisation (``dsv.extract.ExtractConfig``), for every init kind.
        by_init: per init kind ("nshot", "0shot", "noise"), keys of ``solver`` to override for that kind
            (nested sections merge key by key), e.g. ``{nshot: {lam_solver: nnls, spare: 1.0}}``. Default:
            none (see ``DEFAULT_BY_INIT``).
        warmup: the teacher-only inits ("0shot", "noise") are first inverted with this generator recipe
            (``dsv.generate.GenerateConfig``: coarse-to-fine, augmented views, priors; noise is drawn at its
            coarsest grid), then refined by the DeepKKT solver; null = DeepKKT from the raw starts.
    """

    inits: tuple[str, ...] = ("herding", "nshot", "0shot")
    ipcs: tuple[int, ...] = (10,)
    shards: int = 1
    seed: int = 0
    solver: ExtractConfig = field(default_factory=ExtractConfig)
    by_init: dict[str, dict[str, Any]] = field(default_factory=lambda: json.loads(json.dumps(DEFAULT_BY_INIT)))
    warmup: GenerateConfig | None = field(default_factory=GenerateConfig)

    def __post_init__(self) -> None:
        _choices("inits", self.inits, INITS)
        unknown = [k for k in self.by_init if k not in INITS]
        if unknown:
            raise ValueError(f"by_init has {unknown}; its keys are init kinds: {', '.join(INITS)}")
        for init, keys in self.by_init.items():  # validated here, merged by tasks.extract.solver_for
            errors: list[str] = []
            build(ExtractConfig, keys, f"extract.by_init.{init}", errors, base=self.solver)
            if errors:
                raise ValueError("; ".join(errors))
        _positive_ints("ipcs", self.ipcs)
        at_least(self, 1, "shards")
        if self.ipcs and self.shards > min(self.ipcs):
            raise ValueError(f"shards = {self.shards} exceeds the smallest IPC ({min(self.ipcs)}); "
                             "every shard needs at least one candidate per class")


@dataclass(frozen=True)
class CoresetConfig:
    """Stage ``coreset``: λ of every real training image (selection use of the paper).

    Attributes:
        lam: λ fitting settings (``dsv.lam.LambdaConfig``).
        seed: seeds the stratified batching and the subset.
        per_class: fit λ on a seeded subset of at most this many training images per class (default 300; a
            class with fewer gives all of its images; None = the whole training split). Fitting cost grows
            linearly with the images (≈50 s per 1000 images for the width-64 ConvNet on 2 CPU cores with
            ``lam.param_subset: all``; 22 s for 3,000 images with the default width-32 teacher and subset).
    """

    lam: LambdaConfig = field(default_factory=LambdaConfig)
    seed: int = 0
    per_class: int | None = 300

    def __post_init__(self) -> None:
        if self.per_class is not None and self.per_class < 1:
            raise ValueError(f"per_class must be >= 1 or null, got {self.per_class}")


# The main job's comparison (15 minutes on a 2-core CPU); every method runs in benchmarks/table.py.
HEADLINE_METHODS = ("dsv_herding", "herding", "dsv_nshot", "random", "kkt_herding", "dsv_0shot")


@dataclass(frozen=True)
class DistillConfig:
    """Stage ``distill``: build each method's training set and train students on it.

    Attributes:
        methods: method names (``dsv.protocols.METHOD_NAMES``); default: the main job's headline comparison
            (``HEADLINE_METHODS``).
        ipcs: images per class; DSV methods need the same IPC in ``extract.ipcs``.
        seed: seeds the selection (random, proxies, DM init).
        dm: distribution matching settings (its real pool is the whole training split).
        proxy: proxy model of the forgetting/EL2N selectors.
        full_epochs: epochs of the ``full`` method's students (the protocol's epoch budget is meant
            for tiny sets; on the whole training split it would take days).
        dm_real: real images DM may use: "shots" (default; `ipc` per class, the same budget as
            dsv_nshot, synthetic images start from noise) or "full" (the whole training split, DM's
            original setting, initialised from real images).
        protocol: the students: architecture, trainer, label type and number of seeds
            (``dsv.protocols.ProtocolConfig``).
        cross_model: a second student architecture (e.g. ``{name: mlp, width: 256, depth: 2}`` or
            ``{name: resnet18}``) trained with the same protocol and seeds on every set; its accuracy is
            reported in extra columns (cross-architecture generalisation). None (default) skips it: it
            doubles the students' cost.
    """

    methods: tuple[str, ...] = HEADLINE_METHODS
    ipcs: tuple[int, ...] = (10,)
    seed: int = 0
    dm: DMConfig = field(default_factory=lambda: DMConfig(iterations=200, model=ModelConfig(name="convnet", width=64)))
    proxy: ProxyConfig = field(default_factory=lambda: ProxyConfig(
        model=ModelConfig(name="convnet", width=32),
        fit=FitConfig(optimizer="sgd", lr=0.01, momentum=0.9, weight_decay=5e-4, epochs=2, batch_size=256,
                      augment="flip_crop"),
        el2n_models=2, el2n_epochs=1))
    full_epochs: int = 2
    dm_real: str = "shots"
    protocol: ProtocolConfig = field(default_factory=lambda: ProtocolConfig(
        name="dd", epochs=300, min_steps=300, n_runs=2, model=ModelConfig(name="convnet", width=32)))
    cross_model: ModelConfig | None = None

    def __post_init__(self) -> None:
        _choices("methods", self.methods, METHOD_NAMES)
        _choices("dm_real", (self.dm_real,), ("shots", "full"))
        _positive_ints("ipcs", self.ipcs)
        at_least(self, 1, "full_epochs")


@dataclass(frozen=True)
class JudgeConfig:
    """Stage ``judge``: an independent classifier that scores generated and distilled images.

    It is trained on the real training split and never sees the teacher: another architecture (by default a
    BatchNorm + max-pool ConvNet of width 32, where the teacher is an InstanceNorm + average-pool ConvNet of
    the same width) and another seed. Its accuracy on the images' intended classes, its confidence, and a Fréchet
    distance in its penultimate features (:mod:`dsv.judge`) are what ``generate`` and ``evaluate`` report.

    Attributes:
        model: the judge's architecture (any ``pretrain.model`` name); null = a ConvNet (width 32, depth 3,
            BatchNorm, max pooling) for images, an MLP (width 128, depth 2) for feature vectors.
        fit: its training (2 epochs of Adam, at least 400 steps: 89.2% test accuracy on Fashion-MNIST in 49 s on 2
            CPU cores, where 2 epochs are 460 steps; on a small dataset the step floor binds).
        seed: seeds its initialisation and batch order (differs from ``pretrain.seed`` by default).
    """

    model: ModelConfig | None = None
    fit: FitConfig = field(default_factory=lambda: FitConfig(optimizer="adam", lr=2e-3, epochs=2, min_steps=400,
                                                             batch_size=256, schedule="cosine"))
    seed: int = 1


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


@dataclass(frozen=True)
class PipelineConfig:
    """The whole params file."""

    prepare: PrepareConfig = field(default_factory=PrepareConfig)
    pretrain: PretrainConfig = field(default_factory=PretrainConfig)
    judge: JudgeConfig = field(default_factory=JudgeConfig)
    extract: ExtractStageConfig = field(default_factory=ExtractStageConfig)
    coreset: CoresetConfig = field(default_factory=CoresetConfig)
    distill: DistillConfig = field(default_factory=DistillConfig)
    generate: GenerateStageConfig = field(default_factory=GenerateStageConfig)
    runtime: RuntimeConfig = field(default_factory=RuntimeConfig)

    def section_dict(self, name: str) -> dict[str, Any]:
        """One section as plain YAML-able data (tuples as lists)."""
        return to_plain(getattr(self, name))

    def sections(self, names: Sequence[str]) -> dict[str, Any]:
        """The named sections as plain data, e.g. the inputs of a stage's cache key."""
        return {n: self.section_dict(n) for n in names}

    def restricted(self, names: Sequence[str]) -> PipelineConfig:
        """A copy where every section not in ``names`` (except runtime) is back to its default.

        A stage runs on ``cfg.restricted(its sections)`` on every code path, so it cannot read a
        section its cache key (and dvc.yaml) does not list.
        """
        keep = set(names) | {"runtime"}
        defaults = PipelineConfig()
        return dataclasses.replace(
            defaults, **{f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.name in keep}
        )

    def to_dict(self) -> dict[str, Any]:
        return to_plain(self)


SECTIONS: tuple[str, ...] = tuple(f.name for f in dataclasses.fields(PipelineConfig))

# The ranges of the sections' own numeric keys (those of the dsv config classes: tasks.ranges).
for _cls, _ranges in {
    PrepareConfig: {"val_per_class": GE0, "seed": SEED},
    InitPoolConfig: {"size": GE1, "seed": SEED},
    NormalizeConfig: {"mean": ANY, "std": GT0},  # mean: a feature's mean may be negative
    PretrainConfig: {"seed": SEED},
    JudgeConfig: {"seed": SEED},
    ExtractStageConfig: {"ipcs": GE1, "shards": GE1, "seed": SEED},
    CoresetConfig: {"seed": SEED, "per_class": GE1},
    DistillConfig: {"ipcs": GE1, "seed": SEED, "full_epochs": GE1},
    GenerateStageConfig: {"per_class": GE1, "noise_std": GT0, "pairs": Range(0, note="class indices"),
                          "deltas": UNIT, "edits": GE0, "seed": SEED},
    RuntimeConfig: {"threads": Range(0, note="0 = torch's default"), "workers": GE1},
}.items():
    register(_cls, _ranges)


# ------------------------------------------------------------------------------------------- checks


def _choices(key: str, values: Sequence[str], allowed: Sequence[str]) -> None:
    for v in values:
        one_of(key, v, allowed)
    if len(set(values)) != len(values):
        raise ValueError(f"{key} has duplicates: {list(values)}")


def _positive_ints(key: str, values: Sequence[int]) -> None:
    bad = [v for v in values if v < 1]
    if bad:
        raise ValueError(f"{key} must all be >= 1, got {list(values)}")
    if len(set(values)) != len(values):
        raise ValueError(f"{key} has duplicates: {list(values)}")


def cross_check(cfg: PipelineConfig) -> list[str]:
    """Checks that span sections (run on the full file, not on a stage's restricted view)."""
    errors = []
    ckpt = cfg.pretrain.checkpoint
    if ckpt is not None and not Path(ckpt).is_file():
        errors.append(f"pretrain.checkpoint = {ckpt!r}: file not found (relative paths start at the project root)")
    errors.extend(check_columns(cfg.prepare.data))
    uses_pool = "0shot" in cfg.extract.inits or cfg.generate.init == "pool"
    if uses_pool and cfg.prepare.init_pool.dataset == cfg.prepare.data.name:
        errors.append(f"prepare.init_pool.dataset = {cfg.prepare.data.name!r} is the task's own dataset: 0-shot starts "
                      "must come from another one (e.g. photos, digits)")
    dsv_methods = [m for m in cfg.distill.methods if m.startswith("dsv_")]
    missing_init = [m for m in dsv_methods if m.removeprefix("dsv_") not in cfg.extract.inits]
    if missing_init:
        errors.append(
            f"distill.methods lists {missing_init} but extract.inits = {list(cfg.extract.inits)} "
            "does not produce them"
        )
    if dsv_methods:
        missing_ipc = [k for k in cfg.distill.ipcs if k not in cfg.extract.ipcs]
        if missing_ipc:
            errors.append(
                f"distill.ipcs {missing_ipc} are not in extract.ipcs = {list(cfg.extract.ipcs)} "
                "(the DSV methods need them extracted)"
            )
    k = cfg.coreset.per_class
    ranked = [m for m in ("lambda_topk", "support_topk") if m in cfg.distill.methods]
    if k is not None and ranked and any(i > k for i in cfg.distill.ipcs):
        errors.append(f"distill.ipcs {list(cfg.distill.ipcs)} exceed coreset.per_class = {k} "
                      f"({', '.join(ranked)} pick from the images λ was fitted on)")
    n = cfg.prepare.data.n_per_class
    if n is not None:
        available = n - cfg.prepare.val_per_class
        for key, ipcs in (("extract.ipcs", cfg.extract.ipcs), ("distill.ipcs", cfg.distill.ipcs)):
            too_big = [k for k in ipcs if k > available]
            if too_big:
                errors.append(
                    f"{key} {too_big} exceed the {available} training images per class "
                    f"(prepare.data.n_per_class {n} - prepare.val_per_class {cfg.prepare.val_per_class})"
                )
    return errors


def data_checks(cfg: PipelineConfig, classes: Sequence[str], train_per_class: Sequence[int],
                test_per_class: Sequence[int], input_shape: Sequence[int] | None = None) -> list[str]:
    """Checks that need the prepared data (run right after ``prepare``, before any expensive stage).

    Args:
        cfg: the whole config.
        classes: class names; train_per_class / test_per_class: images per class in the training split
            (after the validation hold-out) and in the test split.
        input_shape: one input's shape (for the memory estimate of the λ fit).

    Returns:
        One message per problem, naming the key to change.
    """
    errors = []
    if len(classes) < 2:
        errors.append(f"prepare.data: the dataset {cfg.prepare.data.name!r} has {len(classes)} class(es); "
                      "a classifier needs at least two")
    empty_test = [c for c, n in zip(classes, test_per_class) if n == 0]
    if empty_test:
        errors.append(f"prepare.data: class(es) {empty_test} have no test images (test split, "
                      "prepare.data.test_per_class): their accuracy would be undefined")
    empty_train = [c for c, n in zip(classes, train_per_class) if n == 0]
    if empty_train:
        errors.append(f"prepare.data: class(es) {empty_train} have no training images after the validation "
                      "hold-out (prepare.val_per_class)")
    errors.extend(_memory_checks(cfg, len(classes), sum(train_per_class), input_shape))
    if input_shape is not None and len(classes) >= 2:
        errors.extend(_shape_checks(cfg, tuple(input_shape), len(classes)))
    fewest = min(train_per_class) if train_per_class else 0
    for key, ipcs in (("extract.ipcs", cfg.extract.ipcs if "nshot" in cfg.extract.inits else ()),
                      ("distill.ipcs", cfg.distill.ipcs)):
        too_big = [k for k in ipcs if k > fewest]
        if too_big and fewest > 0:
            errors.append(f"{key} {too_big} exceed the {fewest} training images of the smallest class")
    pairs = cfg.generate.pairs or ()
    out_of_range = [list(p) for p in pairs if max(p) >= len(classes)]
    if out_of_range:
        errors.append(f"generate.pairs {out_of_range} name classes beyond the {len(classes)} of the data "
                      f"(indices 0-{len(classes) - 1})")
    return errors


def tabular_columns(path: Path) -> list[str]:
    """The column names of a CSV (its header line) or Parquet file (its schema), reading no data."""
    suffix = path.suffix.lower()
    if not path.is_file():
        raise FileNotFoundError(f"file {str(path)!r} not found")
    if suffix in (".parquet", ".pq"):
        import pyarrow.parquet as pq

        try:
            return list(pq.read_schema(path).names)
        except Exception as exc:  # noqa: BLE001 - pyarrow raises several types for a bad footer
            raise ValueError(f"{path} is not a readable Parquet file ({type(exc).__name__})") from None
    if suffix == ".csv":
        import csv

        with path.open(newline="", encoding="utf-8", errors="replace") as fh:
            return [c.strip() for c in next(csv.reader(fh), [])]
    raise ValueError(f"{path} is not a .csv or .parquet or .pq file")


def check_columns(data: DataConfig) -> list[str]:
    """Problems with a tabular config's columns, from the file's header alone (empty for other datasets)."""
    if data.name != "tabular":
        return []
    try:
        names = tabular_columns(Path(data.root))
    except (OSError, ValueError) as exc:
        return [f"prepare.data.root = {data.root!r}: {exc}"]
    out = []
    dupes = sorted({n for n in names if names.count(n) > 1})
    if dupes:
        out.append(f"prepare.data.root = {data.root!r}: column name(s) {dupes} appear more than once in its header; "
                   "every column needs its own name")
    shown = names if len(names) <= 12 else [*names[:6], "...", *names[-6:]]
    listed = ", ".join(shown) + (f" ({len(names)} columns)" if len(names) > 12 else "")
    if data.label not in names:
        hint = difflib.get_close_matches(str(data.label), names, n=1)
        extra = f" (did you mean {hint[0]!r}?)" if hint else ""
        out.append(f"prepare.data.label = {data.label!r} is not a column of {data.root}{extra}; its columns: {listed}")
    missing = [c for c in data.features or () if c not in names]
    if missing:
        out.append(f"prepare.data.features {missing} are not columns of {data.root}; its columns: {listed}")
    return out


def _shape_checks(cfg: PipelineConfig, input_shape: tuple[int, ...], num_classes: int) -> list[str]:
    """Every model the run builds must take the data's inputs, and image-only steps need images."""
    from dsv.models import build_model

    errors = []
    from tasks.judge import judge_model

    models = {"pretrain.model": cfg.pretrain.model, "distill.protocol.model": cfg.distill.protocol.model}
    if "dm" in cfg.distill.methods:
        models["distill.dm.model"] = cfg.distill.dm.model
    if {"forgetting", "el2n"} & set(cfg.distill.methods):
        models["distill.proxy.model"] = cfg.distill.proxy.model
    if cfg.distill.cross_model is not None:
        models["distill.cross_model"] = cfg.distill.cross_model
    models["judge.model"] = judge_model(cfg.judge, input_shape)
    for key, model in models.items():
        if ":" in model.name and key != "pretrain.model":
            continue  # torchvision/timm students are built per cell; their check is the same as the teacher's
        try:
            build_model(model, input_shape, num_classes)
        except ValueError as exc:
            errors.append(f"{key}: {exc}")
    if len(input_shape) != 3 and "0shot" in cfg.extract.inits:
        errors.append(f"extract.inits: '0shot' starts from images of another dataset, and {cfg.prepare.data.name!r} "
                      f"inputs of shape {list(input_shape)} are not images; use extract.inits=[nshot,noise] and "
                      "leave dsv_0shot out of distill.methods")
    return errors


def _memory_checks(cfg: PipelineConfig, num_classes: int, n_train: int, input_shape: Sequence[int] | None = None
                   ) -> list[str]:
    """The λ fit's per-sample gradient matrix (batch × P floats) against ``coreset.lam.max_bytes``, known
    before the teacher is trained (P from the architecture)."""
    import math as _math

    lam = cfg.coreset.lam
    if lam.param_subset != "all" or input_shape is None or num_classes < 2:
        return []
    from dsv.models import build_model

    try:
        p_total = sum(p.numel() for p in build_model(cfg.pretrain.model, tuple(input_shape), num_classes).parameters())
    except ValueError:
        return []
    n = min(n_train, cfg.coreset.per_class * num_classes) if cfg.coreset.per_class else n_train
    m = min(lam.batch_size, n)
    m_max = _math.ceil(n / max(1, round(n / m))) if m else 0
    need = m_max * p_total * 4
    if need > lam.max_bytes:
        return [f"coreset.lam.batch_size = {lam.batch_size}: a batch of {m_max} per-sample gradients of the "
                f"{p_total}-parameter teacher needs {need / 1e9:.1f} GB > coreset.lam.max_bytes = "
                f"{lam.max_bytes / 1e9:.1f} GB; lower the batch size or set coreset.lam.param_subset: last"]
    return []


# ------------------------------------------------------------------------------------------ loading


MAX_PARAMS_BYTES = 1 << 20  # a params file is a few KB; refuse anything that is not one
MAX_PARAMS_NODES = 100_000


def parse_yaml(text: str, source: str = "<string>") -> Any:
    """Parse YAML exactly as DVC does (ruamel.yaml, ``YAML(typ="safe")``: YAML 1.2, so ``5e-4`` is a
    float and ``on`` a string; a duplicate key is an error). Anchors/aliases are refused (a tiny alias
    bomb expands to gigabytes when the data is copied), and so is a text over 1 MiB; every problem
    becomes one :class:`ConfigError` line naming ``source``."""
    from ruamel.yaml import YAML
    from ruamel.yaml.error import YAMLError

    if len(text) > MAX_PARAMS_BYTES:
        raise ConfigError(f"{source}: {len(text)} characters; a params file may have at most {MAX_PARAMS_BYTES}")
    try:
        data = YAML(typ="safe").load(text)
    except YAMLError as exc:
        msg = " ".join(str(exc).split())
        raise ConfigError(f"{source}: not valid YAML: {msg}") from exc
    except RecursionError as exc:
        raise ConfigError(f"{source}: YAML nested too deeply") from exc
    _check_tree(data, source)
    return data


def _check_tree(data: Any, source: str) -> None:
    """Refuse shared nodes (YAML aliases) and oversized trees without expanding anything."""
    seen: set[int] = set()
    stack = [data]
    count = 0
    while stack:
        node = stack.pop()
        if isinstance(node, dict | list):
            if id(node) in seen:
                raise ConfigError(f"{source}: YAML anchors and aliases (&name / *name) are not allowed in params")
            seen.add(id(node))
            stack.extend(node.values() if isinstance(node, dict) else node)
        count += 1
        if count > MAX_PARAMS_NODES:
            raise ConfigError(f"{source}: more than {MAX_PARAMS_NODES} values; not a params file")


def _read_text(path: str | Path) -> str:
    """A params file's text (at most 1 MiB of UTF-8)."""
    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"params file {str(p)!r} not found")
    try:
        if p.stat().st_size > MAX_PARAMS_BYTES:
            raise ConfigError(f"{p}: {p.stat().st_size} bytes; a params file may have at most {MAX_PARAMS_BYTES}")
        return p.read_bytes().decode("utf-8")
    except UnicodeDecodeError as exc:
        raise ConfigError(f"{p}: not UTF-8 text (byte {exc.start}: {exc.reason})") from None
    except OSError as exc:
        raise ConfigError(f"params file {str(p)!r} cannot be read: {exc.strerror}") from None


def apply_overrides(raw: Mapping[str, Any], overrides: Sequence[str]) -> dict[str, Any]:
    """Apply DVC-style ``section.key=value`` overrides (value parsed as YAML) to a copy of ``raw``."""
    out: dict[str, Any] = json.loads(json.dumps(raw, default=list))  # deep copy of plain data
    for item in overrides:
        key, sep, value = item.partition("=")
        key = key.strip()
        if not sep or not key or any(not part for part in key.split(".")):
            raise ConfigError(f"override {item!r} is not of the form section.key=value")
        node = out
        parts = key.split(".")
        for part in parts[:-1]:
            child = node.get(part)
            if child is None:
                child = node[part] = {}
            if not isinstance(child, dict):
                raise ConfigError(f"override {item!r}: {part!r} is not a section")
            node = child
        node[parts[-1]] = parse_yaml(value, f"override {item!r}") if value.strip() else None
    return out


def load_config(path: str | Path | None = None, overrides: Sequence[str] = ()) -> PipelineConfig:
    """Load, override and validate a params file; raises :class:`ConfigError` naming every bad key.

    Parsed once per process: ``dsv run`` validates before Prefect starts and the flow asks again for the same
    file; the second call returns the same frozen object (keyed on the file's text, not its name or age).

    Args:
        path: params.yaml path; None = defaults only.
        overrides: ``section.key=value`` strings (``-S`` on the command line).
    """
    text = _read_text(path) if path is not None else None
    # Relative paths in the params (a checkpoint, a CSV) are read from the working directory: part of the key.
    key = (os.getcwd(), text, tuple(overrides))
    if key not in _PARSED:
        source = str(path) if path is not None else "params"
        raw = parse_yaml(text, source) if text is not None else {}
        if raw is None:  # an empty file: all defaults
            raw = {}
        if not isinstance(raw, dict):
            raise ConfigError(f"{source}: expected a mapping of sections ({', '.join(SECTIONS)}), "
                              f"got {type(raw).__name__}")
        _PARSED[key] = config_from_dict(apply_overrides(raw, overrides), source=source)
    return _PARSED[key]


_PARSED: dict[tuple[str, str | None, tuple[str, ...]], PipelineConfig] = {}


def config_from_dict(raw: Mapping[str, Any], source: str = "params") -> PipelineConfig:
    """Validate plain data (the parsed file with its overrides) into a config, with the cross-section checks.

    Args:
        raw: sections as plain data.
        source: file name used in messages.
    """
    errors: list[str] = []
    cfg = build(PipelineConfig, raw, "", errors)
    if cfg is not None and not errors:
        errors.extend(cross_check(cfg))
    if errors or cfg is None:
        raise ConfigError(f"{source}: " + "; ".join(errors))
    return cfg


# ------------------------------------------------------------------------------- generic validation


@functools.cache
def _hints(cls: type) -> dict[str, Any]:
    return typing.get_type_hints(cls)


@functools.cache
def _adapter(hint: Any) -> TypeAdapter[Any]:
    return TypeAdapter(hint)


def _dataclass_in(hint: Any) -> type | None:
    """The dataclass in ``hint`` (``X`` or ``X | None``), else None."""
    if dataclasses.is_dataclass(hint) and isinstance(hint, type):
        return hint
    if typing.get_origin(hint) in (typing.Union, types.UnionType):
        for arg in typing.get_args(hint):
            if dataclasses.is_dataclass(arg) and isinstance(arg, type):
                return arg
    return None


def _tuplify(value: Any) -> Any:
    if isinstance(value, list):
        return tuple(_tuplify(v) for v in value)
    return value


def _describe(hint: Any) -> str:
    text = str(hint) if not isinstance(hint, type) else hint.__name__
    return text.replace("typing.", "").replace("NoneType", "null")


def _default_of(f: dataclasses.Field[Any]) -> Any:
    if f.default is not dataclasses.MISSING:
        return f.default
    if f.default_factory is not dataclasses.MISSING:
        return f.default_factory()
    return dataclasses.MISSING


def _qualify(message: str, prefix: str, names: Sequence[str]) -> str:
    """A config class's message under its full key: the dsv configs name the field first, plainly ('width must be
    >= 1'), and ``prefix`` ('pretrain.model') makes it 'pretrain.model.width must be >= 1'; a message about the
    whole object gets 'pretrain.model: ...'."""
    first = message.split(" ", 1)[0].rstrip(":,").split(".")[0]
    if not prefix or f"'{prefix}." in message:
        return message
    return _join(prefix, message) if first in names else f"{prefix}: {message}"


def _join(prefix: str, name: str) -> str:
    return f"{prefix}.{name}" if prefix else name


def build(cls: type[T], raw: Any, prefix: str, errors: list[str], base: T | None = None) -> T | None:
    """Build dataclass ``cls`` from plain data, appending problems to ``errors``.

    Args:
        cls: a (frozen) dataclass.
        raw: mapping of field name -> value; nested dataclasses take nested mappings.
        prefix: dotted key of ``raw`` for messages ("" at the top).
        errors: receives one message per problem.
        base: the instance whose values fill the keys ``raw`` leaves out (a nested field's default
            instance), so a partial override keeps the parent's defaults.

    Returns:
        The instance, or None when a problem was found.
    """
    where = prefix or "the top level"
    if not isinstance(raw, Mapping):
        errors.append(f"{where} must be a mapping of keys, got {type(raw).__name__} {raw!r}")
        return None
    fields = {f.name: f for f in dataclasses.fields(cls)}  # type: ignore[arg-type]
    hints = _hints(cls)
    n_errors = len(errors)
    for key in raw:
        if key not in fields and _join(prefix, str(key)) in MOVED:
            errors.append(f"{_join(prefix, str(key))!r} is gone: {MOVED[_join(prefix, str(key))]}")
        elif key not in fields:
            hint = _suggest(str(key), cls)
            extra = f" (did you mean {_join(prefix, hint)!r}?)" if hint else ""
            errors.append(f"unknown key {_join(prefix, str(key))!r}{extra}; allowed keys in {where}: "
                          f"{', '.join(fields)}")
    values: dict[str, Any] = {}
    for name, f in fields.items():
        current = getattr(base, name) if base is not None else _default_of(f)
        if name not in raw:
            if current is dataclasses.MISSING:
                errors.append(f"missing key {_join(prefix, name)!r}")
            else:
                values[name] = current
            continue
        value, hint, key = raw[name], hints[name], _join(prefix, name)
        sub = _dataclass_in(hint)
        if sub is not None and isinstance(value, Mapping):
            sub_base = current if dataclasses.is_dataclass(current) else None
            values[name] = build(sub, value, key, errors, sub_base)
            continue
        try:
            values[name] = _adapter(hint).validate_python(_tuplify(value), strict=True)
        except ValidationError as exc:
            allowed = _describe(hint) if sub is None else f"a mapping of {', '.join(_field_names(sub))}"
            problem = exc.errors()[0]["msg"]
            errors.append(f"{key} = {value!r}: {problem} (expected {allowed})")
            continue
        if not _finite(values[name]):
            errors.append(f"{key} = {value!r}: must be a finite number (NaN and inf are not allowed)")
            continue
        problem = out_of_range(cls, name, values[name], optional=type(None) in typing.get_args(hint))
        if problem:
            errors.append(f"{key} {problem}")
    if len(errors) > n_errors:
        return None
    try:
        return cls(**values)
    except (ValueError, TypeError) as exc:
        errors.append(_qualify(str(exc), prefix, list(fields)))
        return None


def _finite(value: Any) -> bool:
    """False when ``value`` is (or holds) a NaN or infinite float."""
    if isinstance(value, float):
        return math.isfinite(value)
    if isinstance(value, tuple | list):
        return all(_finite(v) for v in value)
    return True


def _suggest(key: str, cls: type) -> str | None:
    """Closest field name to ``key``; also looks one level down ("steps" -> "solver.steps")."""
    own = _field_names(cls)
    hint = difflib.get_close_matches(key, own, n=1, cutoff=0.75)
    if hint:
        return hint[0]
    nested: dict[str, str] = {}
    for name, hint_type in _hints(cls).items():
        sub = _dataclass_in(hint_type)
        if sub is not None:
            for leaf in _field_names(sub):
                nested.setdefault(leaf, f"{name}.{leaf}")
    deep = difflib.get_close_matches(key, list(nested), n=1, cutoff=0.75)
    if deep:
        return nested[deep[0]]
    loose = difflib.get_close_matches(key, own, n=1)
    return loose[0] if loose else None


def _field_names(cls: type) -> list[str]:
    return [f.name for f in dataclasses.fields(cls)]  # type: ignore[arg-type]


def _numeric(hint: Any) -> bool:
    """Whether a field's type hint holds numbers (int, float, or tuples of them; bool is not a number here)."""
    if hint in (int, float):
        return True
    return any(_numeric(a) for a in typing.get_args(hint) if a is not Ellipsis)


def numeric_keys(cls: type = PipelineConfig, prefix: str = "") -> list[tuple[str, type, str, Any]]:
    """Every numeric key under ``cls``: (dotted key, its dataclass, field name, type hint), in field order
    (``extract.by_init`` holds ``extract.solver``'s keys and is not listed again)."""
    out: list[tuple[str, type, str, Any]] = []
    for f in dataclasses.fields(cls):  # type: ignore[arg-type]
        hint = _hints(cls)[f.name]
        key = _join(prefix, f.name)
        sub = _dataclass_in(hint)
        if sub is not None:
            out.extend(numeric_keys(sub, key))
        elif _numeric(hint):
            out.append((key, cls, f.name, hint))
    return out

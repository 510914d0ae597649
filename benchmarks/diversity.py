"""Teacher-only DSVs and generated sets: what each diversity mechanism does to the students and to the sets.

For each IPC and teacher-only start (``0shot``: the init pool, another dataset's images; ``noise``), every
variant extracts DSVs (or generates a set, ``kind = generate``) from the same starts with the same seeds, and
trains the same student seeds on it (paper protocol). Each row also reports how an independent judge (the
pipeline's ``judge`` stage) sees the set: accuracy on the intended class, Fréchet distance, the within-class
cosine of its judge features (centred on real images' mean; 1 = copies) beside real images', and the mean
distance to the nearest training image.

It runs in process on the outputs of the pipeline's prepare, pretrain and judge stages:

    for s in prepare pretrain judge; do dsv stage $s -S runtime.output_dir=outputs/refine/fashion_mnist --no-mlflow; done
    python benchmarks/diversity.py --base outputs/refine/fashion_mnist --ipcs 1 10

Writes benchmarks/results/diversity-<dataset>.json and .md: rows {dataset, ipc, init, kind, variant, acc_mean,
acc_std, judge_acc, intra_class_cos, real_intra_class_cos, collapse, frechet, nearest_train, real_nearest_train,
seconds}.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from dsv.extract import ExtractConfig, extract, init_candidates  # noqa: E402
from dsv.generate import GenerateConfig, generate_images, noise_start, sample  # noqa: E402
from dsv.judge import judge_score, matched_real, nearest  # noqa: E402
from dsv.models import ModelConfig  # noqa: E402
from dsv.protocols import ProtocolConfig, train_students  # noqa: E402
from tasks.artifacts import load_model, load_split, load_tensors, read_data_meta  # noqa: E402
from tasks.paths import Paths  # noqa: E402

RESULTS = ROOT / "benchmarks" / "results"

# Variants: "name": "key=value,..." over three groups: ``kkt.*`` (dsv.kkt.KKTConfig), ``warmup.*``
# (dsv.generate.GenerateConfig of the generator warm-up; ``warmup.steps=0`` = none) and the rest
# (dsv.extract.ExtractConfig); for ``kind = generate`` rows the ``gen.*`` keys set the GenerateConfig and ``mix``
# the samples' target mix. An augmentation is a dsv.augment spec, with "/" for its "|" (one op per step).
# The first release's generation views (with flip), spelled out: the measured rows name what they ran, whatever the
# current presets say.
_FLIP_WARM = "warmup.augment=translate+flip+cutout+noise"
VARIANTS: dict[str, str] = {
    "today": "",
    "generator warm-up": f"warmup.steps=200,warmup.beta_repel=0,{_FLIP_WARM}",
    "warm-up + repel 0.05": f"warmup.steps=200,warmup.beta_repel=0.05,kkt.beta_repel=0.05,{_FLIP_WARM}",
    "warm-up + repel 0.5": f"warmup.steps=200,warmup.beta_repel=0.5,kkt.beta_repel=0.5,{_FLIP_WARM}",
    "W+R 0.05 + own augmentation draws": "warmup.steps=200,warmup.beta_repel=0.05,kkt.beta_repel=0.05,"
                                         f"kkt.augment=each:translate/crop/flip/noise,{_FLIP_WARM}",
    "W+R 0.05 + target mix 0.3": "warmup.steps=200,warmup.beta_repel=0.05,kkt.beta_repel=0.05,target_mix=0.3,"
                                 f"{_FLIP_WARM}",
    "W+R 0.05 + no flip": "warmup.steps=200,warmup.beta_repel=0.05,kkt.beta_repel=0.05,"
                          "warmup.augment=translate+cutout+noise,kkt.augment=translate/crop/noise",
    "warm-up + no flip (no repel)": "warmup.steps=200,warmup.beta_repel=0,"
                                    "warmup.augment=translate+cutout+noise,kkt.augment=translate/crop/noise",
    "repel 0.5 (no warm-up)": "kkt.beta_repel=0.5",
}
GEN_VARIANTS: dict[str, str] = {
    "generate (first release's recipe)": "gen.beta_repel=0,gen.augment=translate+flip+cutout+noise",
    "generate + repel 0.05": "gen.beta_repel=0.05,gen.augment=translate+flip+cutout+noise",
    "generate + repel 0.5": "gen.beta_repel=0.5,gen.augment=translate+flip+cutout+noise",
    "generate + repel 0.05 + target mix 0.3": "gen.beta_repel=0.05,mix=0.3,gen.augment=translate+flip+cutout+noise",
    "generate + repel 0.05 + no flip": "gen.beta_repel=0.05,gen.augment=translate+cutout+noise",
    "generate + no flip (no repel)": "gen.beta_repel=0,gen.augment=translate+cutout+noise",
}


# The variants that are the shipped defaults (params.yaml: extract.warmup, extract.by_init, generate.recipe); their
# rows are labelled ``variant: "shipped"`` (``spec`` keeps the variant's name).
SHIPPED = ("W+R 0.05 + no flip", "generate + repel 0.05 + no flip")


def label(row: dict[str, Any]) -> dict[str, Any]:
    """A row with the shipped defaults' label (idempotent)."""
    name = row.get("spec", row["variant"])
    return {**row, "spec": name, "variant": "shipped" if name in SHIPPED else name}


def _value(raw: str) -> Any:
    if "/" in raw:  # an augmentation spec's "|"
        return raw.replace("/", "|")
    for cast in (int, float):
        try:
            return cast(raw)
        except ValueError:
            continue
    return raw


def configure(spec: str, steps: int) -> tuple[ExtractConfig, GenerateConfig, GenerateConfig, float]:
    """(extraction config, warm-up recipe, generation recipe, the samples' target mix) for a variant spec."""
    groups: dict[str, dict[str, Any]] = {}
    for item in filter(None, (s.strip() for s in spec.split(","))):
        key, _, raw = item.partition("=")
        prefix, _, name = key.rpartition(".")
        groups.setdefault(prefix, {})[name] = _value(raw)

    def build(obj: Any, prefix: str) -> Any:
        keys = dict(groups.get(prefix, {}))
        for f in dataclasses.fields(obj):
            sub = f"{prefix}.{f.name}" if prefix else f.name
            if dataclasses.is_dataclass(getattr(obj, f.name)) and any(g == sub or g.startswith(sub + ".")
                                                                        for g in groups):
                keys[f.name] = build(getattr(obj, f.name), sub)
        return dataclasses.replace(obj, **keys)

    mix = float(groups.get("", {}).pop("mix", 0.0))
    cfg = build(ExtractConfig(steps=steps, log_every=steps), "")
    warm = build(dataclasses.replace(GenerateConfig(), steps=0), "warmup")
    gen = build(GenerateConfig(), "gen")
    return cfg, warm, gen, mix


def _mean_std(v: list[float]) -> tuple[float, float]:
    m = sum(v) / len(v)
    return m, math.sqrt(sum((a - m) ** 2 for a in v) / len(v))


def prepare(args: argparse.Namespace) -> None:
    """Run the prepare, pretrain and judge stages in this process (no Prefect, MLflow or DVC) into ``--base``."""
    from tasks.config import load_config
    from tasks.stages import STAGES, stage_module
    from tasks.tracking import NullLog

    cfg = load_config(args.prepare, [f"runtime.output_dir={args.base}", *args.set])
    paths = Paths((ROOT / args.base).resolve())
    for name in ("prepare", "pretrain", "judge"):
        t0 = time.perf_counter()
        stage_module(name).run(cfg.restricted(STAGES[name].sections), paths, NullLog())
        print(f"{name}: {time.perf_counter() - t0:.1f} s", flush=True)


def run(args: argparse.Namespace, save: Any) -> dict[str, Any]:
    torch.set_num_threads(args.threads)
    paths = Paths((ROOT / args.base).resolve())
    meta = read_data_meta(paths.data_meta)
    c, shape = meta.num_classes, meta.input_shape
    x, y = load_split(paths.train, meta)
    xt, yt = load_split(paths.test, meta)
    teacher = load_model(paths.teacher, paths.teacher_spec, args.device)
    judge = load_model(paths.judge, paths.judge_spec, args.device)
    bounds = meta.bounds()
    pool = load_tensors(paths.init_pool, ("x",))["x"]
    pool = meta.normalize(pool)
    protocol = ProtocolConfig(name="paper", epochs=args.epochs, min_steps=args.min_steps, n_runs=args.students,
                              model=ModelConfig(name="convnet", width=args.width, depth=args.depth))
    specs = {**VARIANTS, **GEN_VARIANTS, **dict(v.split("=", 1) for v in args.variant)}
    if args.variants:
        specs = {k: v for k, v in specs.items() if any(s in k for s in args.variants)}
    rows: list[dict[str, Any]] = []
    payload = {"dataset": meta.name, "rows": rows}
    real_nearest = float(nearest(xt[:500], x)[0].mean())

    def score(kind: str, init: str, ipc: int, name: str, xs: torch.Tensor, ys: torch.Tensor, secs: float) -> None:
        res = train_students(xs, ys, xt, yt, None, protocol, shape, c, list(range(protocol.n_runs)), args.device)
        accs = [r.accuracy for r in res]
        ref = xt[matched_real(ys, yt, torch.Generator().manual_seed(ipc))]
        js = judge_score(judge, xs, ys, ref)
        dist, idx = nearest(xs, x)
        m, sd = _mean_std(accs)
        row = {"dataset": meta.name, "ipc": ipc, "init": init, "kind": kind, "variant": name, "acc_mean": m,
               "acc_std": sd, "accs": accs, "judge_acc": js.acc, "frechet": js.frechet,
               "intra_class_cos": js.intra_class_cos, "real_intra_class_cos": js.real_intra_class_cos,
               "collapse": js.collapse,
               "nearest_train": float(dist.mean()), "real_nearest_train": real_nearest,
               "knn_acc": float((y[idx] == ys).double().mean()),
               "n_train": int(ys.numel()), "seconds": secs}
        rows.append(label(row))
        save(payload)
        print(json.dumps({k: (round(v, 4) if isinstance(v, float) else v) for k, v in row.items() if k != "accs"}),
              flush=True)

    for ipc in args.ipcs:
        for init in args.inits:
            for name, spec in specs.items():
                cfg, warm, gen, mix = configure(spec, args.steps)
                g = torch.Generator().manual_seed(args.seed)
                t0 = time.perf_counter()
                if name in GEN_VARIANTS or spec.startswith("gen."):  # a generated set, not DSVs
                    x0 = None
                    if init == "0shot":
                        x0, _ = init_candidates("0shot", ipc, c, shape, g, other_x=pool)
                    out = sample(teacher, ipc, c, shape, gen, seed=args.seed, pixel_bounds=bounds, x0=x0, target_mix=mix)
                    score("generate", init, ipc, name, out.x, out.y, time.perf_counter() - t0)
                    continue
                if init == "0shot":
                    x0, y0 = init_candidates("0shot", ipc, c, shape, g, other_x=pool)
                elif warm.steps > 0:
                    y0 = torch.arange(c).repeat_interleave(ipc)
                    x0 = noise_start(y0.numel(), shape, warm, g)
                else:
                    x0, y0 = init_candidates("noise", ipc, c, shape, g)
                if warm.steps > 0:
                    x0 = generate_images(teacher, x0, y0, warm, seed=args.seed, pixel_bounds=bounds).x
                res = extract(teacher, x0, y0, cfg, seed=args.seed, pixel_bounds=bounds, keep_per_class=ipc)
                score("dsv", init, ipc, name, res.x, res.y, time.perf_counter() - t0)
    return payload


def render(p: dict[str, Any]) -> str:
    a = p["args"]
    lines = [f"# Teacher-only sets: {p['dataset']}", "",
             f"- Command: `{p['command']}` at commit `{p['git_commit'][:7]}`; wall {p['wall_s']:.0f} s, load average "
             f"{p['loadavg_start']} → {p['loadavg_end']}.",
             f"- Students: ConvNet (depth {a.get('depth', 3)}) width {a['width']}, protocol `paper` (Adam lr 1e-4, DSA, max({a['epochs']} epochs, "
             f"{a['min_steps']} steps)), {a['students']} student seeds, hard labels; one extraction seed ({a['seed']}).",
             "- Judge: the pipeline's judge stage. cos: within-class cosine of judge features (1 = copies), real: the "
             "same for as many real images; collapse: that cosine around the real class mean (real ≈ 0, copies 1). "
             "nearest: mean distance to the nearest training image (normalised pixels; real test images: `real "
             "nearest`); 1-NN acc: the label of that nearest training image (a judge of another family).", "",
             "| IPC | init | kind | variant | acc (%) | judge acc (%) | 1-NN acc (%) | cos | real cos | collapse | Fréchet "
             "| nearest | real nearest | s |", "|---:|---|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in p["rows"]:
        name = r["variant"] if r["variant"] == r.get("spec", r["variant"]) else f"**shipped** ({r['spec']})"
        lines.append(f"| {r['ipc']} | {r['init']} | {r['kind']} | {name} | {100 * r['acc_mean']:.2f} ± "
                     f"{100 * r['acc_std']:.2f} | {100 * r['judge_acc']:.1f} | "
                     f"{'' if 'knn_acc' not in r else format(100 * r['knn_acc'], '.1f')} | {r['intra_class_cos']:.3f} | "
                     f"{r['real_intra_class_cos']:.3f} | {r['collapse']:.3f} | {r['frechet']:.1f} | "
                     f"{r['nearest_train']:.2f} | "
                     f"{r['real_nearest_train']:.2f} | {r['seconds']:.0f} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--base", required=True, help="pipeline output folder with prepare, pretrain and judge done")
    ap.add_argument("--ipcs", type=int, nargs="+", default=[1, 10])
    ap.add_argument("--inits", nargs="+", default=["0shot", "noise"])
    ap.add_argument("--students", type=int, default=3)
    ap.add_argument("--steps", type=int, default=200, help="DeepKKT steps")
    ap.add_argument("--epochs", type=int, default=200)
    ap.add_argument("--min-steps", type=int, default=400)
    ap.add_argument("--width", type=int, default=32)
    ap.add_argument("--depth", type=int, default=3, help="student ConvNet depth")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--variants", nargs="*", default=[], help="substrings of the variant names to run (default all)")
    ap.add_argument("--variant", action="append", default=[], metavar="NAME=SPEC",
                    help="add a variant (NAME without '='), e.g. 'repel 1=kkt.beta_repel=1'")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--name", default=None, help="results file stem (default diversity-<dataset>)")
    ap.add_argument("--out", default=str(RESULTS), help="folder for the results files")
    ap.add_argument("--prepare", default=None, metavar="PARAMS",
                    help="first run the prepare, pretrain and judge stages of this params file into --base, in process")
    ap.add_argument("-S", "--set", action="append", default=[], help="overrides for --prepare")
    ap.add_argument("--render-only", action="store_true", help="relabel and re-render the named results file")
    args = ap.parse_args(argv)
    if args.render_only:
        stem = Path(args.out) / (args.name or "diversity")
        payload = json.loads(stem.with_suffix(".json").read_text())
        payload["rows"] = [label(r) for r in payload["rows"]]
        stem.with_suffix(".json").write_text(json.dumps(payload, indent=1) + "\n")
        stem.with_suffix(".md").write_text(render(payload))
        return 0
    load0 = " ".join(Path("/proc/loadavg").read_text().split()[:3])
    t0 = time.perf_counter()
    if args.prepare:
        prepare(args)
    commit = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, cwd=ROOT).stdout.strip()

    def save(payload: dict[str, Any]) -> Path:
        payload.update({
            "command": "python benchmarks/diversity.py " + " ".join(argv if argv is not None else sys.argv[1:]),
            "git_commit": commit, "wall_s": time.perf_counter() - t0, "loadavg_start": load0,
            "loadavg_end": " ".join(Path("/proc/loadavg").read_text().split()[:3]), "args": vars(args),
        })
        stem = Path(args.out) / (args.name or f"diversity-{payload['dataset']}")
        stem.with_suffix(".json").write_text(json.dumps(payload, indent=1) + "\n")
        stem.with_suffix(".md").write_text(render(payload))
        return stem

    stem = save(run(args, save))
    print(stem.with_suffix(".md").read_text())
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

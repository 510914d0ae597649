"""Deep Support Vectors from Python, without the pipeline (run: python examples/python_api.py).

A classifier you trained, its Deep Support Vectors, λ of your real data, and the classifier used as a
generator, in about a minute on a laptop CPU. Everything here is the `dsv` library that the pipeline
itself calls; nothing is downloaded (scikit-learn ships the 8x8 digits used here).

To use your own model instead of the one trained in step 2:

    model = dsv.build_model(dsv.ModelConfig(name="torchvision:resnet18"), (3, 32, 32), num_classes)
    dsv.load_checkpoint(model, "my_resnet.pt")   # a state dict; never a pickled model

and normalise inputs exactly as it was trained (``dsv.normalize(x, mean, std)``).
"""

from __future__ import annotations

import torch

import dsv


def main(steps: int = 60, seed: int = 0) -> dict[str, float]:
    torch.manual_seed(seed)
    g = torch.Generator().manual_seed(seed)

    # 1. Data: images in [0, 1] plus the training split's channel statistics.
    data = dsv.load_dataset(dsv.DataConfig(name="digits"))
    x = dsv.normalize(data.train_x, data.mean, data.std)
    y = data.train_y
    x_test = dsv.normalize(data.test_x, data.mean, data.std)
    c, shape = data.num_classes, data.input_shape

    # 2. A teacher trained with weight decay (the paper's setting: θ* is then a weighted sum of gradients).
    teacher = dsv.build_seeded(dsv.ModelConfig(name="convnet_tiny"), shape, c, seed=seed)
    dsv.fit(teacher, x, y, dsv.FitConfig(optimizer="adam", lr=5e-3, weight_decay=5e-3, steps=150, batch_size=128),
            seed=seed)
    acc = dsv.evaluate(teacher, x_test, data.test_y, c).accuracy

    # 3. Deep Support Vectors: 2 per class, from real images ("nshot") or from noise ("noise").
    x0, y0 = dsv.init_candidates("nshot", 2, c, shape, g, x, y)
    lo, hi = (0 - data.mean) / data.std, (1 - data.mean) / data.std  # keep pixels in [0, 1]
    res = dsv.extract(teacher, x0, y0, dsv.ExtractConfig(steps=steps, dual="clamp"), seed=seed,
                      pixel_bounds=(lo, hi))
    images = dsv.denormalize(res.x, data.mean, data.std)  # (M, 1, 8, 8) in [0, 1]

    # 4. λ of real images: which training images the teacher leans on (support score ranks support vectors).
    lam = dsv.fit_lambdas(teacher, x[:300], y[:300], dsv.LambdaConfig(steps=20), seed=seed)
    top_support = int(lam.support_rank.argmin()) if lam.support_rank is not None else -1

    # 5. The classifier as a generator: an interpolation between classes 3 and 8 (soft targets).
    strip, _, _ = dsv.interpolate(teacher, [(3, 8)], [0.0, 0.5, 1.0], c, shape, dsv.GenerateConfig(steps=steps),
                                  seed=seed, pixel_bounds=(lo, hi))
    ends = [int(strip.probs[0].argmax()), int(strip.probs[-1].argmax())]

    out = {"teacher_acc": acc, "n_dsv": float(images.shape[0]), "dsv_min": float(images.min()),
           "dsv_max": float(images.max()), "lam_rows": float(lam.lam.numel()), "top_support_index": float(top_support),
           "strip_start_class": float(ends[0]), "strip_end_class": float(ends[1])}
    for k, v in out.items():
        print(f"{k}: {v:.4g}")
    return out


if __name__ == "__main__":
    main()

"""Classifier architectures, built by name from a :class:`ModelConfig`.

The default ConvNet is the dataset-distillation benchmark network (DC/DSA/DM papers):
``depth`` blocks of [3x3 conv (width) -> norm -> activation -> 2x2 pooling], then one linear layer.
"""

from __future__ import annotations

import difflib
import threading
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

NORMS = ("instance", "batch", "group", "none")
POOLS = ("avg", "max")
ACTIVATIONS = ("relu", "leaky_relu", "gelu", "silu", "tanh")


@dataclass(frozen=True)
class ModelConfig:
    """Architecture of the teacher or a student.

    Attributes:
        name: one of :data:`MODEL_NAMES` ("convnet", "resnet18", "mlp", and tiny test variants).
        width: ConvNet channels per block / MLP hidden units.
        depth: ConvNet blocks / MLP hidden layers.
        norm: "instance" (per-sample, per-channel norm with affine, as in the DD benchmark), "batch",
            "group" (8 groups), or "none".
        activation: activation function name.
        pool: "avg" or "max" 2x2 pooling after each ConvNet block.
    """

    name: str = "convnet"
    width: int = 128
    depth: int = 3
    norm: str = "instance"
    activation: str = "relu"
    pool: str = "avg"

    def __post_init__(self) -> None:
        _check_choice("model.name", self.name, MODEL_NAMES)
        _check_choice("model.norm", self.norm, NORMS)
        _check_choice("model.pool", self.pool, POOLS)
        _check_choice("model.activation", self.activation, ACTIVATIONS)
        if self.width < 1:
            raise ValueError(f"model.width must be >= 1, got {self.width}")
        if self.depth < 1:
            raise ValueError(f"model.depth must be >= 1, got {self.depth}")


def _check_choice(key: str, value: str, allowed: tuple[str, ...]) -> None:
    if value not in allowed:
        hint = difflib.get_close_matches(value, allowed, n=1)
        extra = f" (did you mean {hint[0]!r}?)" if hint else ""
        raise ValueError(f"{key} = {value!r} is not one of {', '.join(allowed)}{extra}")


def _activation(name: str) -> nn.Module:
    makers: dict[str, Callable[[], nn.Module]] = {
        "relu": nn.ReLU,
        "leaky_relu": lambda: nn.LeakyReLU(0.01),
        "gelu": nn.GELU,
        "silu": nn.SiLU,
        "tanh": nn.Tanh,
    }
    return makers[name]()


def _norm(name: str, channels: int) -> nn.Module:
    if name == "instance":
        # Instance norm with a learnable affine (the DD benchmark's choice). Numerically identical to
        # GroupNorm(C, C) (same parameter names, double backward included) but ~2x faster per training
        # step on CPU, where GroupNorm's kernel dominated the ConvNet's step time.
        return nn.InstanceNorm2d(channels, affine=True, track_running_stats=False)
    if name == "batch":
        return nn.BatchNorm2d(channels)
    if name == "group":
        return nn.GroupNorm(min(8, channels), channels, affine=True)
    return nn.Identity()


class ConvNet(nn.Module):
    """ConvNet-D of the dataset-distillation literature.

    Input (B, C, H, W) -> logits (B, num_classes).
    """

    def __init__(self, in_shape: tuple[int, ...], num_classes: int, cfg: ModelConfig) -> None:
        super().__init__()
        c, h, w = in_shape
        layers: list[nn.Module] = []
        for _ in range(cfg.depth):
            layers += [
                nn.Conv2d(c, cfg.width, kernel_size=3, padding=1),
                _norm(cfg.norm, cfg.width),
                _activation(cfg.activation),
                nn.AvgPool2d(2) if cfg.pool == "avg" else nn.MaxPool2d(2),
            ]
            c, h, w = cfg.width, h // 2, w // 2
        if h < 1 or w < 1:
            raise ValueError(f"model.depth={cfg.depth} pools a {in_shape} input below 1x1; lower the depth")
        self.features = nn.Sequential(*layers)
        self.classifier = nn.Linear(c * h * w, num_classes)

    def embed(self, x: torch.Tensor) -> torch.Tensor:
        """Penultimate features, (B, width * h * w)."""
        return self.features(x).flatten(1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.embed(x))


class MLP(nn.Module):
    """Fully connected classifier for toy/tabular data (any input shape is flattened)."""

    def __init__(self, in_shape: tuple[int, ...], num_classes: int, cfg: ModelConfig) -> None:
        super().__init__()
        d = 1
        for s in in_shape:
            d *= s
        layers: list[nn.Module] = [nn.Flatten()]
        for _ in range(cfg.depth):
            layers += [nn.Linear(d, cfg.width), _activation(cfg.activation)]
            d = cfg.width
        self.features = nn.Sequential(*layers)
        self.classifier = nn.Linear(d, num_classes)

    def embed(self, x: torch.Tensor) -> torch.Tensor:
        return self.features(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.embed(x))


class ResNet18(nn.Module):
    """torchvision's ResNet-18 with a small-image stem (3x3 conv, stride 1, no max-pool)."""

    def __init__(self, in_shape: tuple[int, ...], num_classes: int, cfg: ModelConfig) -> None:
        super().__init__()
        from torchvision.models import resnet18  # lazy: torchvision is only needed for this model

        net = resnet18(num_classes=num_classes)
        net.conv1 = nn.Conv2d(in_shape[0], 64, kernel_size=3, stride=1, padding=1, bias=False)
        net.maxpool = nn.Identity()  # type: ignore[assignment]
        self.classifier = net.fc
        net.fc = nn.Identity()  # type: ignore[assignment]
        self.body = net

    def embed(self, x: torch.Tensor) -> torch.Tensor:
        return self.body(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.embed(x))


def _tiny(cls: type[nn.Module], **over: Any) -> Callable[[tuple[int, ...], int, ModelConfig], nn.Module]:
    def build(in_shape: tuple[int, ...], num_classes: int, cfg: ModelConfig) -> nn.Module:
        from dataclasses import replace

        return cls(in_shape, num_classes, replace(cfg, **over))  # type: ignore[call-arg]

    return build


_BUILDERS: dict[str, Callable[[tuple[int, ...], int, ModelConfig], nn.Module]] = {
    "convnet": ConvNet,
    "resnet18": ResNet18,
    "mlp": MLP,
    # Tiny variants for unit tests: milliseconds per step.
    "convnet_tiny": _tiny(ConvNet, width=8, depth=2),
    "mlp_tiny": _tiny(MLP, width=16, depth=1),
}
MODEL_NAMES: tuple[str, ...] = tuple(_BUILDERS)


def build_model(cfg: ModelConfig, in_shape: tuple[int, ...], num_classes: int) -> nn.Module:
    """Build a freshly initialised classifier.

    Args:
        cfg: architecture config.
        in_shape: one input's shape, (C, H, W) for images or (D,) for tabular data.
        num_classes: number of output logits.

    Returns:
        An ``nn.Module`` mapping (B, *in_shape) to (B, num_classes), with ``embed`` for features.
        Initialisation uses the global torch RNG: wrap the call in :func:`seeded` for determinism.
    """
    if cfg.name in ("convnet", "convnet_tiny", "resnet18") and len(in_shape) != 3:
        raise ValueError(f"model {cfg.name!r} needs (C, H, W) image inputs, got shape {in_shape}; use 'mlp'")
    return _BUILDERS[cfg.name](tuple(in_shape), num_classes, cfg)


# torch's layer initialisers draw from the global RNG; one lock makes seeded construction safe when
# several threads (the pipeline's thread task runner with workers > 1) build models at once.
_SEEDED_BUILD = threading.Lock()


def build_seeded(cfg: ModelConfig, in_shape: tuple[int, ...], num_classes: int, seed: int) -> nn.Module:
    """:func:`build_model` with initial weights fixed by ``seed`` (the global RNG state is restored).

    Thread-safe: concurrent calls are serialised, so each model's weights depend on its seed only.
    """
    with _SEEDED_BUILD, torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return build_model(cfg, in_shape, num_classes)


def last_layer_names(model: nn.Module) -> tuple[str, ...]:
    """Parameter names of the final linear layer ("classifier.weight", "classifier.bias")."""
    return tuple(n for n, _ in model.named_parameters() if n.startswith("classifier."))

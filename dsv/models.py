"""Classifier architectures, built by name from a :class:`ModelConfig`.

The default ConvNet is the dataset-distillation benchmark network (DC/DSA/DM papers):
``depth`` blocks of [3x3 conv (width) -> norm -> activation -> 2x2 pooling], then one linear layer.

Any torchvision or timm classifier can be used too (``name = "torchvision:resnet18"``,
``"timm:convnext_atto"``): it is built without pretrained weights (nothing is downloaded; weights come
from the user's checkpoint) and wrapped in :class:`External`, which gives it the interface the rest of the
library uses: ``forward``, ``embed`` (the final linear layer's input) and that layer's name.
"""

from __future__ import annotations

import difflib
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from dsv.checks import at_least, one_of

NORMS = ("instance", "batch", "group", "none")
POOLS = ("avg", "max")
ACTIVATIONS = ("relu", "leaky_relu", "gelu", "silu", "tanh")


@dataclass(frozen=True)
class ModelConfig:
    """Architecture of the teacher or a student.

    Attributes:
        name: one of :data:`MODEL_NAMES` ("convnet", "resnet18", "mlp", and tiny test variants), or
            ``"torchvision:<name>"`` (any of ``torchvision.models.list_models()``) or ``"timm:<name>"`` (any
            of ``timm.list_models()``); ``width``, ``depth``, ``norm``, ``activation`` and ``pool`` apply to
            the project's models only.
        width: ConvNet channels per block / MLP hidden units.
        depth: ConvNet blocks / MLP hidden layers.
        norm: "instance" (per-sample, per-channel norm with affine, as in the DD benchmark), "batch",
            "group" (8 groups), or "none".
        activation: activation function name.
        pool: "avg" or "max" 2x2 pooling after each ConvNet block.
        head: module name of the final linear layer (e.g. "fc", "classifier.6", "head.fc"); None finds it
            by structure (the last ``nn.Linear`` registered).
    """

    name: str = "convnet"
    width: int = 128
    depth: int = 3
    norm: str = "instance"
    activation: str = "relu"
    pool: str = "avg"
    head: str | None = None

    def __post_init__(self) -> None:
        if ":" in self.name:
            _check_external(self.name)
        else:
            one_of("name", self.name, MODEL_NAMES)
        one_of("norm", self.norm, NORMS)
        one_of("pool", self.pool, POOLS)
        one_of("activation", self.activation, ACTIVATIONS)
        at_least(self, 1, "width", "depth")


EXTERNAL_SOURCES = ("torchvision", "timm")


def _external_names(source: str) -> list[str]:
    if source == "torchvision":
        from torchvision.models import list_models

        return list(list_models())
    try:
        import timm
    except ImportError as exc:  # pragma: no cover - timm is a dependency
        raise ValueError("name 'timm:...' needs the timm package (pip install timm)") from exc
    return list(timm.list_models())


def _check_external(name: str) -> None:
    source, _, arch = name.partition(":")
    if source not in EXTERNAL_SOURCES:
        raise ValueError(f"name = {name!r}: the prefix must be one of {', '.join(EXTERNAL_SOURCES)} "
                         f"(e.g. 'torchvision:resnet18'), got {source!r}")
    known = _external_names(source)
    if arch not in known:
        hint = difflib.get_close_matches(arch, known, n=1)
        extra = f" (did you mean '{source}:{hint[0]}'?)" if hint else ""
        raise ValueError(f"name = {name!r}: {source} has no model {arch!r}{extra}")


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
        # GroupNorm(C, C) (same parameter names, double backward included) but faster per training step on
        # CPU, where GroupNorm's kernel dominated the ConvNet's step time.
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


def _first_conv_channels(net: nn.Module) -> int | None:
    for m in net.modules():
        if isinstance(m, nn.Conv2d):
            return int(m.in_channels)
    return None


class External(nn.Module):
    """A torchvision or timm classifier with the project's interface.

    The network is ``self.net`` (so a checkpoint of the bare network loads into ``model.net``). A 1-channel
    input is repeated to 3 channels when the network's first convolution expects 3 (torchvision's models
    are built for RGB); ``embed`` returns the input of the final linear layer, found by structure or named
    by ``head``.
    """

    def __init__(self, net: nn.Module, in_shape: tuple[int, ...], head: str | None) -> None:
        super().__init__()
        self.net = net
        want = _first_conv_channels(net)
        have = in_shape[0] if len(in_shape) == 3 else None
        self.repeat_gray = have == 1 and want == 3
        if have is not None and want is not None and have != want and not self.repeat_gray:
            raise ValueError(f"the network's first convolution takes {want} channels but the images have {have}")
        if head is None:
            head = final_linear(net)[0]
        module = dict(net.named_modules()).get(head)
        if not isinstance(module, nn.Linear):
            found = "no module" if module is None else type(module).__name__
            raise ValueError(f"model.head = {head!r}: the network has {found} of that name, not an nn.Linear")
        self.head_name = f"net.{head}"

    def _input(self, x: torch.Tensor) -> torch.Tensor:
        return x.expand(-1, 3, -1, -1) if self.repeat_gray else x

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.net(self._input(x))
        if not isinstance(out, torch.Tensor):  # e.g. torchvision's GoogLeNet/Inception outputs in train mode
            out = out[0]
        return out

    def embed(self, x: torch.Tensor) -> torch.Tensor:
        """Penultimate features: the input of the final linear layer, (B, D)."""
        captured: list[torch.Tensor] = []
        head = self.get_submodule(self.head_name)
        handle = head.register_forward_hook(lambda _m, inp, _out: captured.append(inp[0]))
        try:
            self.forward(x)
        finally:
            handle.remove()
        return captured[-1].flatten(1)


def final_linear(model: nn.Module) -> tuple[str, nn.Linear]:
    """The model's final linear layer: the module named by the model's ``head_name`` attribute when it has
    one (``ModelConfig.head``), else found by structure: the last ``nn.Linear`` registered.

    Works for the project's models (``classifier``), torchvision's (``fc``, ``classifier.N``) and timm's
    (``head.fc``, ``fc``). Raises ValueError when the model has no linear layer.
    """
    named = getattr(model, "head_name", None)
    if isinstance(named, str):
        module = model.get_submodule(named)
        if not isinstance(module, nn.Linear):
            raise ValueError(f"the model's head {named!r} is a {type(module).__name__}, not an nn.Linear")
        return named, module
    found: tuple[str, nn.Linear] | None = None
    for name, mod in model.named_modules():
        if isinstance(mod, nn.Linear):
            found = (name, mod)
    if found is None:
        raise ValueError("the model has no nn.Linear layer; DeepKKT needs a final linear classifier")
    return found


def _build_external(cfg: ModelConfig, in_shape: tuple[int, ...], num_classes: int) -> nn.Module:
    source, _, arch = cfg.name.partition(":")
    if len(in_shape) != 3:
        raise ValueError(f"model {cfg.name!r} needs (C, H, W) image inputs, got shape {in_shape}; use 'mlp'")
    if source == "torchvision":
        from torchvision.models import get_model

        try:
            net = get_model(arch, weights=None, num_classes=num_classes)
        except TypeError:  # a few builders (e.g. the Inception family) need aux_logits/init_weights keywords
            net = get_model(arch, weights=None, num_classes=num_classes, aux_logits=False, init_weights=True)
    else:
        import timm

        net = timm.create_model(arch, pretrained=False, num_classes=num_classes, in_chans=in_shape[0])
    return External(net, in_shape, cfg.head)


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
    if ":" in cfg.name:
        return _build_external(cfg, tuple(in_shape), num_classes)
    if cfg.name in ("convnet", "convnet_tiny", "resnet18") and len(in_shape) != 3:
        raise ValueError(f"model {cfg.name!r} needs (C, H, W) image inputs, got shape {in_shape}; use 'mlp'")
    model = _BUILDERS[cfg.name](tuple(in_shape), num_classes, cfg)
    if cfg.head is not None:
        module = dict(model.named_modules()).get(cfg.head)
        if not isinstance(module, nn.Linear):
            raise ValueError(f"model.head = {cfg.head!r} is not an nn.Linear module of {cfg.name!r}")
        model.head_name = cfg.head  # type: ignore[assignment]
    return model


def build_seeded(cfg: ModelConfig, in_shape: tuple[int, ...], num_classes: int, seed: int) -> nn.Module:
    """:func:`build_model` with initial weights fixed by ``seed`` (the global RNG state is restored).

    torch's layer initialisers draw from the global RNG, so two threads building at once would interleave their
    draws; the pipeline builds models in one thread per process (parallel units are Dask processes).
    """
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return build_model(cfg, in_shape, num_classes)


# ------------------------------------------------------------------------------------ checkpoints

_WRAPPER_KEYS = ("state_dict", "model_state_dict", "model", "net", "module")


class CheckpointError(ValueError):
    """A checkpoint that cannot be read or does not fit the model; the message names the file."""


def read_checkpoint(path: str | Path) -> dict[str, torch.Tensor]:
    """The tensors of a state-dict checkpoint, never unpickling code.

    ``.safetensors`` files are read with safetensors; anything else with ``torch.load(weights_only=True)``
    (PyTorch's restricted unpickler: tensors and plain containers only, a full pickled model is refused).
    A state dict nested under one of the usual keys (``state_dict``, ``model_state_dict``, ``model``, ``net``,
    ``module``) is unwrapped, and a ``module.`` prefix (DataParallel / DDP) is removed.

    Raises:
        CheckpointError: missing file, unreadable content, no tensors, or a tensor with NaN or infinite values
            (naming the file and the tensor).
    """
    p = Path(path)
    if not p.is_file():
        raise CheckpointError(f"checkpoint {str(p)!r} not found")
    try:
        if p.suffix == ".safetensors":
            from safetensors.torch import load_file

            obj: Any = load_file(str(p))
        else:
            obj = torch.load(p, map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 - safetensors, zip and unpickler errors come in many types
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise CheckpointError(f"checkpoint {p}: cannot be read as a state dict ({type(exc).__name__}: "
                              f"{first[:300]}); save it with torch.save(model.state_dict(), path) or "
                              "safetensors") from None
    for _ in range(3):
        if isinstance(obj, dict) and not any(isinstance(v, torch.Tensor) for v in obj.values()):
            inner = next((obj[k] for k in _WRAPPER_KEYS if isinstance(obj.get(k), dict)), None)
            if inner is None:
                break
            obj = inner
    if not isinstance(obj, dict) or not obj:
        raise CheckpointError(f"checkpoint {p}: holds {type(obj).__name__}, not a state dict of tensors")
    state = {str(k): v for k, v in obj.items() if isinstance(v, torch.Tensor)}
    if not state:
        raise CheckpointError(f"checkpoint {p}: no tensors in it")
    if all(k.startswith("module.") for k in state):
        state = {k[len("module."):]: v for k, v in state.items()}
    bad = non_finite_tensors(state)
    if bad:
        more = f" (and {len(bad) - 1} more tensor(s))" if len(bad) > 1 else ""
        raise CheckpointError(f"checkpoint {p}: tensor {bad[0]!r} has NaN or infinite values{more}; the weights "
                              "are unusable (a diverged training run?)")
    return state


def non_finite_tensors(state: dict[str, torch.Tensor]) -> list[str]:
    """Names of the floating-point tensors of a state dict that hold a NaN or an infinity."""
    return [k for k, v in state.items() if v.is_floating_point() and not bool(torch.isfinite(v).all())]


def load_checkpoint(model: nn.Module, path: str | Path) -> nn.Module:
    """Load a user's checkpoint (:func:`read_checkpoint`) into ``model`` (strict), in place.

    For an :class:`External` model, a state dict of the bare network (what ``torch.save(net.state_dict())``
    writes) is loaded into ``model.net``; the wrapper's own keys (``net.*``) work too.

    Raises:
        CheckpointError: naming the file and the first mismatching keys or shapes (e.g. a classifier with
            another number of classes than the data).
    """
    state = read_checkpoint(path)
    target = model
    if isinstance(model, External) and not all(k.startswith("net.") for k in state):
        target = model.net
    own = target.state_dict()
    missing = [k for k in own if k not in state]
    unexpected = [k for k in state if k not in own]
    shapes = [f"{k}: file {tuple(state[k].shape)} vs model {tuple(own[k].shape)}"
              for k in own if k in state and tuple(state[k].shape) != tuple(own[k].shape)]
    if missing or unexpected or shapes:
        parts = []
        if shapes:
            parts.append(f"{len(shapes)} shape mismatch(es), e.g. {'; '.join(shapes[:3])}")
        if missing:
            parts.append(f"{len(missing)} key(s) missing from the file, e.g. {missing[:3]}")
        if unexpected:
            parts.append(f"{len(unexpected)} unexpected key(s), e.g. {unexpected[:3]}")
        raise CheckpointError(f"checkpoint {path} does not fit the model: " + "; ".join(parts))
    with torch.no_grad():
        target.load_state_dict({k: v.to(own[k].dtype) for k, v in state.items()}, strict=True)
    return model

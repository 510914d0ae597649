"""Model zoo: shapes, names, seeding."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from dsv.models import MODEL_NAMES, External, ModelConfig, build_model, build_seeded, final_linear

IMAGE_MODELS = ["convnet", "convnet_tiny", "resnet18", "mlp", "mlp_tiny"]


@pytest.mark.parametrize("name", IMAGE_MODELS)
@pytest.mark.parametrize("in_shape", [(1, 28, 28), (3, 28, 28), (1, 32, 32), (3, 32, 32)])
def test_image_model_shapes(name: str, in_shape: tuple[int, int, int], device: str) -> None:
    cfg = ModelConfig(name=name, width=16) if name in ("convnet", "mlp") else ModelConfig(name=name)
    model = build_seeded(cfg, in_shape, 7, seed=0).to(device)
    x = torch.randn(2, *in_shape, device=device)
    logits = model(x)
    assert logits.shape == (2, 7)
    feats = model.embed(x)
    assert feats.dim() == 2 and feats.shape[0] == 2
    assert model.classifier.in_features == feats.shape[1] and model.classifier.out_features == 7
    torch.testing.assert_close(model.classifier(feats), logits)
    assert final_linear(model)[0] == "classifier"


@pytest.mark.parametrize("norm", ["instance", "batch", "group", "none"])
@pytest.mark.parametrize("pool", ["avg", "max"])
def test_convnet_variants(norm: str, pool: str) -> None:
    model = build_seeded(ModelConfig(width=8, depth=3, norm=norm, pool=pool), (1, 28, 28), 10, seed=0)
    assert model(torch.randn(3, 1, 28, 28)).shape == (3, 10)
    # 28 -> 14 -> 7 -> 3 after three 2x2 poolings
    assert model.classifier.in_features == 8 * 3 * 3


def test_instance_norm_matches_reference() -> None:
    """'instance' normalises each sample and channel over H, W (= GroupNorm with one group per channel)."""
    model = build_seeded(ModelConfig(width=4, depth=1, norm="instance"), (2, 6, 6), 3, seed=0)
    norm = model.features[1]
    x = torch.randn(5, 4, 6, 6, dtype=torch.float64)
    ref = nn.GroupNorm(4, 4).double()
    with torch.no_grad():
        norm.weight.uniform_(0.5, 2.0)
        norm.bias.uniform_(-1.0, 1.0)
        ref.weight.copy_(norm.weight)
        ref.bias.copy_(norm.bias)
    norm.double()
    torch.testing.assert_close(norm(x), ref(x))
    manual = (x - x.mean(dim=(2, 3), keepdim=True)) / (x.var(dim=(2, 3), unbiased=False, keepdim=True) + 1e-5).sqrt()
    torch.testing.assert_close(norm(x), manual * norm.weight.view(1, -1, 1, 1) + norm.bias.view(1, -1, 1, 1))


def test_mlp_on_tabular() -> None:
    model = build_seeded(ModelConfig(name="mlp_tiny"), (2,), 3, seed=0)
    assert model(torch.randn(10, 2)).shape == (10, 3)
    assert model.embed(torch.randn(10, 2)).shape == (10, 16)


def test_errors() -> None:
    with pytest.raises(ValueError, match=r"name = 'convnt' is not one of .*did you mean 'convnet'"):
        ModelConfig(name="convnt")
    with pytest.raises(ValueError, match="norm = 'layer' is not one of"):
        ModelConfig(norm="layer")
    with pytest.raises(ValueError, match="width must be >= 1"):
        ModelConfig(width=0)
    with pytest.raises(ValueError, match="needs \\(C, H, W\\) image inputs"):
        build_model(ModelConfig(name="convnet_tiny"), (2,), 3)
    with pytest.raises(ValueError, match="lower the depth"):
        build_model(ModelConfig(width=4, depth=6), (1, 28, 28), 10)
    assert set(IMAGE_MODELS) <= set(MODEL_NAMES)


def test_build_seeded_is_deterministic_and_keeps_global_rng() -> None:
    cfg = ModelConfig(name="convnet_tiny")
    torch.manual_seed(123)
    before = torch.get_rng_state()
    a = build_seeded(cfg, (1, 8, 8), 4, seed=0)
    assert torch.equal(torch.get_rng_state(), before)
    b = build_seeded(cfg, (1, 8, 8), 4, seed=0)
    c = build_seeded(cfg, (1, 8, 8), 4, seed=1)
    for (n, pa), pb in zip(a.state_dict().items(), b.state_dict().values()):
        assert torch.equal(pa, pb), n
    assert any(not torch.equal(pa, pc) for pa, pc in zip(a.parameters(), c.parameters()))


@pytest.mark.parametrize(("name", "head"), [("torchvision:resnet18", "net.fc"), ("torchvision:mobilenet_v3_small",
                                                                              "net.classifier.3"),
                                           ("timm:resnet10t", "net.fc")])
@pytest.mark.parametrize("in_shape", [(1, 28, 28), (3, 32, 32)])
def test_external_models_have_the_project_interface(name: str, head: str, in_shape: tuple[int, int, int]) -> None:
    """torchvision/timm classifiers: logits of the data's classes, gray images accepted, embed() = the input of
    the final linear layer (found by structure), which certificates and the 'last' subset use."""
    model = build_seeded(ModelConfig(name=name), in_shape, 5, seed=0).eval()
    assert isinstance(model, External)
    x = torch.randn(2, *in_shape)
    logits = model(x)
    assert logits.shape == (2, 5)
    name_found, layer = final_linear(model)
    assert name_found == head and layer.out_features == 5
    torch.testing.assert_close(layer(model.embed(x)), logits)


def test_external_state_dict_is_the_bare_networks() -> None:
    """A checkpoint of the bare torchvision network loads into ``model.net`` unchanged."""
    from torchvision.models import resnet18

    bare = resnet18(num_classes=4)
    model = build_seeded(ModelConfig(name="torchvision:resnet18"), (3, 32, 32), 4, seed=1)
    model.net.load_state_dict(bare.state_dict(), strict=True)
    x = torch.randn(2, 3, 32, 32)
    torch.testing.assert_close(model.eval()(x), bare.eval()(x))


def test_head_named_by_param() -> None:
    """``head`` names the final layer; a name that is not a Linear is refused, naming it."""
    model = build_seeded(ModelConfig(name="torchvision:vgg11", head="classifier.6"), (3, 32, 32), 3, seed=0)
    assert final_linear(model)[0] == "net.classifier.6"
    with pytest.raises(ValueError, match="'classifier.2'"):
        build_model(ModelConfig(name="torchvision:vgg11", head="classifier.2"), (3, 32, 32), 3)
    own = build_model(ModelConfig(name="convnet_tiny", head="classifier"), (1, 8, 8), 3)
    assert final_linear(own)[0] == "classifier"


@pytest.mark.parametrize(("name", "match"), [("torchvision:resnet81", "did you mean 'torchvision:resnet18'"),
                                             ("keras:resnet18", "prefix must be one of torchvision, timm"),
                                             ("timm:no_such_net", "timm has no model 'no_such_net'")])
def test_unknown_external_model_is_named(name: str, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        ModelConfig(name=name)


def test_external_model_refuses_tabular_input() -> None:
    with pytest.raises(ValueError, match="needs \\(C, H, W\\) image inputs"):
        build_model(ModelConfig(name="torchvision:resnet18"), (5,), 3)


# ------------------------------------------------------------------------------------ checkpoints


def _tiny_state() -> tuple[nn.Module, dict[str, torch.Tensor]]:
    model = build_seeded(ModelConfig(name="convnet_tiny"), (1, 8, 8), 3, seed=3)
    return model, {k: v.clone() for k, v in model.state_dict().items()}


@pytest.mark.parametrize("form", ["safetensors", "state_dict", "nested", "ddp_prefix"])
def test_checkpoint_forms_load(tmp_path, form: str) -> None:  # noqa: ANN001
    from safetensors.torch import save_file

    from dsv.models import load_checkpoint

    _, state = _tiny_state()
    path = tmp_path / ("w.safetensors" if form == "safetensors" else "w.pt")
    if form == "safetensors":
        save_file(state, str(path))
    elif form == "state_dict":
        torch.save(state, path)
    elif form == "nested":
        torch.save({"epoch": 3, "state_dict": state, "optimizer": {"lr": 0.1}}, path)
    else:
        torch.save({f"module.{k}": v for k, v in state.items()}, path)
    fresh = build_seeded(ModelConfig(name="convnet_tiny"), (1, 8, 8), 3, seed=99)
    load_checkpoint(fresh, path)
    for k, v in fresh.state_dict().items():
        torch.testing.assert_close(v, state[k])


def test_checkpoint_with_code_is_refused_without_running_it(tmp_path) -> None:  # noqa: ANN001
    """A pickle that would run code is refused by the weights-only reader; the payload never runs."""
    import pickle

    from dsv.models import CheckpointError, read_checkpoint

    marker = tmp_path / "pwned"

    class Payload:
        def __reduce__(self):  # noqa: ANN204
            return (open, (str(marker), "w"))

    path = tmp_path / "evil.pt"
    path.write_bytes(pickle.dumps({"weight": Payload()}))
    with pytest.raises(CheckpointError, match="evil.pt"):
        read_checkpoint(path)
    assert not marker.exists()
    full = tmp_path / "model.pt"
    torch.save(build_model(ModelConfig(name="mlp_tiny"), (4,), 2), full)  # a whole pickled module
    with pytest.raises(CheckpointError, match="cannot be read as a state dict"):
        read_checkpoint(full)


def test_checkpoint_of_another_model_names_the_mismatch(tmp_path) -> None:  # noqa: ANN001
    from dsv.models import CheckpointError, load_checkpoint

    _, state = _tiny_state()
    torch.save(state, tmp_path / "w.pt")
    five = build_model(ModelConfig(name="convnet_tiny"), (1, 8, 8), 5)  # 5 classes, the file has 3
    with pytest.raises(CheckpointError, match=r"classifier.weight: file \(3, 32\) vs model \(5, 32\)"):
        load_checkpoint(five, tmp_path / "w.pt")
    mlp = build_model(ModelConfig(name="mlp_tiny"), (64,), 3)
    with pytest.raises(CheckpointError, match="unexpected key"):
        load_checkpoint(mlp, tmp_path / "w.pt")
    (tmp_path / "junk.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(CheckpointError, match="junk.pt"):
        load_checkpoint(mlp, tmp_path / "junk.pt")
    with pytest.raises(CheckpointError, match="not found"):
        load_checkpoint(mlp, tmp_path / "absent.pt")

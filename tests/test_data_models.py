"""Data splits, the sample plan, the model zoo and local-weights loading."""

import numpy as np
import pytest
import torch
from PIL import Image

from mpqflow.data import DataSpec, SamplePlan, load_split, sensitivity_set, stack
from mpqflow.models import build_model, layer_macs, load_weights, quantizable_layers


def test_digits_split_is_fixed_and_disjoint():
    spec = DataSpec("digits")
    train, test = load_split(spec, "train"), load_split(spec, "test")
    assert len(train) + len(test) == 1797 and len(test) == 450
    assert train.tensors[0].shape[1:] == (1, 8, 8)
    again = load_split(DataSpec("digits"), "test")
    assert torch.equal(test.tensors[0], again.tensors[0])
    rows_train = {tuple(r) for r in train.tensors[0].flatten(1).numpy().round(4)}
    rows_test = [tuple(r) for r in test.tensors[0].flatten(1).numpy().round(4)]
    assert sum(r in rows_train for r in rows_test) < 10  # digits has a few duplicate images, no leakage


def test_sample_plan_disjoint_and_stable_under_pool_growth():
    plan = SamplePlan(1000, calibration_samples=100, pool_batches=4, batch_size=50, seed=3)
    calib = set(plan.calibration())
    batches = [set(plan.pool_batch(b)) for b in range(4)]
    assert len(calib) == 100 and all(len(b) == 50 for b in batches)
    assert all(not (calib & b) for b in batches)
    assert all(not (batches[i] & batches[j]) for i in range(4) for j in range(i + 1, 4))
    bigger = SamplePlan(1000, 100, 8, 50, 3)
    assert np.array_equal(bigger.pool_batch(2), plan.pool_batch(2))
    with pytest.raises(ValueError, match="exceeds the 1000 training samples"):
        SamplePlan(1000, 100, 19, 50)
    with pytest.raises(ValueError, match="batch index 4 outside the pool 0..3"):
        plan.pool_batch(4)


def test_sensitivity_sets_disjoint_where_pool_allows():
    sets = [sensitivity_set(2, s, pool_batches=8, seed=0) for s in range(4)]
    assert len({b for s in sets for b in s}) == 8
    assert sensitivity_set(2, 1, 8, 0) == sets[1]
    assert len(sensitivity_set(8, 0, 8)) == 8


@pytest.mark.parametrize("arch, n_layers", [("digits_cnn", 4), ("resnet20", 22), ("resnet32", 34)])
def test_zoo_models_run_and_list_layers(arch, n_layers):
    model = build_model(arch, in_channels=1, num_classes=7)
    x = torch.randn(2, 1, 8, 8)
    assert model(x).shape == (2, 7)
    layers = quantizable_layers(model, x)
    assert len(layers) == n_layers and layers[0] == "conv1" and layers[-1] == "fc"
    macs = layer_macs(model, x)
    assert macs["conv1"] == 8 * 8 * (16 if arch != "digits_cnn" else 16) * 1 * 9
    assert macs["fc"] == model.fc.in_features * 7


def test_grouped_conv_macs():
    model = torch.nn.Sequential(torch.nn.Conv2d(8, 16, 3, padding=1, groups=4))
    macs = layer_macs(model, torch.randn(1, 8, 5, 5))
    assert macs["0"] == 16 * 5 * 5 * (8 // 4) * 9


def test_torchvision_model_with_local_weights(tmp_path):
    model = build_model("torchvision:resnet18", num_classes=5)
    path = tmp_path / "r18.pth"
    torch.save(model.state_dict(), path)
    again = build_model("torchvision:resnet18", num_classes=5, weights=str(path))
    x = torch.randn(1, 3, 32, 32)
    assert torch.equal(model.eval()(x), again.eval()(x))
    with pytest.raises(FileNotFoundError, match=r"missing\.pth' does not exist \(weights are never downloaded\)"):
        build_model("torchvision:resnet18", weights=str(tmp_path / "missing.pth"))
    with pytest.raises(ValueError, match="does not fit the model"):
        load_weights(build_model("torchvision:resnet18", num_classes=10), path)
    with pytest.raises(ValueError, match="unknown torchvision classification model 'nonet'"):
        build_model("torchvision:nonet")


def test_imagenet_folder(tmp_path):
    rng = np.random.default_rng(0)
    for split in ("train", "val"):
        for cls in ("cat", "dog"):
            (tmp_path / split / cls).mkdir(parents=True)
            for i in range(3):
                img = Image.fromarray(rng.integers(0, 255, (40, 50, 3), dtype=np.uint8))
                img.save(tmp_path / split / cls / f"{i}.png")
    spec = DataSpec("imagenet", root=str(tmp_path), image_size=32)
    train = load_split(spec, "train")
    x, y = stack(train, [0, 5])
    assert x.shape == (2, 3, 32, 32) and y.tolist() == [0, 1]
    assert len(load_split(spec, "test")) == 6
    assert spec.num_classes == 2 and spec.in_channels == 3 and spec.input_size == 32  # counted from train/
    with pytest.raises(FileNotFoundError, match="expected <root>/train and <root>/val"):
        load_split(DataSpec("imagenet", root=str(tmp_path / "train")), "train")


def _model_cfg(arch, dataset, num_classes=None):
    """A ModelConfig as validation would produce it."""
    from mpqflow.config import ModelConfig, validate_config

    raw = validate_config(
        {"models": {"m": {"arch": arch, "dataset": dataset, "num_classes": num_classes}}}, local=False
    )
    return ModelConfig.from_dict(raw["models"]["m"])


def test_torchvision_model_sized_from_the_data(tmp_path, caplog):
    """Classes, channels and input size come from the dataset (an explicit num_classes overrides the
    count); a 3-channel torchvision model on 1-channel digits gets its first conv adapted, by name."""
    from mpqflow.models import fresh_model

    with caplog.at_level("INFO", logger="mpqflow"):
        net = fresh_model(_model_cfg("torchvision:resnet18", {"name": "digits"}), 0).eval()
    assert "first conv 'conv1' adapted to 1 input channel(s)" in caplog.text
    assert net.conv1.in_channels == 1 and net.fc.out_features == 10
    assert net(torch.randn(2, 1, 8, 8)).shape == (2, 10)
    net = fresh_model(_model_cfg("torchvision:mobilenet_v2", {"name": "digits"}, num_classes=12), 0).eval()
    assert net.features[0][0].in_channels == 1 and net(torch.randn(2, 1, 8, 8)).shape == (2, 12)
    # A ViT at the data's size: image_size reaches its constructor (32 px, 16 px patches).
    for split in ("train", "val"):
        for cls in ("a", "b", "c"):
            (tmp_path / split / cls).mkdir(parents=True)
    vit = fresh_model(
        _model_cfg("torchvision:vit_b_16", {"name": "imagenet", "root": str(tmp_path), "image_size": 32}), 0
    ).eval()
    assert vit.image_size == 32 and vit(torch.randn(1, 3, 32, 32)).shape == (1, 3)


def test_weights_of_another_class_count_name_the_key(tmp_path):
    path = tmp_path / "r18.pth"
    torch.save(build_model("torchvision:resnet18", num_classes=1000).state_dict(), path)
    with pytest.raises(
        ValueError, match=r"1000 outputs where the model has 10 .*need models\.<model>\.num_classes: 1000"
    ):
        load_weights(build_model("torchvision:resnet18", num_classes=10), path)


def test_cifar_from_local_root(tmp_path, monkeypatch):
    import pickle

    folder = tmp_path / "cifar-10-batches-py"
    folder.mkdir()
    rng = np.random.default_rng(0)
    batch = {"data": rng.integers(0, 255, (4, 3072), dtype=np.uint8), "labels": [0, 1, 2, 3]}
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        with open(folder / name, "wb") as f:
            pickle.dump(batch, f)
    with open(folder / "batches.meta", "wb") as f:
        pickle.dump({"label_names": [f"c{i}" for i in range(10)]}, f)
    # Files of the official format but not the official files (no checksum is checked).
    train = load_split(DataSpec("cifar10", root=str(tmp_path)), "train")
    x, y = stack(train, [0, 1])
    assert len(train) == 20 and x.shape == (2, 3, 32, 32) and y.tolist() == [0, 1]
    # Normalised exactly as torchvision's ToTensor + Normalize would.
    expect = (
        torch.tensor(batch["data"][0].reshape(3, 32, 32), dtype=torch.float32) / 255
        - torch.tensor([0.4914, 0.4822, 0.4465])[:, None, None]
    ) / torch.tensor([0.2470, 0.2435, 0.2616])[:, None, None]
    assert torch.equal(x[0], expect)
    with pytest.raises(FileNotFoundError, match=r"cifar100: folder .*cifar-100-python' does not exist"):
        load_split(DataSpec("cifar100", root=str(tmp_path)), "train")
    (folder / "test_batch").write_bytes(b"not a pickle")
    with pytest.raises(ValueError, match=r"test_batch' is not a CIFAR python batch"):
        load_split(DataSpec("cifar10", root=str(tmp_path)), "test")
    (folder / "data_batch_3").unlink()
    with pytest.raises(FileNotFoundError, match=r"data_batch_3' is missing"):
        load_split(DataSpec("cifar10", root=str(tmp_path)), "train")


class _Evil:
    def __reduce__(self):
        return (print, ("this must never run",))


def test_cifar_pickle_runs_no_code(tmp_path):
    import pickle

    folder = tmp_path / "cifar-10-batches-py"
    folder.mkdir()
    with open(folder / "test_batch", "wb") as f:
        pickle.dump({"data": _Evil(), "labels": [0]}, f)
    with pytest.raises(ValueError, match=r"refusing to load builtins\.print"):
        load_split(DataSpec("cifar10", root=str(tmp_path)), "test")


def test_layers_the_quantizer_cannot_reach_are_listed_and_warned(caplog):
    """Attention projections computed functionally (nn.MultiheadAttention's in_proj and out_proj in
    ViT) are never silently FP: the layer table lists them and calibration warns, by name."""
    from mpqflow.sensitivity.common import make_context

    net = build_model("torchvision:vit_b_16", 3, 10, image_size=32)
    with caplog.at_level("WARNING", logger="mpqflow"):
        ctx = make_context(net, torch.randn(2, 3, 32, 32), w_bits=(8,), a_bits=(8,))
    unreached = ctx.table.unreached
    assert len(unreached) == 24 and "encoder.layers.encoder_layer_0.self_attention.in_proj" in unreached
    assert "encoder.layers.encoder_layer_11.self_attention.out_proj" in unreached
    assert not set(unreached) & set(ctx.table.layers)
    assert "24 weight layer(s) are used through functional calls" in caplog.text
    assert type(ctx.table).from_dict(ctx.table.to_dict()) == ctx.table  # recorded in layers.json / calibration
    # A CNN has none.
    assert make_context(build_model("resnet20", 3, 10), torch.randn(2, 3, 32, 32), w_bits=(8,)).table.unreached == ()

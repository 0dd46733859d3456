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
    with pytest.raises(FileNotFoundError, match="expected <root>/train and <root>/val"):
        load_split(DataSpec("imagenet", root=str(tmp_path / "train")), "train")


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
    import torchvision.datasets.cifar

    # The real files are md5-checked; the test writes its own, so accept any checksum.
    monkeypatch.setattr(torchvision.datasets.cifar, "check_integrity", lambda *a, **k: True)
    train = load_split(DataSpec("cifar10", root=str(tmp_path)), "train")
    x, y = stack(train, [0, 1])
    assert len(train) == 20 and x.shape == (2, 3, 32, 32) and y.tolist() == [0, 1]
    monkeypatch.undo()
    with pytest.raises(FileNotFoundError, match="cifar100 not found under root"):
        load_split(DataSpec("cifar100", root=str(tmp_path)), "train")

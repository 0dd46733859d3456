"""A user's own torchvision model, weights file and data, end to end: the stages and the workflow.

What README's "CIFAR or ImageNet on a GPU workstation" promises a user: any torchvision classifier,
sized by the data (10 classes counted from the data, 32 px input), loaded from a local state_dict
given by path (`models.<m>.weights`), on an ImageFolder tree or a CIFAR-10 python-pickle folder.
The data are scikit-learn's digits upscaled to 32x32 RGB, a few dozen images per split, and the
weights a user's state_dict after two SGD steps, all written here. Configs are written as a user's
YAML and validated; every stage runs as its workflow script calls it, writing into tmp_path.
"""

import json
import logging
import math
import pickle
import re

import numpy as np
import pandas as pd
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
import torchvision
import yaml
from conftest import run_snakemake
from PIL import Image

from mpqflow.artifacts import load_calibration, load_checkpoint, load_layer_table
from mpqflow.config import Config, ConfigError, load_config
from mpqflow.context import calibrate_quantizer, load_model
from mpqflow.data import DataSpec, data_spec, load_split, stack
from mpqflow.io import file_sha256
from mpqflow.models import fresh_model
from mpqflow.names import parse_option
from mpqflow.stages import calibrate, evaluate, sensitivity, solve, train

pytestmark = pytest.mark.usefixtures("one_thread")

TRAIN_PER_CLASS, TEST_PER_CLASS = 6, 3  # 60 training and 30 test images
BUDGETS = ["avg_bits-6", "size_rel-0.6"]  # both below all-8-bit: the solver has to pick 4-bit layers
# Attention models keep a third of their weights FP (32 bits, counted in every size): all-8-bit is
# about 16 average bits (vit_b_16), all-4-bit about 13.3, so these also need 4-bit layers.
ATTENTION_BUDGETS = ["avg_bits-14.5", "size_rel-0.9"]
SIZE_KWARGS = {"vit_b_16": {"image_size": 32}}  # what the user's constructor needs for 32 px input


# ---------------------------------------------------------------- the user's data, weights and config


@pytest.fixture(scope="module")
def digits_rgb():
    """{split: (images (N, 32, 32, 3) uint8, labels (N,))}: digits upscaled 4x, three distinct channels."""
    from sklearn.datasets import load_digits

    x, y = load_digits(return_X_y=True)
    out = {}
    for split, lo, hi in (("train", 0, TRAIN_PER_CLASS), ("test", TRAIN_PER_CLASS, TRAIN_PER_CLASS + TEST_PER_CLASS)):
        idx = np.concatenate([np.flatnonzero(y == c)[lo:hi] for c in range(10)])
        gray = np.kron(x[idx].reshape(-1, 8, 8), np.ones((4, 4))) * (255 / 16)  # (N, 32, 32)
        rgb = np.stack([gray, 0.5 * gray + 64, 255 - gray], axis=-1)  # (N, 32, 32, 3)
        out[split] = rgb.round().astype(np.uint8), y[idx]
    return out


@pytest.fixture(scope="module")
def imagenet_root(digits_rgb, tmp_path_factory):
    """An ImageFolder tree: root/{train,val}/digit<c>/<i>.png."""
    root = tmp_path_factory.mktemp("imagefolder")
    for split, folder in (("train", "train"), ("test", "val")):
        images, labels = digits_rgb[split]
        for i, (img, c) in enumerate(zip(images, labels)):
            (root / folder / f"digit{c}").mkdir(parents=True, exist_ok=True)
            Image.fromarray(img).save(root / folder / f"digit{c}" / f"{i}.png")
    return root


def _write_cifar(root, digits_rgb):
    """The CIFAR-10 python layout: root/cifar-10-batches-py/{data_batch_1..5, test_batch, batches.meta}."""
    base = root / "cifar-10-batches-py"
    base.mkdir(parents=True)

    def dump(name, images, labels, label):
        rows = images.transpose(0, 3, 1, 2).reshape(len(images), 3072)  # (N, 3*32*32) channel-major, as CIFAR
        batch = {"batch_label": label, "labels": [int(v) for v in labels], "data": rows, "filenames": []}
        with open(base / name, "wb") as f:
            pickle.dump(batch, f)

    images, labels = digits_rgb["train"]
    perm = np.random.default_rng(0).permutation(len(labels))  # the batches mix the classes, as CIFAR's do
    for b, part in enumerate(np.array_split(perm, 5), start=1):
        dump(f"data_batch_{b}", images[part], labels[part], f"training batch {b} of 5")
    dump("test_batch", *digits_rgb["test"], "testing batch 1 of 1")
    with open(base / "batches.meta", "wb") as f:
        pickle.dump({"label_names": [f"digit{c}" for c in range(10)], "num_cases_per_batch": 12}, f)
    return base


@pytest.fixture(scope="module")
def cifar10_root(digits_rgb, tmp_path_factory):
    root = tmp_path_factory.mktemp("cifar")
    _write_cifar(root, digits_rgb)
    return root


def _dataset(name, root):
    """The `dataset:` block a user writes for their data."""
    return (
        {"name": name, "root": str(root), "image_size": 32} if name == "imagenet" else {"name": name, "root": str(root)}
    )


def _user_config(path, models: dict, **over) -> Config:
    """Write a user's YAML with `models` (small settings for the rest), load it as the workflow does."""
    raw = {
        "seed": 0,
        "device": "cpu",
        "threads": 1,
        "models": models,
        "quant": {"w_bits": [4, 8], "a_bits": [8], "calibration_samples": 16, "calibration_batch_size": 16},
        "sensitivity": {"batch_size": 8, "pool_batches": 1},
        "methods": ["uniform", "mpqco"],
        "budgets": BUDGETS,
        "study": {"set_sizes": [1], "sets_per_size": 1},
        "solver": {"backend": "highs", "time_limit": 20},
        "evaluation": {"batch_size": 32},
        "plots": {"dpi": 50},
        "ptq": None,
        **over,
    }
    path.write_text(yaml.safe_dump(raw, sort_keys=False))
    return Config.from_dict(load_config(path))


def _user_weights(arch, path, spec, first_conv_channels=None) -> dict:
    """What a user brings: torchvision's own constructor (10 classes, sized for 32 px), two SGD steps on
    their data, torch.save of the state_dict. `first_conv_channels` rebuilds the first conv for gray data."""
    torch.manual_seed(1)
    net = getattr(torchvision.models, arch)(num_classes=10, **SIZE_KWARGS.get(arch, {}))
    if first_conv_channels is not None:
        name, old = next((n, m) for n, m in net.named_modules() if isinstance(m, nn.Conv2d))
        new = nn.Conv2d(first_conv_channels, old.out_channels, old.kernel_size, old.stride, old.padding, bias=False)
        parent, _, attr = name.rpartition(".")
        setattr(net.get_submodule(parent) if parent else net, attr, new)
    x, y = stack(load_split(spec, "train"), range(16))
    opt = torch.optim.SGD(net.parameters(), lr=0.01, momentum=0.9)
    net.train()
    for _ in range(2):
        opt.zero_grad()
        F.cross_entropy(net(x[:8]), y[:8]).backward()
        opt.step()
    _settle_batchnorm(net, x)
    state = {k: v.detach().clone() for k, v in net.state_dict().items()}
    torch.save(state, path)
    return state


def _settle_batchnorm(net, x):
    """BatchNorm statistics of `x` (as a trained model has them): at torchvision's initial ones, the
    activations of deep mobile nets shrink to ~1e-14 by the classifier in eval mode."""
    bns = [m for m in net.modules() if isinstance(m, nn.BatchNorm2d)]
    for m in bns:
        m.reset_running_stats()
        m.momentum = None  # a cumulative average: one pass gives the batch's statistics
    with torch.no_grad():
        net.train()(x)
    for m in bns:
        m.momentum = 0.1
    net.eval()


def _weight_layers(net) -> set:
    """Every weight a quantizer could be expected to quantize: Conv2d/Linear modules, and the input
    projections of nn.MultiheadAttention (plain parameters, named `<module>.in_proj` in the table)."""
    out = {n for n, m in net.named_modules() if isinstance(m, (nn.Conv2d, nn.Linear))}
    return out | {f"{n}.in_proj" for n, m in net.named_modules() if isinstance(m, nn.MultiheadAttention)}


def _assert_no_silent_fp(net, table, caplog):
    """Every weight is in the table's layers or listed as unreached (never both), and the calibration
    warning names each unreached one."""
    assert set(table.layers) | set(table.unreached) == _weight_layers(net)
    assert not set(table.layers) & set(table.unreached)
    warned = " ".join(r.getMessage() for r in caplog.records if r.levelno == logging.WARNING)
    for name in table.unreached:
        assert re.search(rf"(^|[ ,]){re.escape(name)}(,|$)", warned), name
    if table.unreached:
        assert f"{len(table.unreached)} weight layer(s) are used through functional calls" in warned
    else:
        assert "functional calls" not in warned


def _paths(d):
    return {
        "model": str(d / "model.pt"),
        "calibration": str(d / "calibration.pt"),
        "layers": str(d / "layers.json"),
        "budgets": str(d / "budgets.json"),
    }


# ---------------------------------------------------------------- CNNs on both layouts, attention models on one each


@pytest.mark.parametrize(
    "arch, dataset",
    [
        ("resnet18", "imagenet"),
        ("resnet18", "cifar10"),
        ("mobilenet_v2", "imagenet"),
        ("mobilenet_v2", "cifar10"),
        ("swin_t", "imagenet"),
        pytest.param("vit_b_16", "cifar10", marks=pytest.mark.slow),  # 86 M weights: ~30 s
    ],
)
@pytest.mark.filterwarnings("ignore:There is a performance drop:UserWarning")  # vmap over attention (mpqco)
def test_user_model_and_data_through_the_stages(arch, dataset, request, tmp_path, caplog):
    root = request.getfixturevalue(f"{dataset}_root")
    weights = tmp_path / f"{arch}.pth"
    spec = DataSpec(dataset, str(root), image_size=32)
    user_state = _user_weights(arch, weights, spec)
    mine = {"arch": f"torchvision:{arch}", "weights": str(weights), "dataset": _dataset(dataset, root)}
    budgets = ATTENTION_BUDGETS if arch in ("vit_b_16", "swin_t") else BUDGETS
    cfg = _user_config(tmp_path / "my.yaml", {"mine": mine}, budgets=budgets)
    m, p = cfg.models["mine"], _paths(tmp_path / "results")
    assert m.num_classes is None and data_spec(m, cfg.seed).num_classes == 10  # counted from the data
    with caplog.at_level(logging.INFO, logger="mpqflow"):
        fp = train.train_or_load(m, cfg.seed, cfg.evaluation, cfg.runtime, p["model"])
        calibrate.calibrate(
            m, cfg.quant, cfg.seed, cfg.runtime, p["model"], p["calibration"], p["layers"], plan=cfg.sample_plan
        )
    assert f"loaded weights from {weights}" in caplog.text and "training" not in caplog.text

    # The checkpoint holds the user's weights as they were, and loads into the model built for 10 classes.
    state = load_checkpoint(p["model"])["state_dict"]
    assert state.keys() == user_state.keys() and all(torch.equal(state[k], user_state[k]) for k in state)
    assert fp["n"] == 10 * TEST_PER_CLASS and 0 <= fp["top1"] <= 1 and math.isfinite(fp["loss"])
    net = load_model(m, p["model"], "cpu")
    x, _ = stack(load_split(spec, "test"), range(4))
    assert net(x).shape == (4, 10)

    # The layer table lists the model's Conv2d/Linear layers in execution order, first and last fixed.
    table = load_layer_table(p["layers"])
    _, calibrated_table = load_calibration(p["calibration"], file_sha256(p["model"]), cfg.quant.to_dict())
    assert calibrated_table == table
    modules = dict(net.named_modules())
    assert all(isinstance(modules[l], (nn.Conv2d, nn.Linear)) for l in table.layers)
    assert table.fixed == {table.layers[0]: (8, 8), table.layers[-1]: (8, 8)}
    assert modules[table.layers[-1]].out_features == 10 and len(table.candidates) == len(table.layers) - 2
    assert all(table.numel[l] == modules[l].weight.numel() for l in table.layers)
    for l in table.unreached:  # their sizes are recorded too: they count at 32 bits
        mod = modules[l.removesuffix(".in_proj")]
        assert table.numel[l] == (mod.in_proj_weight if l.endswith(".in_proj") else mod.weight).numel()
    _assert_no_silent_fp(net, table, caplog)
    if arch == "vit_b_16":  # attention's projections run through functional calls: FP, and said so
        assert len(table.unreached) == 24 and "encoder.layers.encoder_layer_0.self_attention.in_proj" in table.unreached
    elif arch == "swin_t":  # the window attention's qkv and proj Linears are used through F.linear
        assert len(table.unreached) == 24 and all(re.search(r"\.attn\.(qkv|proj)$", n) for n in table.unreached)
    else:
        assert table.unreached == () and set(table.layers) == _weight_layers(net)

    # sensitivity (mpqco) -> solve per budget -> evaluate
    caps = solve.check_budgets(p["layers"], cfg.budgets, p["budgets"])
    assert list(caps) == budgets
    sens = tmp_path / "results" / "sensitivity" / "mpqco"
    settings = cfg.sensitivity.of_estimator("mpqco")
    sensitivity.sensitivity_batch(
        m, cfg.quant, cfg.sample_plan, settings, cfg.runtime, p["model"], p["calibration"], "mpqco", 0,
        str(sens / "batch_0.npz"),
    )  # fmt: skip
    sensitivity.pool_set([str(sens / "batch_0.npz")], str(sens / "set_1x0.npz"), 1, 0)
    decisions, evals = [], []
    for budget in cfg.budgets:
        path = tmp_path / "results" / "decisions" / "mpqco" / "set_1x0" / f"{budget}.json"
        solve.solve_budget(p["layers"], str(sens / "set_1x0.npz"), "mpqco", budget, cfg.solver, str(path), {})
        decisions.append(str(path))
        evals.append(str(path).replace("/decisions/", "/eval/"))
    evaluate.evaluate_decisions(
        m, cfg.quant, cfg.sample_plan, cfg.evaluation, cfg.runtime, p["model"], p["calibration"], decisions, evals
    )
    uniform_json = tmp_path / "results" / "eval" / "uniform" / "w8a8.json"
    evaluate.evaluate_uniform(
        m, cfg.quant, cfg.seed, cfg.evaluation, cfg.runtime, p["model"], p["calibration"], ["w8a8"],
        [str(uniform_json)],
    )  # fmt: skip
    w8a8 = json.loads(uniform_json.read_text())

    fp_bits = 32 * sum(table.numel[l] for l in table.unreached)  # unreached weights stay FP
    total = sum(table.numel[l] for l in table.layers) + sum(table.numel[l] for l in table.unreached)
    for budget, dec_path, eval_path in zip(budgets, decisions, evals):
        dec, res = json.loads(open(dec_path).read()), json.loads(open(eval_path).read())
        assert dec["solver"]["status"] == "optimal" and set(dec["choice"]) <= {"w8a8", "w4a8"}
        # The decision meets its budget, recomputed here from the layer table.
        assignment = {**table.fixed, **{l: parse_option(o) for l, o in zip(table.candidates, dec["choice"])}}
        bits = sum(table.numel[l] * w for l, (w, _) in assignment.items()) + fp_bits
        if budget.startswith("avg_bits-"):
            assert bits / total <= float(budget.split("-")[1]) + 1e-9
        else:  # size_rel: a fraction of the all-8-bit size (the fixed layers are at 8 bits too)
            all8 = 8 * (total - fp_bits // 32) + fp_bits
            assert bits <= float(budget.split("-")[1]) * all8 * (1 + 1e-9)
        # The evaluation: held-out metrics, and the size of exactly this assignment.
        assert res["budget"] == budget and res["n"] == 10 * TEST_PER_CLASS
        assert 0 <= res["top1"] <= res["top5"] <= 1 and math.isfinite(res["loss"])
        assert math.isfinite(res["measured_loss_increase"]) and math.isfinite(res["estimated_loss_increase"])
        assert res["assignment"] == {l: list(o) for l, o in assignment.items()}
        assert res["size_mb"] == pytest.approx(bits / 8e6) == pytest.approx(dec["size_mb"])
        assert res["avg_bits"] == pytest.approx(bits / total) and res["size_mb"] < w8a8["size_mb"]
    all8 = 8 * (total - fp_bits // 32) + fp_bits
    assert w8a8["size_mb"] == pytest.approx(all8 / 8e6) and w8a8["avg_bits"] == pytest.approx(all8 / total)
    assert fp_bits == 0 or w8a8["avg_bits"] > 8  # FP weights counted, at 32 bits
    assert abs(w8a8["loss"] - fp["loss"]) <= 0.1 * fp["loss"]  # 8 bits: close to the FP model


# ---------------------------------------------------------------- the workflow on a user config


def _job_counts(text: str) -> dict:
    """{rule: count} of Snakemake's "Job stats" table."""
    block = text.split("Job stats:", 1)[1]
    rows = re.findall(r"^(\w+)\s+(\d+)\s*$", block.split("\n\n", 1)[0], flags=re.M)
    return {rule: int(n) for rule, n in rows if rule != "total"}


@pytest.mark.slow
def test_workflow_on_a_user_config_runs_only_the_users_model(imagenet_root, tmp_path):
    """`snakemake --configfile my.yaml`: resnet18 with the user's weights on their ImageFolder tree, and
    no job of the embedded default's digits model."""
    weights = tmp_path / "resnet18.pth"
    user_state = _user_weights("resnet18", weights, DataSpec("imagenet", str(imagenet_root), image_size=32))
    yml = tmp_path / "my.yaml"
    cfg = _user_config(
        yml,
        {
            "r18": {
                "arch": "torchvision:resnet18",
                "weights": str(weights),
                "dataset": _dataset("imagenet", imagenet_root),
            }
        },
    )
    workdir = tmp_path / "run"
    proc = run_snakemake(workdir, configfile=yml, timeout=600)
    out = proc.stdout + proc.stderr
    assert _job_counts(out) == {
        "all": 1,
        "train_model": 1,
        "calibrate": 1,
        "check_budgets": 1,
        "evaluate_uniform": 1,
        "uniform_table": 1,
        "sensitivity_batch": 1,
        "pool_set": 1,
        "solve_budget": 2,
        "sanity_check": 1,
        "evaluate_decisions": 1,
        "study_table": 1,
        "study_plots": 1,
    }
    assert "digits_resnet20" not in out and "ptq" not in out
    assert [p.name for p in (workdir / "results").iterdir()] == ["r18"]
    res = workdir / "results" / "r18"
    state = load_checkpoint(res / "model.pt")["state_dict"]
    assert all(torch.equal(state[k], user_state[k]) for k in user_state)
    assert "loaded weights from" in (workdir / "logs" / "r18" / "train_model.log").read_text()
    assert load_layer_table(res / "layers.json").layers[0] == "conv1"
    study = pd.read_csv(res / "study.csv")
    assert sorted(study.method.unique()) == ["mpqco", "uniform"] and len(study) == len(cfg.quant.options) + 2
    for budget in BUDGETS:
        ev = json.loads((res / "eval" / "mpqco" / "set_1x0" / f"{budget}.json").read_text())
        assert 0 <= ev["top1"] <= 1 and math.isfinite(ev["loss"])
    assert (res / "plots" / "accuracy_vs_size.png").read_bytes()[:4] == b"\x89PNG"


# ---------------------------------------------------------------- 1-channel data, 3-channel torchvision model


@pytest.mark.parametrize("arch, first", [("resnet18", "conv1"), ("mobilenet_v2", "features.0.0")])
def test_gray_data_adapts_the_first_conv_by_name(arch, first, tmp_path, caplog):
    """digits (1 channel, 8 px) with a 3-channel torchvision model: its first conv is rebuilt for 1 channel,
    logged by name; the user's 1-channel weights load, and 3-channel ones are refused naming the layer."""
    spec = DataSpec("digits")
    weights = tmp_path / "gray.pth"
    _user_weights(arch, weights, spec, first_conv_channels=1)
    cfg = _user_config(
        tmp_path / "my.yaml",
        {"g": {"arch": f"torchvision:{arch}", "weights": str(weights), "dataset": {"name": "digits"}}},
    )
    m, p = cfg.models["g"], _paths(tmp_path / "results")
    with caplog.at_level(logging.INFO, logger="mpqflow"):
        train.train_or_load(m, cfg.seed, cfg.evaluation, cfg.runtime, p["model"])
        calibrate.calibrate(m, cfg.quant, cfg.seed, cfg.runtime, p["model"], p["calibration"], p["layers"])
    assert f"torchvision:{arch}: first conv {first!r} adapted to 1 input channel(s)" in caplog.text
    net = load_model(m, p["model"], "cpu")
    assert net.get_submodule(first).in_channels == 1
    table = load_layer_table(p["layers"])
    assert table.layers[0] == first and table.fixed[first] == (8, 8)
    assert table.numel[first] == net.get_submodule(first).weight.numel() and table.unreached == ()
    (res,) = evaluate.evaluate_uniform(
        m, cfg.quant, cfg.seed, cfg.evaluation, cfg.runtime, p["model"], p["calibration"], ["w4a8"],
        [str(tmp_path / "w4a8.json")],
    )  # fmt: skip
    assert res["n"] == 450 and 0 <= res["top1"] <= 1 and math.isfinite(res["loss"])

    # The model's ImageNet-style (3-channel) weights do not fit: the error names the file and the layer.
    three = tmp_path / "rgb.pth"
    torch.save(getattr(torchvision.models, arch)(num_classes=10).state_dict(), three)
    cfg3 = _user_config(
        tmp_path / "rgb.yaml",
        {"g": {"arch": f"torchvision:{arch}", "weights": str(three), "dataset": {"name": "digits"}}},
    )
    with pytest.raises(
        ValueError, match=rf"rgb\.pth' does not fit the model: its first conv '{re.escape(first)}' takes 3 input"
    ):
        train.train_or_load(cfg3.models["g"], cfg.seed, cfg.evaluation, cfg.runtime, str(tmp_path / "bad.pt"))
    assert not (tmp_path / "bad.pt").exists()


def test_vit_on_an_input_size_off_its_patch_grid_names_the_size_and_key(imagenet_root, tmp_path):
    """vit_b_16 (16 px patches) on 8 px digits or a 40 px ImageFolder crop: an error naming the model, the
    size and the key that sets it, not torchvision's bare 'Input shape indivisible by patch size!'."""
    models = {
        "gray": {"arch": "torchvision:vit_b_16", "dataset": {"name": "digits"}},
        "odd": {"arch": "torchvision:vit_b_16", "dataset": {**_dataset("imagenet", imagenet_root), "image_size": 40}},
    }
    cfg = _user_config(tmp_path / "my.yaml", models)
    for name, px in (("gray", 8), ("odd", 40)):
        with pytest.raises(
            ValueError, match=rf"torchvision:vit_b_16 cannot be built for {px} px input \(Input shape"
        ) as err:
            fresh_model(cfg.models[name], 0)
        assert "models.<model>.dataset.image_size" in str(err.value)


# ---------------------------------------------------------------- more torchvision layer kinds


@pytest.mark.parametrize("arch", ["mobilenet_v3_small", "efficientnet_b0", "regnet_x_400mf"])
def test_more_torchvision_models_quantize(arch, cifar10_root, tmp_path, caplog):
    """Depthwise, squeeze-excitation and grouped convs at 32 px: the layer table holds every Conv2d and
    Linear, and one W4A8 forward quantizes every candidate layer."""
    cfg = _user_config(
        tmp_path / "my.yaml", {"x": {"arch": f"torchvision:{arch}", "dataset": _dataset("cifar10", cifar10_root)}}
    )
    m = cfg.models["x"]
    spec = data_spec(m, cfg.seed)
    net = fresh_model(m, cfg.seed)
    _settle_batchnorm(net, stack(load_split(spec, "train"), range(32))[0])
    with caplog.at_level(logging.WARNING, logger="mpqflow"):
        table, quantizer = calibrate_quantizer(net, load_split(spec, "train"), cfg.quant, cfg.seed, "cpu")
    _assert_no_silent_fp(net, table, caplog)
    assert table.unreached == ()
    x, _ = stack(load_split(spec, "test"), range(8))
    with torch.no_grad():
        fp = net(x)
        modules = dict(net.named_modules())
        with quantizer.applied(table.uniform_assignment((4, 8))):
            q = net(x)
            for l in table.candidates:  # per-channel 4-bit weights: at most 16 levels in an output channel
                assert modules[l].weight[0].unique().numel() <= 16, l
    assert q.shape == (8, 10) and torch.isfinite(q).all() and not torch.allclose(q, fp)
    assert torch.equal(net(x), fp)  # the FP model is back afterwards


# ---------------------------------------------------------------- a broken CIFAR folder


def test_cifar_folder_errors_name_the_file(digits_rgb, tmp_path):
    """A missing, unreadable or malformed batch file, or a root one level too deep, stops the stage that
    reads it with a message naming the file: never torchvision's 'use download=True'."""
    base = _write_cifar(tmp_path, digits_rgb)
    weights = tmp_path / "r18.pth"
    torch.save(torchvision.models.resnet18(num_classes=10).state_dict(), weights)
    cfg = _user_config(
        tmp_path / "my.yaml",
        {"c": {"arch": "torchvision:resnet18", "weights": str(weights), "dataset": _dataset("cifar10", tmp_path)}},
    )
    m, p = cfg.models["c"], _paths(tmp_path / "results")

    def run_train():
        return train.train_or_load(m, cfg.seed, cfg.evaluation, cfg.runtime, p["model"])

    def run_calibrate():
        calibrate.calibrate(m, cfg.quant, cfg.seed, cfg.runtime, p["model"], p["calibration"], p["layers"])

    def fails(stage, err_type, pattern):
        with pytest.raises(err_type, match=pattern) as err:
            stage()
        assert "download" not in str(err.value)

    good = (base / "test_batch").read_bytes()
    (base / "test_batch").write_bytes(b"these are not pickled arrays")  # the first stage reads the test split
    fails(run_train, ValueError, r"test_batch' is not a CIFAR python batch \(UnpicklingError")
    (base / "test_batch").write_bytes(good)
    run_train()

    with open(base / "data_batch_2", "wb") as f:  # CIFAR-100's key in a CIFAR-10 file
        pickle.dump({"data": np.zeros((4, 3072), np.uint8), "fine_labels": [0, 1, 2, 3]}, f)
    fails(run_calibrate, ValueError, r"data_batch_2' is not a CIFAR python batch \(KeyError: 'labels'\)")
    with open(base / "data_batch_2", "wb") as f:  # gray 32x32 images: 1024 values a row
        pickle.dump({"data": np.zeros((4, 1024), np.uint8), "labels": [0, 1, 2, 3]}, f)
    fails(run_calibrate, ValueError, r"data_batch_2': data of shape \(4, 1024\) with 4 labels; expected N x 3072")
    (base / "data_batch_2").unlink()
    fails(run_calibrate, FileNotFoundError, r"data_batch_2' is missing")
    assert not (tmp_path / "results" / "calibration.pt").exists()

    # a root one level too deep: refused before any job (config_checks), naming the key and the layout
    with pytest.raises(
        ConfigError, match=r"'models.c.dataset.root': .*cifar-10-batches-py' has no cifar-10-batches-py/"
    ):
        _user_config(
            tmp_path / "deep.yaml",
            {"c": {"arch": "torchvision:resnet18", "weights": str(weights), "dataset": _dataset("cifar10", base)}},
        )

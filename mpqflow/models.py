"""Model zoo: the digits CNN, CIFAR-style ResNet-20/32/56 and any torchvision classifier.

Usage:
    model = build_model("resnet20", in_channels=1, num_classes=10)
    model = build_model("torchvision:resnet18", num_classes=1000, weights="/data/resnet18.pth")

Weights are only ever read from a local file (never downloaded). `quantizable_layers(model)` lists the
Conv2d/Linear layers in execution order; the first and last are the ones fixed at 8 bits by default.
"""

from __future__ import annotations

import logging
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

from .checkpoints import load_state_dict

__all__ = [
    "ARCHS",
    "DigitsCNN",
    "CifarResNet",
    "build_model",
    "fresh_model",
    "load_weights",
    "weights_mismatch",
    "quantizable_layers",
    "unreached_layers",
    "layer_macs",
]

log = logging.getLogger("mpqflow")


class DigitsCNN(nn.Module):
    """A small CNN for 8x8 digits: three 3x3 conv + BN + ReLU, a pooled linear head.

    BatchNorm makes it train to >95% in a few epochs (without it, 8 epochs reach about 75%).
    """

    def __init__(self, in_channels: int = 1, num_classes: int = 10, width: int = 16):
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, width, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(width)
        self.conv2 = nn.Conv2d(width, 2 * width, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(2 * width)
        self.conv3 = nn.Conv2d(2 * width, 2 * width, 3, padding=1, bias=False)
        self.bn3 = nn.BatchNorm2d(2 * width)
        self.fc = nn.Linear(2 * width, num_classes)

    def forward(self, x):  # (B, C, H, W)
        x = F.relu(self.bn1(self.conv1(x)))
        x = F.relu(self.bn2(self.conv2(x)))
        x = F.max_pool2d(x, 2)  # (B, 2w, H/2, W/2)
        x = F.relu(self.bn3(self.conv3(x)))
        x = torch.flatten(F.adaptive_avg_pool2d(x, 1), 1)  # (B, 2w)
        return self.fc(x)


class BasicBlock(nn.Module):
    """ResNet basic block; the shortcut is a 1x1 conv + BN when the shape changes (option B)."""

    def __init__(self, in_planes: int, planes: int, stride: int):
        super().__init__()
        self.conv1 = nn.Conv2d(in_planes, planes, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.shortcut = nn.Sequential()
        if stride != 1 or in_planes != planes:
            self.shortcut = nn.Sequential(nn.Conv2d(in_planes, planes, 1, stride, bias=False), nn.BatchNorm2d(planes))

    def forward(self, x):
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return F.relu(out + self.shortcut(x))


class CifarResNet(nn.Module):
    """CIFAR-style ResNet (He et al. 2016, section 4.2): 3 stages of n blocks, widths 16/32/64."""

    def __init__(self, depth: int, in_channels: int = 3, num_classes: int = 10):
        super().__init__()
        if (depth - 2) % 6 != 0:
            raise ValueError(f"CIFAR ResNet depth must be 6n+2, got {depth}")
        n = (depth - 2) // 6
        self.conv1 = nn.Conv2d(in_channels, 16, 3, 1, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(16)
        layers, in_planes = [], 16
        for planes, stride in ((16, 1), (32, 2), (64, 2)):
            blocks = []
            for b in range(n):
                blocks.append(BasicBlock(in_planes, planes, stride if b == 0 else 1))
                in_planes = planes
            layers.append(nn.Sequential(*blocks))
        self.layer1, self.layer2, self.layer3 = layers
        self.fc = nn.Linear(64, num_classes)

    def forward(self, x):  # (B, C, H, W)
        x = F.relu(self.bn1(self.conv1(x)))
        x = self.layer3(self.layer2(self.layer1(x)))  # (B, 64, H/4, W/4)
        x = torch.flatten(F.adaptive_avg_pool2d(x, 1), 1)  # (B, 64)
        return self.fc(x)


ARCHS = {
    "digits_cnn": lambda c, k: DigitsCNN(c, k),
    "resnet20": lambda c, k: CifarResNet(20, c, k),
    "resnet32": lambda c, k: CifarResNet(32, c, k),
    "resnet56": lambda c, k: CifarResNet(56, c, k),
}


# torchvision builders that take the input size, and the keyword they take it by
_SIZE_KWARGS = {"vit_": "image_size", "maxvit_": "input_size"}


def _adapt_first_conv(model: nn.Module, in_channels: int) -> str | None:
    """Replace the model's first Conv2d by one taking `in_channels` (same shape otherwise); its name."""
    for name, module in model.named_modules():
        if isinstance(module, nn.Conv2d):
            if module.in_channels == in_channels:
                return None
            if module.groups != 1:
                raise ValueError(
                    f"cannot adapt the first conv {name!r} (groups={module.groups}) to {in_channels} channels"
                )
            conv = nn.Conv2d(
                in_channels,
                module.out_channels,
                module.kernel_size,
                module.stride,
                module.padding,
                module.dilation,
                1,
                module.bias is not None,
                module.padding_mode,
            )
            parent_name, _, attr = name.rpartition(".")
            setattr(model.get_submodule(parent_name) if parent_name else model, attr, conv)
            return name
    raise ValueError(f"the model has no Conv2d to take {in_channels}-channel input")


def build_model(
    arch: str, in_channels: int = 3, num_classes: int = 10, weights: str | None = None, image_size: int | None = None
):
    """Build a model by name; load a local state_dict if `weights` is given.

    Args:
        arch: one of ARCHS, or `torchvision:<name>` for any torchvision classification model.
        in_channels: image channels; a torchvision model's first conv is replaced by one taking them
            when they are not 3 (logged, by name).
        num_classes: classifier outputs.
        weights: path to a local state_dict (or full checkpoint with a `state_dict` key).
        image_size: input height/width, for the torchvision builders that take it (vit_*, maxvit_*).
    """
    if arch.startswith("torchvision:"):
        import torchvision

        name = arch.split(":", 1)[1]
        if name not in torchvision.models.list_models(module=torchvision.models):
            raise ValueError(f"unknown torchvision classification model {name!r} in arch {arch!r}")
        kwargs = {"num_classes": num_classes}
        size_key = next((key for prefix, key in _SIZE_KWARGS.items() if name.startswith(prefix)), None)
        if size_key is not None and image_size is not None:
            kwargs[size_key] = image_size
        try:
            model = torchvision.models.get_model(name, weights=None, **kwargs)
        except (AssertionError, ValueError) as err:
            if size_key not in kwargs:  # built without the data's size: not about it
                raise
            # torchvision's own words ("Input shape indivisible by patch size!") name neither model nor key
            raise ValueError(
                f"{arch} cannot be built for {image_size} px input ({err}); the input size is the dataset's: "
                "8 for digits, 32 for CIFAR, models.<model>.dataset.image_size for an ImageNet-style folder"
            ) from None
        adapted = _adapt_first_conv(model, in_channels)
        if adapted:
            log.info("%s: first conv %r adapted to %d input channel(s)", arch, adapted, in_channels)
    elif arch in ARCHS:
        model = ARCHS[arch](in_channels, num_classes)
    else:
        raise ValueError(f"unknown arch {arch!r}: expected one of {sorted(ARCHS)} or 'torchvision:<name>'")
    if weights is not None:
        load_weights(model, weights)
    return model


def fresh_model(model, seed: int) -> nn.Module:
    """A configured model (a config.ModelConfig) with fresh weights, sized for its data (channels,
    classes, input size); `models.<m>.num_classes` overrides the dataset's class count."""
    from .data import data_spec

    spec = data_spec(model, seed)
    num_classes = model.num_classes or spec.num_classes  # an explicit key overrides the dataset's count
    return build_model(model.arch, spec.in_channels, num_classes, image_size=spec.input_size)


def load_weights(model: nn.Module, path: str | Path) -> nn.Module:
    """Load a local state_dict file into `model` (strict); a missing file is a clear error."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"model weights file {str(path)!r} does not exist (weights are never downloaded)")
    state = load_state_dict(path, "model weights")
    problem = weights_mismatch(model, state)
    if problem is not None:
        raise ValueError(f"weights file {str(path)!r} does not fit the model: {problem}")
    model.load_state_dict(state)
    return model


def weights_mismatch(model: nn.Module, state) -> str | None:
    """Why `state` would not load into `model` (strictly), in words that point at the cause; None if it would.

    Compares tensor names and shapes only, so `model` may live on the meta device (no memory, no data):
    a config's weights file is checked this way before any job. Three causes get their own words:
    another architecture (few names shared), a classifier for another class count, and a first conv
    for another channel count; anything else lists the differing tensors.
    """
    own = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    theirs = {k: tuple(v.shape) for k, v in state.items()}
    missing = [k for k in own if k not in theirs]
    unexpected = [k for k in theirs if k not in own]
    shapes = [(k, theirs[k], own[k]) for k in own if k in theirs and theirs[k] != own[k]]
    if not (missing or unexpected or shapes):
        return None
    if missing or unexpected:
        shared = len(own) - len(missing)
        if not shared and {k.removeprefix("module.") for k in unexpected} == set(own):
            return (
                "its tensor names carry a 'module.' prefix (saved from DataParallel/DDP): save model.module's weights"
            )
        if shared < len(own) / 2:
            head = f"it shares {shared} of the model's {len(own)} tensor names: a checkpoint of another architecture"
        else:
            head = f"{len(missing)} of the model's {len(own)} tensors are missing and it has {len(unexpected)} others"
            head += ": another variant of the architecture?"
        return f"{head} (the file has e.g. {unexpected[:3]}, the model expects e.g. {missing[:3]})"
    linears = [n for n, m in model.named_modules() if isinstance(m, nn.Linear)]
    convs = [n for n, m in model.named_modules() if isinstance(m, nn.Conv2d)]
    last = f"{linears[-1]}.weight" if linears else None
    if last is not None and {k for k, *_ in shapes} <= {last, last.replace(".weight", ".bias")}:
        outputs = theirs[last][0]
        return (
            f"its classifier {linears[-1]!r} has {outputs} outputs where the model has {own[last][0]} (the "
            f"dataset's class count): weights trained for {outputs} classes need models.<model>.num_classes: {outputs}"
        )
    first = f"{convs[0]}.weight" if convs else None
    if [k for k, *_ in shapes] == [first] and theirs[first][1] != own[first][1]:
        return (
            f"its first conv {convs[0]!r} takes {theirs[first][1]} input channels where the data has "
            f"{own[first][1]}: weights for another channel count do not load"
        )
    listed = ", ".join(f"{k} {list(a)} (model {list(b)})" for k, a, b in shapes[:4])
    return f"{len(shapes)} tensors differ in shape, e.g. {listed}: another width or variant of the architecture?"


def quantizable_layers(model: nn.Module, example: torch.Tensor) -> list[str]:
    """Names of the Conv2d/Linear layers in the order they execute on `example`."""
    order: list[str] = []
    hooks = [
        m.register_forward_pre_hook(lambda mod, inp, name=name: order.append(name))
        for name, m in model.named_modules()
        if isinstance(m, (nn.Conv2d, nn.Linear))
    ]
    try:
        with torch.no_grad():
            model.eval()(example)
    finally:
        for h in hooks:
            h.remove()
    return list(dict.fromkeys(order))


def unreached_layers(model: nn.Module, executed: list[str]) -> list[str]:
    """Weights the quantizer cannot reach: Conv2d/Linear modules never called as modules (their
    weights are used through functional calls, e.g. attention's `out_proj`) and the input projections
    of nn.MultiheadAttention (plain parameters, as `<name>.in_proj`). Execution order of `model`."""
    called = set(executed)
    out = []
    for name, m in model.named_modules():
        if isinstance(m, nn.MultiheadAttention):
            out.append(f"{name}.in_proj")
        elif isinstance(m, (nn.Conv2d, nn.Linear)) and name not in called:
            out.append(name)
    return out


def unreached_numel(model: nn.Module, names: list[str]) -> dict[str, int]:
    """Weights of each name of :func:`unreached_layers` (an attention's `<name>.in_proj`: its input
    projection weights, packed or as separate q/k/v matrices)."""
    out = {}
    for name in names:
        if name.endswith(".in_proj") or name == "in_proj":
            mha = model.get_submodule(name[: -len(".in_proj")] if name != "in_proj" else "")
            packed = mha.in_proj_weight
            parts = [packed] if packed is not None else [mha.q_proj_weight, mha.k_proj_weight, mha.v_proj_weight]
            out[name] = sum(int(p.numel()) for p in parts)
        else:
            out[name] = int(model.get_submodule(name).weight.numel())
    return out


def layer_macs(model: nn.Module, example: torch.Tensor) -> dict[str, int]:
    """Multiply-accumulates per sample of each Conv2d/Linear layer (grouped convs counted per group)."""
    macs: dict[str, int] = {}

    def hook(mod, inp, out, name):
        per_out = mod.weight[0].numel()  # (C_in/groups * kh * kw) MACs per output element
        macs[name] = macs.get(name, 0) + per_out * out[0].numel()

    hooks = [
        m.register_forward_hook(lambda mod, i, o, name=name: hook(mod, i, o, name))
        for name, m in model.named_modules()
        if isinstance(m, (nn.Conv2d, nn.Linear))
    ]
    try:
        with torch.no_grad():
            model.eval()(example[:1])
    finally:
        for h in hooks:
            h.remove()
    return macs

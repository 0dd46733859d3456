"""Datasets and the deterministic sample plan: training, calibration, sensitivity batch pool, evaluation.

Usage:
    spec = DataSpec(name="digits")
    train, test = load_split(spec, "train"), load_split(spec, "test")
    plan = SamplePlan(len(train), calibration_samples=256, pool_batches=8, batch_size=64, seed=0)
    x, y = stack(train, plan.pool_batch(3))          # sensitivity batch 3
    batches = sensitivity_set(n=4, set_id=1, pool_batches=8, seed=0)   # batch ids of set_4x1
    idx = pool_batch_indices(len(train), plan_cfg, 3)                    # the same, from the config
    idx = set_indices(len(train), plan_cfg, n=4, set_id=1)              # every sample of set_4x1

`digits` is scikit-learn's bundled 8x8 handwritten digits (no download). CIFAR-10/100 are read by
torchvision from a local root (download=False); ImageNet-style data from `root/{train,val}/<class>/*`.
Calibration samples and the sensitivity pool are disjoint parts of the training split; evaluation
uses the held-out split only.
"""

from __future__ import annotations

import os
import pickle
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from .config_checks import CIFAR_FILES

# torch is imported where it is used: the Snakefile imports this module (sensitivity_set) in every
# snakemake process, SLURM job steps included, and should not pay torch's import for it.
if TYPE_CHECKING:
    import torch
    from torch.utils.data import Dataset

__all__ = [
    "DATASETS",
    "DataSpec",
    "data_spec",
    "image_folder_classes",
    "preprocessing",
    "load_split",
    "SamplePlan",
    "sensitivity_set",
    "pool_batch_indices",
    "set_indices",
    "stack",
    "iterate",
]

# name -> (input channels, classes, input size); an ImageNet-style folder counts its class folders
DATASETS = {"digits": (1, 10, 8), "cifar10": (3, 10, 32), "cifar100": (3, 100, 32), "imagenet": (3, None, None)}
_CIFAR_MEAN, _CIFAR_STD = (0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)
_IMAGENET_MEAN, _IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


@dataclass(frozen=True)
class DataSpec:
    """Where a dataset lives and how it is prepared.

    Args:
        name: digits | cifar10 | cifar100 | imagenet.
        root: local directory (required for everything but digits).
        test_fraction: held-out fraction of digits (stratified, seeded split).
        image_size: ImageNet crop size (resize is 8/7 of it).
        seed: seed of the digits split.
    """

    name: str = "digits"
    root: str | None = None
    test_fraction: float = 0.25
    image_size: int = 224
    seed: int = 0

    def __post_init__(self):
        if self.name not in DATASETS:
            raise ValueError(f"dataset name {self.name!r}: expected one of {sorted(DATASETS)}")
        if self.name != "digits":
            if not self.root:
                raise ValueError(f"dataset {self.name!r} needs a local 'root' directory")
            if not Path(self.root).is_dir():
                raise FileNotFoundError(f"dataset root {self.root!r} for {self.name!r} is not a directory")

    @property
    def in_channels(self) -> int:
        """Image channels of the dataset."""
        return DATASETS[self.name][0]

    @property
    def num_classes(self) -> int:
        """Classes of the dataset; an ImageNet-style folder counts the class folders of root/train."""
        known = DATASETS[self.name][1]
        return known if known is not None else len(image_folder_classes(Path(self.root) / "train"))

    @property
    def input_size(self) -> int:
        """Height (= width) of the images a model sees: 8 (digits), 32 (CIFAR) or the crop size."""
        return DATASETS[self.name][2] or self.image_size


def image_folder_classes(folder: Path) -> list[str]:
    """The class folders of an ImageFolder tree (sorted, as torchvision's ImageFolder orders them)."""
    if not folder.is_dir():
        raise FileNotFoundError(
            f"ImageNet-style folder {str(folder)!r} does not exist (expected <root>/train and <root>/val)"
        )
    classes = sorted(e.name for e in os.scandir(folder) if e.is_dir())
    if not classes:
        raise FileNotFoundError(f"ImageNet-style folder {str(folder)!r} has no class folders (<folder>/<class>/*.jpg)")
    return classes


def data_spec(model, seed: int) -> DataSpec:
    """The DataSpec of a configured model (a config.ModelConfig)."""
    ds = model.dataset
    return DataSpec(ds.name, ds.root, ds.test_fraction, ds.image_size, seed)


def _digits_split(spec: DataSpec):
    """(x_train, x_test, y_train, y_test) of the digits: raw (N, 64) pixels in 0..16, stratified, seeded."""
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    x, y = load_digits(return_X_y=True)  # (1797, 64) in 0..16
    return train_test_split(x, y, test_size=spec.test_fraction, random_state=spec.seed, stratify=y)


def _digits_stats(x_train: np.ndarray) -> tuple[float, float]:
    """One mean and std over every pixel of the training split (the held-out split is never looked at)."""
    return float(x_train.mean()), float(x_train.std())


def _digits(spec: DataSpec, split: str) -> Dataset:
    import torch
    from torch.utils.data import TensorDataset

    x_tr, x_te, y_tr, y_te = _digits_split(spec)
    mean, std = _digits_stats(x_tr)
    x_sel, y_sel = (x_tr, y_tr) if split == "train" else (x_te, y_te)
    images = torch.tensor((x_sel - mean) / std, dtype=torch.float32).reshape(-1, 1, 8, 8)
    return TensorDataset(images, torch.tensor(y_sel, dtype=torch.long))


class _ArraysOnly(pickle.Unpickler):
    """Unpickles CIFAR's python batches (dicts of bytes, lists and numpy arrays) and nothing else:
    a pickle from a user's folder never runs other code."""

    _ALLOWED = {
        ("numpy.core.numeric", "_frombuffer"),
        ("numpy._core.numeric", "_frombuffer"),
        ("numpy.core.multiarray", "_reconstruct"),
        ("numpy._core.multiarray", "_reconstruct"),
        ("numpy", "ndarray"),
        ("numpy", "dtype"),
        ("numpy.core.multiarray", "scalar"),
        ("numpy._core.multiarray", "scalar"),
    }

    def find_class(self, module, name):
        if (module, name) not in self._ALLOWED:
            raise pickle.UnpicklingError(f"refusing to load {module}.{name}")
        return super().find_class(module, name)


def _cifar_batch(path: Path, label_key: str) -> tuple[np.ndarray, np.ndarray]:
    """(images (N, 3, 32, 32) uint8, labels (N,)) of one CIFAR python batch file."""
    if not path.is_file():
        raise FileNotFoundError(f"CIFAR file {str(path)!r} is missing")
    try:
        with open(path, "rb") as f:
            batch = _ArraysOnly(f, encoding="latin1").load()  # as torchvision reads them
        data, labels = np.asarray(batch["data"], dtype=np.uint8), np.asarray(batch[label_key], dtype=np.int64)
    except (pickle.UnpicklingError, EOFError, KeyError, TypeError, ValueError) as err:
        raise ValueError(
            f"CIFAR file {str(path)!r} is not a CIFAR python batch ({type(err).__name__}: {err}); "
            f"expected a pickled dict with 'data' (N x 3072 uint8) and {label_key!r}"
        ) from None
    if data.ndim != 2 or data.shape[1] != 3072 or len(labels) != len(data):
        raise ValueError(
            f"CIFAR file {str(path)!r}: data of shape {data.shape} with {len(labels)} labels; "
            "expected N x 3072 and N labels"
        )
    return data.reshape(-1, 3, 32, 32), labels


def _cifar(spec: DataSpec, split: str) -> Dataset:
    """CIFAR-10/100 from the python pickle batches under root (the official files or any of the same
    format: no checksum), normalised as torchvision's ToTensor + Normalize would."""
    import torch
    from torch.utils.data import TensorDataset

    folder, train_files, test_files, label_key = CIFAR_FILES[spec.name]
    base = Path(spec.root) / folder
    if not base.is_dir():
        raise FileNotFoundError(
            f"{spec.name}: folder {str(base)!r} does not exist; expected {folder}/ with "
            f"{', '.join(train_files + test_files)} (the python version) under root {spec.root!r}"
        )
    parts = [_cifar_batch(base / f, label_key) for f in (train_files if split == "train" else test_files)]
    x = torch.from_numpy(np.concatenate([p[0] for p in parts])).float().div_(255)  # (N, 3, 32, 32)
    mean, std = torch.tensor(_CIFAR_MEAN)[:, None, None], torch.tensor(_CIFAR_STD)[:, None, None]
    x = (x - mean) / std
    return TensorDataset(x, torch.from_numpy(np.concatenate([p[1] for p in parts])))


def _imagenet(spec: DataSpec, split: str) -> Dataset:
    import torchvision
    import torchvision.transforms as T

    folder = Path(spec.root) / ("train" if split == "train" else "val")
    if not folder.is_dir():
        raise FileNotFoundError(
            f"ImageNet-style folder {str(folder)!r} does not exist (expected <root>/train and <root>/val)"
        )
    tf = T.Compose(
        [
            T.Resize(spec.image_size * 8 // 7),
            T.CenterCrop(spec.image_size),
            T.ToTensor(),
            T.Normalize(_IMAGENET_MEAN, _IMAGENET_STD),
        ]
    )
    return torchvision.datasets.ImageFolder(str(folder), transform=tf)


CIFAR10_CLASSES = ("airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck")


def preprocessing(spec: DataSpec) -> dict:
    """What a user must do to an image before the model sees it, as load_split does it (JSON-able):
    resize (shorter side, or None), crop (center crop size, or None), pixel_max (raw pixels are divided
    by it: 255 for 8-bit images, 1 for the digits' 0..16 values), mean and std per channel (applied
    after the division), class_names (None where the dataset has no names stored)."""
    if spec.name == "digits":
        mean, std = _digits_stats(_digits_split(spec)[0])
        names = [str(d) for d in range(10)]
        return dict(resize=None, crop=None, pixel_max=1.0, mean=[mean], std=[std], class_names=names)
    if spec.name in ("cifar10", "cifar100"):
        names = list(CIFAR10_CLASSES) if spec.name == "cifar10" else None
        mean, std = list(_CIFAR_MEAN), list(_CIFAR_STD)
        return dict(resize=None, crop=None, pixel_max=255.0, mean=mean, std=std, class_names=names)
    return dict(
        resize=spec.image_size * 8 // 7,
        crop=spec.image_size,
        pixel_max=255.0,
        mean=list(_IMAGENET_MEAN),
        std=list(_IMAGENET_STD),
        class_names=image_folder_classes(Path(spec.root) / "train"),
    )


def load_split(spec: DataSpec, split: str) -> Dataset:
    """The `train` or `test` split of a dataset (ImageNet's `val` serves as `test`)."""
    if split not in ("train", "test"):
        raise ValueError(f"split {split!r}: expected 'train' or 'test'")
    loader = {"digits": _digits, "cifar10": _cifar, "cifar100": _cifar, "imagenet": _imagenet}[spec.name]
    return loader(spec, split)


@dataclass(frozen=True)
class SamplePlan:
    """Seeded, disjoint use of the training split: calibration samples, then the sensitivity pool.

    Args:
        n_train: size of the training split.
        calibration_samples: samples used to calibrate quantizers.
        pool_batches: number of sensitivity batches in the pool.
        batch_size: samples per sensitivity batch.
        seed: seed of the permutation.
    """

    n_train: int
    calibration_samples: int
    pool_batches: int
    batch_size: int
    seed: int = 0

    def __post_init__(self):
        need = self.calibration_samples + self.pool_batches * self.batch_size
        if need > self.n_train:
            raise ValueError(
                f"calibration_samples + pool_batches*batch_size = {need} exceeds the {self.n_train} training samples"
            )

    def _perm(self) -> np.ndarray:
        return np.random.default_rng(self.seed).permutation(self.n_train)

    def calibration(self) -> np.ndarray:
        """Indices of the calibration samples."""
        return self._perm()[: self.calibration_samples]

    def pool_batch(self, b: int) -> np.ndarray:
        """Indices of sensitivity batch b (0-based). Batch b does not depend on pool size."""
        if not 0 <= b < self.pool_batches:
            raise ValueError(f"batch index {b} outside the pool 0..{self.pool_batches - 1}")
        start = self.calibration_samples + b * self.batch_size
        return self._perm()[start : start + self.batch_size]


def sensitivity_set(n: int, set_id: int, pool_batches: int, seed: int = 0) -> list[int]:
    """Batch ids of `set_{n}x{set_id}`: a seeded shuffle of the pool, disjoint across ids while it lasts."""
    if not 1 <= n <= pool_batches:
        raise ValueError(f"set size {n} must be within 1..pool_batches={pool_batches}")
    perm = np.random.default_rng(seed + 7919).permutation(pool_batches)
    return sorted(int(perm[(set_id * n + k) % pool_batches]) for k in range(n))


def pool_batch_indices(n_train: int, plan, batch: int) -> np.ndarray:
    """Training-split indices of pool batch `batch` under `plan` (a config.SamplePlanConfig).

    Batch b depends on the seed, the calibration samples and the batch size, not on the pool's size,
    so growing the pool keeps every finished batch valid.
    """
    if not 0 <= batch < plan.pool_batches:
        raise ValueError(f"batch index {batch} outside the pool 0..{plan.pool_batches - 1} (sensitivity.pool_batches)")
    need = plan.calibration_samples + (batch + 1) * plan.batch_size
    if need > n_train:
        raise ValueError(
            f"pool batch {batch} needs training samples up to {need} = quant.calibration_samples "
            f"({plan.calibration_samples}) + {batch + 1} x sensitivity.batch_size ({plan.batch_size}), but the "
            f"training split has {n_train}; the configured pool of {plan.pool_batches} batches needs "
            f"{plan.calibration_samples + plan.pool_batches * plan.batch_size}"
        )
    return SamplePlan(n_train, plan.calibration_samples, batch + 1, plan.batch_size, plan.seed).pool_batch(batch)


def set_indices(n_train: int, plan, n: int, set_id: int) -> np.ndarray:
    """Training-split indices of every sample in sensitivity set `set_{n}x{set_id}` (batch order)."""
    batches = sensitivity_set(n, set_id, plan.pool_batches, plan.seed)
    return np.concatenate([pool_batch_indices(n_train, plan, b) for b in batches])


def stack(dataset: Dataset, indices) -> tuple[torch.Tensor, torch.Tensor]:
    """Gather samples into one batch: images (B, C, H, W) and labels (B,)."""
    import torch
    from torch.utils.data import TensorDataset

    if isinstance(dataset, TensorDataset):
        idx = torch.as_tensor(np.asarray(indices), dtype=torch.long)
        return dataset.tensors[0][idx], dataset.tensors[1][idx]
    items = [dataset[int(i)] for i in indices]
    return torch.stack([x for x, _ in items]), torch.tensor([int(y) for _, y in items])


def iterate(dataset: Dataset, batch_size: int, indices=None, workers: int = 0):
    """Yield (x, y) batches over `indices` (default: all) in order."""
    import torch
    from torch.utils.data import TensorDataset

    indices = np.arange(len(dataset)) if indices is None else np.asarray(indices)
    if isinstance(dataset, TensorDataset) or workers == 0:
        for s in range(0, len(indices), batch_size):
            yield stack(dataset, indices[s : s + batch_size])
        return
    loader = torch.utils.data.DataLoader(
        torch.utils.data.Subset(dataset, indices.tolist()), batch_size=batch_size, num_workers=workers
    )
    yield from loader

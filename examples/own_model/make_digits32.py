"""Write a small dataset in the two folder formats a user brings: scikit-learn's digits upscaled to
32x32 RGB, as an ImageFolder tree and as CIFAR-10 python pickles.

Usage:
    python examples/own_model/make_digits32.py data/digits32            # data/digits32/{imagefolder,cifar}

    data/digits32/imagefolder/{train,val}/<digit>/<n>.png      dataset: {name: imagenet, root: .../imagefolder}
    data/digits32/cifar/cifar-10-batches-py/data_batch_1..5, test_batch, batches.meta
                                                              dataset: {name: cifar10, root: .../cifar}

75 % train / 25 % val, stratified and seeded (the same split as the embedded digits model).
"""

from __future__ import annotations

import argparse
import pickle
from pathlib import Path

import numpy as np
from PIL import Image
from sklearn.datasets import load_digits
from sklearn.model_selection import train_test_split


def digits32(seed: int = 0) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """(x_train, y_train, x_val, y_val); x uint8 (N, 32, 32, 3), bilinear upscaling of the 8x8 digits."""
    d = load_digits()
    img = (d.images / 16.0 * 255).astype(np.uint8)  # (N, 8, 8) in 0..255
    big = np.stack([np.asarray(Image.fromarray(a).resize((32, 32), Image.BILINEAR)) for a in img])  # (N, 32, 32)
    rgb = np.repeat(big[..., None], 3, axis=-1)  # (N, 32, 32, 3)
    xtr, xva, ytr, yva = train_test_split(rgb, d.target, test_size=0.25, stratify=d.target, random_state=seed)
    return xtr, ytr, xva, yva


def write_imagefolder(root: Path, splits: dict) -> None:
    for split, (x, y) in splits.items():
        for i, (a, label) in enumerate(zip(x, y)):
            folder = root / split / str(int(label))
            folder.mkdir(parents=True, exist_ok=True)
            Image.fromarray(a).save(folder / f"{i}.png")


def write_cifar(root: Path, x_train, y_train, x_val, y_val) -> None:
    base = root / "cifar-10-batches-py"
    base.mkdir(parents=True, exist_ok=True)

    def dump(name: str, x: np.ndarray, y: np.ndarray) -> None:
        data = x.transpose(0, 3, 1, 2).reshape(len(x), -1)  # (N, 3*32*32), channel-major like CIFAR
        with open(base / name, "wb") as f:
            pickle.dump({"data": data, "labels": [int(v) for v in y]}, f)

    for k, part in enumerate(np.array_split(np.arange(len(x_train)), 5), start=1):
        dump(f"data_batch_{k}", x_train[part], y_train[part])
    dump("test_batch", x_val, y_val)
    with open(base / "batches.meta", "wb") as f:
        pickle.dump({"label_names": [str(i) for i in range(10)]}, f)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("out", type=Path, help="output directory")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    xtr, ytr, xva, yva = digits32(args.seed)
    write_imagefolder(args.out / "imagefolder", {"train": (xtr, ytr), "val": (xva, yva)})
    write_cifar(args.out / "cifar", xtr, ytr, xva, yva)
    print(f"{len(xtr)} train and {len(xva)} val images in {args.out}/imagefolder and {args.out}/cifar")


if __name__ == "__main__":
    main()

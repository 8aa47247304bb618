"""A small ImageNet-style tree (train/ and val/, one folder per class) of random JPEG/PNG images."""

from __future__ import annotations

import os

import numpy as np
from PIL import Image


def make_image_tree(
    root: str,
    classes=("n01", "n02", "n03"),
    train_per_class: int = 6,
    val_per_class: int = 2,
    size=(40, 48),
    seed: int = 0,
) -> str:
    rng = np.random.default_rng(seed)
    for split, count in (("train", train_per_class), ("val", val_per_class)):
        for ci, cls in enumerate(classes):
            folder = os.path.join(root, split, cls)
            os.makedirs(folder, exist_ok=True)
            for i in range(count):
                # Class-dependent mean colour so that the classes are learnable in principle.
                base = np.full((size[0], size[1], 3), 60 + 70 * ci, dtype=np.int16)
                pixels = np.clip(base + rng.integers(-40, 40, base.shape), 0, 255).astype(np.uint8)
                ext = "JPEG" if i % 2 == 0 else "png"
                Image.fromarray(pixels).save(os.path.join(folder, f"img_{i}.{ext}"))
    return root

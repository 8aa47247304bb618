"""The released recipe's data options: the plain random crop of the stored image, random erasing after
mixup within its area bounds, running mixup (a per-sample λ ≥ 0.5 whose partner is the previous mixed
batch)."""

import os

import numpy as np
import pytest
import torch
from PIL import Image

from launch.config.load import load_config
from launch.errors import ConfigError
from launch.training.augment import RunningMixup, erase_batch
from launch.training.data import IMAGENET_MEAN, IMAGENET_STD, imagenet_transforms
from tests.helpers.images import make_image_tree
from tests.helpers.jobs import DEMO


def imagenet_cfg(tmp_path, *overrides):
    root = make_image_tree(str(tmp_path / "images"))
    return load_config(
        DEMO,
        [
            "data.dataset=imagenet",
            f"data.train_dir={os.path.join(root, 'train')}",
            f"data.val_dir={os.path.join(root, 'val')}",
            "data.image_size=32",
            *overrides,
        ],
    )


def pixels(tensor: torch.Tensor) -> np.ndarray:
    """Back from the normalised tensor to 8-bit pixels (H, W, 3)."""
    mean, std = torch.tensor(IMAGENET_MEAN).view(3, 1, 1), torch.tensor(IMAGENET_STD).view(3, 1, 1)
    return (tensor * std + mean).mul(255).round().permute(1, 2, 0).numpy().astype(np.int64)


def is_window(crop: np.ndarray, image: np.ndarray) -> bool:
    """``crop`` is a window of ``image``, or of its mirror image."""
    h, w = crop.shape[:2]
    for source in (image, image[:, ::-1]):
        for top in range(source.shape[0] - h + 1):
            for left in range(source.shape[1] - w + 1):
                if np.array_equal(source[top : top + h, left : left + w], crop):
                    return True
    return False


def test_random_crop_takes_a_window_of_the_stored_image(tmp_path):
    rng = np.random.default_rng(0)
    stored = rng.integers(0, 256, (40, 48, 3), dtype=np.uint8)
    image = Image.fromarray(stored)
    plain = imagenet_transforms(imagenet_cfg(tmp_path, "data.train_crop=random"), train=True)
    resized = imagenet_transforms(imagenet_cfg(tmp_path, "data.train_crop=random_resized"), train=True)
    torch.manual_seed(0)
    crops = [pixels(plain(image)) for _ in range(3)]
    assert all(c.shape == (32, 32, 3) and is_window(c, stored.astype(np.int64)) for c in crops)
    assert not all(is_window(pixels(resized(image)), stored.astype(np.int64)) for _ in range(3))
    # A side shorter than the crop is enlarged to it, the aspect kept; the crop is still 32 x 32.
    small = Image.fromarray(rng.integers(0, 256, (20, 30, 3), dtype=np.uint8))
    assert plain(small).shape == (3, 32, 32)


@pytest.mark.parametrize("area", [(0.02, 0.25), (0.3, 0.5)])
def test_erasing_after_mixup_erases_within_its_area_bounds(area):
    np.random.seed(1)
    x = torch.ones(64, 3, 32, 32)
    erased = erase_batch(x, 1.0, area)
    share = (erased[:, 0] == 0).float().mean(dim=(1, 2))
    rounding = 2 * 33 / (32 * 32)  # a side rounded to whole pixels, then clipped to the image
    assert bool((share > 0).all())
    assert float(share.min()) >= area[0] - rounding and float(share.max()) <= area[1] + rounding
    assert bool((erased[:, 0] == erased[:, 2]).all())  # the same rectangle in every channel
    assert torch.equal(erase_batch(x, 0.0, area), x)  # rate 0: nothing erased


def test_running_mixup_mixes_each_sample_with_the_previous_mixed_batch():
    np.random.seed(2)
    mix = RunningMixup(alpha=0.4, classes=4)
    first = torch.full((6, 1, 2, 2), 1.0)
    x1, t1 = mix(first, torch.zeros(6, dtype=torch.long))
    assert torch.equal(x1, first) and torch.equal(t1[:, 0], torch.ones(6))  # no partner yet
    x2, t2 = mix(torch.full((6, 1, 2, 2), 3.0), torch.full((6,), 1))
    lam = (x2[:, 0, 0, 0] - 1.0) / 2.0  # x2 = λ·3 + (1 − λ)·1
    assert bool((lam >= 0.5).all()) and len(set(lam.tolist())) > 1  # a λ per sample, max(λ, 1 − λ)
    assert torch.allclose(t2[:, 1], lam) and torch.allclose(t2.sum(1), torch.ones(6))
    x3, t3 = mix(torch.full((6, 1, 2, 2), 5.0), torch.full((6,), 2))
    mu = t3[:, 2]
    # The partner is the previous *mixed* batch (running), whose class 0 share carries on.
    assert torch.allclose(x3[:, 0, 0, 0], mu * 5.0 + (1 - mu) * x2[:, 0, 0, 0])
    assert bool((t3[:, 0] > 0).all())
    mix.reset()
    x4, _ = mix(torch.full((6, 1, 2, 2), 7.0), torch.full((6,), 3))
    assert bool((x4 == 7.0).all())  # after a reset (a resume) the first batch has no partner


def test_erasing_area_must_be_an_ordered_pair(tmp_path):
    with pytest.raises(ConfigError, match="data.random_erasing_area"):
        load_config(DEMO, ["data.random_erasing_area=[0.3, 0.1]"])

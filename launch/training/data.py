"""Datasets and loaders: ImageNet (ImageFolder), Fashion-MNIST (Debian IDX files), synthetic."""

from __future__ import annotations

import gzip
import hashlib
import logging
import math
import os
import random
import re
import struct
import zlib
from collections.abc import Callable, Iterator, Sized
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, Sampler, Subset
from torch.utils.data.distributed import DistributedSampler
from torchvision.datasets import ImageFolder

from launch.config.schema import KNOWN_TRAIN_SIZES
from launch.training.models import input_shape

if TYPE_CHECKING:
    from launch.config.load import Config

logger = logging.getLogger("launch.data")

IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
FASHION_MEAN, FASHION_STD = 0.2860, 0.3530


# --------------------------------------------------------------------------------------------------
# Fashion-MNIST
# --------------------------------------------------------------------------------------------------
def read_idx(path: str) -> np.ndarray:
    """Read an IDX file (optionally gzip-compressed) into a numpy array."""
    opener = gzip.open if path.endswith(".gz") else open
    with opener(path, "rb") as fh:
        raw = fh.read()
    zero, dtype_code, ndim = struct.unpack(">HBB", raw[:4])
    if zero != 0 or dtype_code != 0x08:
        raise ValueError(f"{path}: not an unsigned-byte IDX file")
    dims = struct.unpack(">" + "I" * ndim, raw[4 : 4 + 4 * ndim])
    data = np.frombuffer(raw, dtype=np.uint8, offset=4 + 4 * ndim)
    if data.size != int(np.prod(dims)):
        raise ValueError(f"{path}: expected {int(np.prod(dims))} values, found {data.size}")
    return data.reshape(dims)


class FashionMNIST(Dataset):
    """Fashion-MNIST from the IDX files; training images get a random 2-pixel shift and a flip."""

    def __init__(
        self,
        root: str,
        train: bool,
        augment: bool,
        random_erasing: float = 0.0,
        pool: int = 1,
        erasing_area: tuple[float, float] = (0.02, 0.33),
    ):
        prefix = "train" if train else "t10k"
        images = read_idx(os.path.join(root, f"{prefix}-images-idx3-ubyte.gz"))
        labels = read_idx(os.path.join(root, f"{prefix}-labels-idx1-ubyte.gz"))
        x = torch.from_numpy(images.copy()).float().div_(255.0).sub_(FASHION_MEAN).div_(FASHION_STD)
        self.images = x.unsqueeze(1)  # N x 1 x 28 x 28
        if pool > 1:  # N x 1 x 28/pool x 28/pool: cheaper long runs
            self.images = torch.nn.functional.avg_pool2d(self.images, pool)
        self.shift = max(1, 2 // pool)
        self.targets = torch.from_numpy(labels.astype(np.int64))
        self.augment = augment
        self.eraser = None
        if augment and random_erasing > 0:
            from torchvision import transforms

            self.eraser = transforms.RandomErasing(p=random_erasing, scale=erasing_area)

    def __len__(self):
        return len(self.targets)

    def __getitem__(self, i):
        img = self.images[i]
        if self.augment:
            dy, dx = torch.randint(-self.shift, self.shift + 1, (2,)).tolist()
            img = torch.roll(img, shifts=(dy, dx), dims=(1, 2))
            if torch.rand(()) < 0.5:
                img = torch.flip(img, dims=(2,))
            if self.eraser is not None:
                img = self.eraser(img)
        return img, self.targets[i]


# --------------------------------------------------------------------------------------------------
# Synthetic
# --------------------------------------------------------------------------------------------------
class Synthetic(Dataset):
    """Deterministic random images (per index) with labels ``index % classes``: throughput runs."""

    def __init__(self, size: int, shape: tuple[int, int, int], classes: int, seed: int):
        self.size, self.shape, self.classes, self.seed = size, shape, classes, seed

    def __len__(self):
        return self.size

    def __getitem__(self, i):
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + i)
        return torch.randn(self.shape, generator=g), i % self.classes


# --------------------------------------------------------------------------------------------------
# ImageNet
# --------------------------------------------------------------------------------------------------
def imagenet_transforms(cfg: Config, train: bool) -> Callable[[Any], torch.Tensor]:
    from torchvision import transforms as T

    d = cfg.data
    norm = T.Normalize(IMAGENET_MEAN, IMAGENET_STD)
    if train:
        if d.train_crop == "random":
            crop = [EnlargeToAtLeast(d.image_size), T.RandomCrop(d.image_size)]
        else:
            crop = [T.RandomResizedCrop(d.image_size)]
        ops = [*crop, T.RandomHorizontalFlip(), T.ToTensor(), norm]
        if d.random_erasing > 0 and d.random_erasing_order == "before_mixup":
            ops.append(T.RandomErasing(p=d.random_erasing, scale=tuple(d.random_erasing_area)))
        return T.Compose(ops)
    return T.Compose([T.Resize(d.val_resize), T.CenterCrop(d.image_size), T.ToTensor(), norm])


class EnlargeToAtLeast:
    """An image with a side shorter than ``size`` enlarged (aspect kept) so that that side is ``size``;
    others left as stored. The released recipe reads images this way before its random crop, so the crop
    sees the stored resolution (its images: as stored in the ImageNet archive; assumed here)."""

    def __init__(self, size: int):
        self.size = size

    def __call__(self, image: Any) -> Any:
        w, h = image.size
        if min(w, h) >= self.size:
            return image
        scale = self.size / min(w, h)
        return image.resize((max(self.size, math.ceil(w * scale)), max(self.size, math.ceil(h * scale))))


class CheckedImageFolder(ImageFolder):
    """torchvision's ImageFolder whose unreadable images do not crash a loader worker.

    An image that cannot be read or decoded is either replaced by the next readable image of the
    folder (``substitute``: the training set with ``data.skip_unreadable``; a warning names the
    file) or returned as a placeholder of zeros with the marker label ``-(index + 1)``; the
    training loop turns markers into a clean stop on every rank (or, for evaluation with
    ``data.skip_unreadable``, leaves those images out).
    """

    def __init__(
        self,
        root: str,
        transform: Callable[[Any], torch.Tensor],
        shape: tuple[int, int, int],
        substitute: bool,
    ) -> None:
        super().__init__(root, transform=transform)
        self.shape, self.substitute = tuple(shape), substitute

    def __getitem__(self, index):
        try:
            return super().__getitem__(index)
        except Exception as exc:
            if self.substitute:
                logger.warning(
                    "unreadable image skipped (data.skip_unreadable): %s (%s)",
                    self.samples[index][0],
                    _reason(exc),
                )
                for k in range(1, min(len(self.samples), 33)):
                    try:
                        return super().__getitem__((index + k) % len(self.samples))
                    except Exception:
                        continue
            return torch.zeros(self.shape), -(index + 1)


def _reason(exc: BaseException) -> str:
    text = str(exc).splitlines()[0] if str(exc) else ""
    text = re.sub(r"<_io\.\w+ name='[^']*'>|'/[^']*'", "", text).rstrip(" :")  # the path is named already
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


def unreadable_paths(dataset: Dataset, targets: torch.Tensor) -> list[str]:
    """The files behind marker labels (< 0) of a batch, each with the reason it cannot be read."""
    base = dataset
    while isinstance(base, Subset):
        base = base.dataset
    out = []
    for code in targets[targets < 0].tolist():
        path = base.samples[-int(code) - 1][0] if hasattr(base, "samples") else f"sample {-int(code) - 1}"
        out.append(f"{path} ({describe_unreadable(path)})")
    return out


def describe_unreadable(path: str) -> str:
    """Why ``path`` cannot be read as an image (tried again here, in the main process)."""
    try:
        from PIL import Image

        with open(path, "rb") as fh:
            Image.open(fh).convert("RGB")
    except Exception as exc:
        return _reason(exc)
    return "failed in the loader"


def dataset_size(ds: Dataset) -> int:
    """len() of a map-style dataset: every dataset here has one, but torch's Dataset type declares none."""
    if not isinstance(ds, Sized):
        raise TypeError(f"{type(ds).__name__} has no length")
    return len(ds)


def _subset(ds: Dataset, n: int | None) -> Dataset:
    """The first ``n`` of evenly spaced indices (so an ImageFolder subset spans its classes)."""
    if n is None or n >= dataset_size(ds):
        return ds
    idx = np.unique(np.linspace(0, dataset_size(ds) - 1, n).round().astype(np.int64))
    return Subset(ds, idx.tolist())


def build_datasets(cfg: Config) -> tuple[Dataset, Dataset]:
    """Both datasets; a folder or file that cannot be read raises ConfigError naming its key."""
    d = cfg.data
    train: Dataset
    val: Dataset
    if d.dataset == "imagenet":
        shape = (3, d.image_size, d.image_size)
        folders = []
        for key, root, training in (
            ("data.train_dir", d.train_dir, True),
            ("data.val_dir", d.val_dir, False),
        ):
            if root is None:  # check_consistency refuses this before any collective; a direct call may not
                raise cfg.error(key, "must be set for dataset imagenet")
            try:
                folders.append(
                    CheckedImageFolder(
                        root,
                        imagenet_transforms(cfg, training),
                        shape,
                        substitute=training and d.skip_unreadable,
                    )
                )
            except (OSError, RuntimeError) as exc:  # e.g. a class folder without image files
                raise cfg.error(key, f"{root}: {str(exc).splitlines()[0]}") from None
        train_folder, val_folder = folders
        for key, ds in (("data.train_dir", train_folder), ("data.val_dir", val_folder)):
            if len(ds.classes) > cfg.model.num_classes:
                raise cfg.error(
                    key, f"{len(ds.classes)} class folders but model.num_classes is {cfg.model.num_classes}"
                )
        if val_folder.classes != train_folder.classes:
            raise cfg.error(
                "data.val_dir",
                f"class folders differ from data.train_dir's "
                f"({len(val_folder.classes)} vs {len(train_folder.classes)})",
            )
        train, val = train_folder, val_folder
    elif d.dataset == "fashion_mnist":
        try:
            erasing = d.random_erasing if d.random_erasing_order == "before_mixup" else 0.0
            area = (d.random_erasing_area[0], d.random_erasing_area[1])
            train = FashionMNIST(d.fashion_mnist_dir, True, True, erasing, d.fashion_mnist_pool, area)
            val = FashionMNIST(d.fashion_mnist_dir, False, False, pool=d.fashion_mnist_pool)
        except (OSError, EOFError, ValueError, zlib.error, struct.error) as exc:
            raise cfg.error("data.fashion_mnist_dir", f"cannot read the IDX files: {_reason(exc)}") from None
    else:
        shape = input_shape(cfg)
        train = Synthetic(d.synthetic_size, shape, cfg.model.num_classes, cfg.train.seed)
        val = Synthetic(d.synthetic_val_size, shape, cfg.model.num_classes, cfg.train.seed + 1)
    return _subset(train, d.train_subset), _subset(val, d.val_subset)


def dataset_identity(cfg: Config, train: Dataset, val: Dataset) -> dict[str, Any]:
    """What the ranks must agree on about the data they read (paths aside): the kind, the sizes, a hash of
    the class names (ImageFolder) and the synthetic seed."""

    def classes_hash(ds: Dataset) -> str | None:
        while isinstance(ds, Subset):
            ds = ds.dataset
        names = getattr(ds, "classes", None)  # an ImageFolder's class folders
        if not isinstance(names, (list, tuple)):
            return None
        return hashlib.sha256("\n".join(names).encode()).hexdigest()[:16]

    identity = {
        "kind": cfg.data.dataset,
        "train_images": dataset_size(train),
        "val_images": dataset_size(val),
        "train_classes": classes_hash(train),
        "val_classes": classes_hash(val),
    }
    if cfg.data.dataset == "synthetic":
        identity["synthetic_seed"] = cfg.train.seed
    return identity


def train_size(cfg: Config) -> int:
    """Training-set size without reading the data when it is known (dry run)."""
    d = cfg.data
    if d.train_samples is not None:
        n = d.train_samples
    elif d.dataset == "synthetic":
        n = d.synthetic_size
    else:
        n = KNOWN_TRAIN_SIZES[d.dataset]
    return min(n, d.train_subset) if d.train_subset else n


# --------------------------------------------------------------------------------------------------
# Samplers and loaders
# --------------------------------------------------------------------------------------------------
class ResumableDistributedSampler(DistributedSampler):
    """DistributedSampler that can start an epoch after its first ``skip`` samples (mid-epoch resume)."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.skip = 0

    def set_skip(self, samples: int) -> None:
        self.skip = samples

    def __iter__(self) -> Iterator[int]:
        indices = list(super().__iter__())
        return iter(indices[self.skip :])

    def __len__(self) -> int:
        return self.num_samples - self.skip


class ShardSampler(Sampler):
    """Every ``size``-th index starting at ``rank``: no padding, so the union over ranks is exact."""

    def __init__(self, n: int, rank: int, size: int):
        self.indices = list(range(rank, n, size))

    def __iter__(self):
        return iter(self.indices)

    def __len__(self):
        return len(self.indices)


def steps_per_epoch(n: int, world_size: int, batch: int, drop_last: bool) -> int:
    per_rank = math.ceil(n / world_size)
    return per_rank // batch if drop_last else math.ceil(per_rank / batch)


def build_loaders(
    cfg: Config, train_ds: Dataset, val_ds: Dataset, rank: int, size: int, use_cuda: bool
) -> tuple[DataLoader, DataLoader, ResumableDistributedSampler]:
    d = cfg.data
    sampler = ResumableDistributedSampler(
        train_ds, num_replicas=size, rank=rank, shuffle=True, seed=cfg.train.seed, drop_last=False
    )
    common: dict[str, Any] = dict(
        num_workers=d.workers, pin_memory=d.pin_memory and use_cuda, persistent_workers=d.workers > 0
    )
    if d.workers > 0:
        # Reproducible worker RNG: each worker derives its seed from torch's base seed (per rank).
        common["worker_init_fn"] = _worker_init
    # Own generators: creating a loader iterator draws the workers' base seed from the loader's
    # generator instead of the global RNG, so the global stream (augmentation with workers=0, mixup)
    # depends only on the steps taken, and a resumed run continues it exactly.
    train = DataLoader(
        train_ds,
        batch_size=d.batch_size,
        sampler=sampler,
        drop_last=d.drop_last,
        generator=torch.Generator(),
        **common,
    )
    val = DataLoader(
        val_ds,
        batch_size=d.val_batch_size,
        sampler=ShardSampler(dataset_size(val_ds), rank, size),
        generator=torch.Generator().manual_seed(cfg.train.seed),
        **common,
    )
    return train, val, sampler


def start_epoch(
    loader: DataLoader,
    sampler: ResumableDistributedSampler,
    seed: int,
    rank: int,
    epoch: int,
    skip_batches: int,
    batch_size: int,
) -> None:
    """Shuffle for ``epoch``, skip the batches already done, and seed the workers for (rank, epoch)."""
    sampler.set_epoch(epoch)
    sampler.set_skip(skip_batches * batch_size)
    loader.generator.manual_seed((seed * 1_000_003 + rank * 10_007 + epoch) % 2**63)


def _worker_init(worker_id: int) -> None:
    seed = torch.initial_seed() % 2**32
    np.random.seed(seed)
    random.seed(seed)

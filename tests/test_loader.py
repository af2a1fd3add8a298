"""Tests for vit.loader: global batches shared among processes, keyed augmentation, shards."""

from __future__ import annotations

import albumentations as A
import numpy as np
import pytest
import torch
from albumentations.pytorch import ToTensorV2

from vit.build import train_dataset
from vit.config import AugConfig, Config
from vit.data import ArraySource
from vit.loader import (
    AugmentedDataset,
    TrainBatchSampler,
    eval_loader,
    shard_indices,
    train_loader,
)
from vit.transforms import BatchNormalize, train_transform


def indices(batches) -> list[list[int]]:
    """Sample indices of each batch (the keys are (epoch, index))."""
    return [[index for _, index in b] for b in batches]


def test_epoch_is_a_permutation_and_epochs_differ():
    sampler = TrainBatchSampler(50, batch_size=8, seed=3)
    assert len(sampler) == 6  # 50 // 8; the incomplete last batch is dropped
    first = indices(sampler)
    flat = sum(first, [])
    assert len(flat) == 48 and len(set(flat)) == 48 and set(flat) <= set(range(50))
    assert all(epoch == 0 for b in sampler for epoch, _ in b)
    sampler.set_epoch(1)
    second = list(sampler)
    assert all(epoch == 1 for b in second for epoch, _ in b)
    assert indices(second) != first
    sampler.set_epoch(0)
    assert indices(sampler) == first  # a function of (seed, epoch) only


@pytest.mark.parametrize("epoch", [0, 4])
def test_two_ranks_share_the_global_batch(epoch):
    n, per_rank = 103, 6
    one = TrainBatchSampler(n, batch_size=2 * per_rank, seed=7)
    ranks = [TrainBatchSampler(n, per_rank, seed=7, rank=r, world_size=2) for r in (0, 1)]
    for s in (one, *ranks):
        s.set_epoch(epoch)
    assert len(one) == len(ranks[0]) == len(ranks[1]) == 103 // 12
    for b, (whole, r0, r1) in enumerate(zip(list(one), *ranks)):
        assert len(r0) == len(r1) == per_rank
        assert r0 + r1 == whole, f"batch {b}"  # rank 0 holds the first half, in order


def test_start_batch_resumes_mid_epoch():
    sampler = TrainBatchSampler(40, batch_size=4, seed=1)
    sampler.set_epoch(2)
    full = list(sampler)
    sampler.set_epoch(2, start_batch=3)
    assert list(sampler) == full[3:]
    sampler.set_epoch(2, start_batch=len(sampler))
    assert list(sampler) == []


def test_too_few_samples_for_one_global_batch():
    with pytest.raises(ValueError, match=r"10 training samples .* 8 x 2 processes"):
        TrainBatchSampler(10, batch_size=8, seed=0, world_size=2)


@pytest.mark.parametrize("n, world", [(11, 2), (7, 3), (2, 4), (1, 1)])
def test_shards_cover_each_sample_once(n, world):
    shards = [shard_indices(n, r, world) for r in range(world)]
    flat = sorted(sum(shards, []))
    assert flat == list(range(n))
    assert max(map(len, shards)) - min(map(len, shards)) <= 1


def noisy_source(n: int = 12, channels: int = 3) -> ArraySource:
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (n, 20, 20, channels), dtype=np.uint8)
    return ArraySource(images, np.arange(n) % 3, ["a", "b", "c"])


def heavy_augmentation() -> AugConfig:
    return AugConfig(
        crop="random_resized",
        scale=(0.3, 1.0),
        color_jitter=0.4,
        randaugment_ops=2,
        random_erasing=0.5,
    )


def augmented(seed: int = 0) -> AugmentedDataset:
    tf = train_transform(heavy_augmentation(), (16, 16), (0.5,) * 3, (0.25,) * 3)
    return AugmentedDataset(noisy_source(), tf, seed=seed)


def test_augmentation_is_a_function_of_its_key():
    ds = augmented()
    x, label = ds[(3, 5)]
    assert x.shape == (3, 16, 16) and x.dtype == torch.float32 and label == 5 % 3
    ds[(0, 1)]  # another sample in between changes nothing
    assert torch.equal(ds[(3, 5)][0], x)
    assert torch.equal(augmented()[(3, 5)][0], x)  # a fresh dataset, same key
    assert not torch.equal(ds[(4, 5)][0], x)  # next epoch: a new draw
    assert not torch.equal(augmented(seed=1)[(3, 5)][0], x)  # another run seed
    assert not torch.equal(ds[(3, 6)][0][:, :4], ds[(3, 5)][0][:, :4])


def test_augmentation_ignores_global_rngs():
    ds = augmented()
    x = ds[(1, 2)][0]
    torch.manual_seed(123)
    np.random.seed(123)
    assert torch.equal(ds[(1, 2)][0], x)


def test_loader_batches_same_with_and_without_workers():
    ds = augmented()
    kw = dict(batch_size=4, seed=5, rank=0, world_size=1)
    plain = [x for x, _ in train_loader(ds, num_workers=0, **kw)]
    workers = [x for x, _ in train_loader(ds, num_workers=2, **kw)]
    assert len(plain) == 3
    assert all(torch.equal(a, b) for a, b in zip(plain, workers))


def test_loaders_leave_the_global_generator_alone():
    # a resumed run makes one more iter(loader) than an uninterrupted one: if that drew from
    # the global generator, every later dropout mask would differ
    ds = augmented()
    torch.manual_seed(0)
    expected = torch.rand(3)
    torch.manual_seed(0)
    iter(train_loader(ds, 4, 5, 0, 1, 0))
    iter(eval_loader(ds, 4, 0, 1, 0))
    assert torch.equal(torch.rand(3), expected)


def test_eval_loader_shards_under_two_processes():
    n = 11
    images = np.zeros((n, 4, 4, 1), np.uint8)
    source = ArraySource(images, np.arange(n), [str(i) for i in range(n)])  # label = index
    ds = AugmentedDataset(source, _Identity())
    seen = []
    for rank in (0, 1):
        for _, labels in eval_loader(ds, batch_size=4, rank=rank, world_size=2, num_workers=0):
            seen += labels.tolist()
    assert sorted(seen) == list(range(n))


class _Identity:
    """A transform that turns the image into a tensor and draws nothing."""

    def set_random_state(self, *args) -> None:
        pass

    def __call__(self, image: np.ndarray) -> dict:
        return {"image": torch.from_numpy(image.copy())}


# -- normalisation by batch -------------------------------------------------------------------


@pytest.mark.parametrize("channels", [1, 3])
def test_batch_normalize_equals_albumentations_per_image(channels):
    images = np.random.default_rng(1).integers(0, 256, (5, 7, 9, channels), dtype=np.uint8)
    mean, std = (0.2, 0.5, 0.7)[:channels], (0.3, 0.25, 0.4)[:channels]
    per_image = A.Compose([A.Normalize(mean=mean, std=std, max_pixel_value=255.0), ToTensorV2()])
    x, y = BatchNormalize(mean, std)([(im, k) for k, im in enumerate(images)])
    want = torch.stack([per_image(image=im)["image"] for im in images])
    assert x.shape == (5, channels, 7, 9) and x.dtype == torch.float32 and x.is_contiguous()
    torch.testing.assert_close(x, want, rtol=0, atol=1e-5)
    assert y.tolist() == [0, 1, 2, 3, 4]


@pytest.mark.parametrize("channels", [1, 3])
def test_training_batches_equal_the_per_image_pipeline(channels):
    # the training set stops each image at uint8 and normalises the batch: the same batches
    # as the whole albumentations pipeline image by image, augmentation draws included
    jitter = 0.4 if channels == 3 else 0.0
    cfg = Config(aug=AugConfig(crop="pad_crop", pad=3, hflip=0.5, color_jitter=jitter))
    mean, std = (0.5, 0.4, 0.3)[:channels], (0.25, 0.2, 0.3)[:channels]
    source = noisy_source(channels=channels)
    fast = train_dataset(source, cfg, (16, 16), mean, std)
    assert isinstance(fast.collate, BatchNormalize)
    slow = AugmentedDataset(source, train_transform(cfg.aug, (16, 16), mean, std))
    kw = dict(batch_size=4, seed=5, rank=0, world_size=1, num_workers=0)
    pairs = list(zip(train_loader(fast, **kw), train_loader(slow, **kw)))
    assert len(pairs) == 3
    for (x, y), (want_x, want_y) in pairs:
        assert x.shape == (4, channels, 16, 16)
        torch.testing.assert_close(x, want_x, rtol=0, atol=1e-5)
        assert torch.equal(y, want_y) and y.dtype == torch.long


def test_random_erasing_keeps_normalising_each_image():
    cfg = Config(aug=AugConfig(random_erasing=0.5))
    dataset = train_dataset(noisy_source(), cfg, (16, 16), (0.5,) * 3, (0.25,) * 3)
    assert dataset.collate is None
    assert dataset[(0, 1)][0].dtype == torch.float32
    with pytest.raises(ValueError, match="random erasing"):
        train_transform(cfg.aug, (16, 16), (0.5,) * 3, (0.25,) * 3, normalize=False)

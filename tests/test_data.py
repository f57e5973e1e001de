"""Feeding: D4 augmentation, balanced / shuffled rank-sharded sampling, worker and evaluation feeds
on real Zarr stores (local and on moto's S3)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from lensray.config import TrainConfig
from lensray.ingest.store import SPLITS, create_store, finalize_store, shard_ranges, write_shard
from lensray.train.feed import (
    BalancedBatchSampler,
    EvalFeed,
    FeedError,
    ShuffledBatchSampler,
    WorkerFeed,
    augment,
    balanced_subset,
    choose_feed,
    d4_transform,
    per_worker_batch_size,
    random_d4,
    random_flips,
    sanity_set,
    shard_bounds,
)

SIDE = 8


def _images_encoding_rows(n: int, channels: int = 2) -> np.ndarray:
    """Row r's image is r plus a zero-mean pattern without symmetry: a D4 image of it still says r."""
    pattern = np.random.default_rng(0).permutation(channels * SIDE * SIDE).reshape(channels, SIDE, SIDE)
    pattern = (pattern - pattern.mean()) / pattern.size  # |values| < 0.5, exact in float16 near small r
    return (np.arange(n)[:, None, None, None] + pattern[None]).astype(np.float32)


def _row_of(images: torch.Tensor) -> np.ndarray:
    return images.double().mean(dim=(1, 2, 3)).round().long().numpy()


def make_store(url: str, labels: np.ndarray, split: np.ndarray, shard_size: int = 16) -> np.ndarray:
    """A finalized store whose row r holds ``_images_encoding_rows`` image r; returns the images."""
    n = len(labels)
    images = _images_encoding_rows(n)
    create_store(
        url,
        ids=np.arange(300001, 300001 + n),
        labels=labels,
        split=split,
        channels=images.shape[1],
        size=SIDE,
        dtype="float16",
        shard_size=shard_size,
        meta={"preprocess": {"mode": "test"}, "label_rule": "paper", "bands": ["VIS", "Y"], "source": "test"},
    )
    for index, (start, stop) in enumerate(shard_ranges(n, shard_size)):
        write_shard(url, index, images[start:stop], np.ones(stop - start, bool), [])
    finalize_store(url)
    return images


@pytest.fixture()
def store_url(tmp_path: Path) -> str:
    rng = np.random.default_rng(3)
    n = 120
    labels = (rng.random(n) < 0.3).astype(np.int8)  # imbalanced, like real data
    split = rng.choice([SPLITS["train"], SPLITS["val"], SPLITS["test"]], n, p=[0.6, 0.25, 0.15]).astype(np.int8)
    url = str(tmp_path / "store")
    make_store(url, labels, split)
    return url


# --- D4 ----------------------------------------------------------------------------------------


def test_d4_elements_permute_pixels_and_are_distinct() -> None:
    x = np.arange(3 * 5 * 5, dtype=np.float32).reshape(1, 3, 5, 5)  # every pixel distinct
    outputs = [d4_transform(x, k) for k in range(8)]
    for k, y in enumerate(outputs):
        assert y.shape == x.shape
        # A permutation of pixels within each channel: the same values, nothing lost or invented.
        for c in range(3):
            assert np.array_equal(np.sort(y[0, c].ravel()), np.sort(x[0, c].ravel())), k
        # torch and numpy agree element by element.
        assert np.array_equal(d4_transform(torch.from_numpy(x), k).numpy(), y)
    assert len({y.tobytes() for y in outputs}) == 8
    assert np.array_equal(outputs[0], x)
    # Group structure: quarter turns compose; reflections are involutions.
    assert np.array_equal(d4_transform(d4_transform(x, 1), 1), outputs[2])
    for k in range(4, 8):
        assert np.array_equal(d4_transform(outputs[k], k), x)
    with pytest.raises(ValueError, match="0..7"):
        d4_transform(x, 8)


def test_random_d4_applies_one_element_per_sample_deterministically() -> None:
    x = torch.arange(64 * 1 * 4 * 4, dtype=torch.float32).reshape(64, 1, 4, 4)
    y = random_d4(x, torch.Generator().manual_seed(5))
    seen = set()
    for i in range(64):
        matches = [k for k in range(8) if torch.equal(y[i], d4_transform(x[i], k))]
        assert len(matches) == 1
        seen.add(matches[0])
    assert seen == set(range(8))  # 64 draws: every element appears
    assert torch.equal(y, random_d4(x, torch.Generator().manual_seed(5)))
    with pytest.raises(ValueError, match="square"):
        random_d4(torch.zeros(2, 1, 4, 6), torch.Generator())


def test_random_flips_never_rotate_and_work_on_any_shape() -> None:
    x = torch.arange(40 * 1 * 3 * 5, dtype=torch.float32).reshape(40, 1, 3, 5)
    y = random_flips(x, torch.Generator().manual_seed(1))
    flips = {
        "none": lambda a: a,
        "lr": lambda a: a.flip(-1),
        "ud": lambda a: a.flip(-2),
        "both": lambda a: a.flip(-1, -2),
    }
    kinds = [next(name for name, f in flips.items() if torch.equal(y[i], f(x[i]))) for i in range(40)]
    assert set(kinds) == set(flips)
    assert augment(x, "none", torch.Generator()) is x


# --- samplers ----------------------------------------------------------------------------------


def test_shard_bounds_and_per_worker_batch() -> None:
    assert shard_bounds(10, 3).tolist() == [0, 3, 6, 10]
    assert per_worker_batch_size(32, 4) == 8
    with pytest.raises(FeedError, match="multiple of 3"):
        per_worker_batch_size(32, 3)


def test_balanced_batches_are_exactly_half_lenses_and_ranks_are_disjoint() -> None:
    labels = (np.random.default_rng(0).random(400) < 0.1).astype(np.int8)  # 10 % lenses
    streams = []
    for rank in range(2):
        sampler = BalancedBatchSampler(labels, batch_size=16, steps=25, seed=7, rank=rank, world_size=2)
        assert len(sampler) == 25
        batches = list(sampler)
        assert len(batches) == 25
        for batch in batches:
            assert len(batch) == 16 and labels[batch].sum() == 8
            assert np.all((batch >= rank * 200) & (batch < (rank + 1) * 200))  # this rank's share only
        streams.append(np.concatenate(batches))
        assert np.array_equal(np.concatenate(list(sampler)), streams[-1])  # deterministic
        sampler.set_epoch(1)
        assert not np.array_equal(np.concatenate(list(sampler)), streams[-1])  # a new epoch, new draws
    assert not set(streams[0]) & set(streams[1])
    # With replacement: 200 lens draws from rank 0's ~20 lenses repeat some.
    assert len(np.unique(streams[0])) < len(streams[0])


def test_balanced_odd_batch_alternates_the_extra_sample() -> None:
    labels = np.array([0, 1] * 20, dtype=np.int8)
    counts = [int(labels[b].sum()) for b in BalancedBatchSampler(labels, batch_size=5, steps=6, seed=0)]
    assert counts == [2, 3, 2, 3, 2, 3]


def test_balanced_sampler_needs_both_classes_in_each_share() -> None:
    labels = np.array([1] * 10 + [0] * 10, dtype=np.int8)
    with pytest.raises(FeedError, match="rank 0 of 2.*10 lenses and 0 non-lenses"):
        BalancedBatchSampler(labels, batch_size=4, steps=1, seed=0, rank=0, world_size=2)


def test_shuffled_sampler_passes_over_each_share_once_per_pass() -> None:
    labels = np.zeros(103, dtype=np.int8)
    seen = []
    for rank in range(2):
        sampler = ShuffledBatchSampler(labels, batch_size=10, steps=5, seed=1, rank=rank, world_size=2)
        batches = np.concatenate(list(sampler))
        share = set(range(*shard_bounds(103, 2)[rank : rank + 2]))
        assert len(batches) == 50 and len(set(batches)) == 50 and set(batches) <= share
        seen.append(set(batches))
        # More steps than a pass: a second permutation follows.
        longer = list(ShuffledBatchSampler(labels, batch_size=10, steps=8, seed=1, rank=rank, world_size=2))
        assert np.array_equal(np.concatenate(longer[:5]), batches)
        assert set(np.concatenate(longer[5:])) <= share
    assert not seen[0] & seen[1]


# --- feeds on a real store ---------------------------------------------------------------------


def test_worker_feed_batches_match_the_store(store_url: str) -> None:
    from lensray.ingest.store import LensStore

    store = LensStore.open(store_url)
    train_rows = store.indices("train")
    config = TrainConfig(batch_size=16, steps_per_epoch=6, augment="d4", feed="ram", seed=4)
    for rank in range(2):
        feed = WorkerFeed(store_url, config, rank=rank, world_size=2)
        assert feed.mode == "ram" and len(feed) == 6
        for images, labels in feed:
            assert images.dtype == torch.float32 and images.shape == (8, 2, SIDE, SIDE)
            rows = _row_of(images)
            assert set(rows) <= set(train_rows)  # only training rows
            assert np.array_equal(labels.numpy(), store.labels[rows])  # labels travel with their images
            assert labels.sum() == 4


def test_ram_and_stream_feeds_give_identical_batches(store_url: str) -> None:
    batches = {}
    for mode in ("ram", "stream"):
        config = TrainConfig(batch_size=8, steps_per_epoch=5, augment="d4", feed=mode, seed=2)
        feed = WorkerFeed(store_url, config, rank=1, world_size=2, batch_size=6)
        feed.set_epoch(3)
        batches[mode] = list(feed)
    assert len(batches["ram"]) == 5
    for (x_ram, y_ram), (x_stream, y_stream) in zip(batches["ram"], batches["stream"], strict=True):
        assert torch.equal(x_ram, x_stream) and torch.equal(y_ram, y_stream)


def test_worker_feeds_of_two_ranks_use_disjoint_rows(store_url: str) -> None:
    from lensray.ingest.store import LensStore

    n_train = len(LensStore.open(store_url).indices("train"))
    rows = []
    for rank in range(2):
        config = TrainConfig(batch_size=8, augment="none", balanced=False, feed="ram")
        feed = WorkerFeed(store_url, config, rank=rank, world_size=2)
        # Global batch 8 over 2 workers; one epoch is a pass over the smaller share.
        assert feed.batch_size == 4 and len(feed) == (n_train // 2) // 4
        batch_rows = [_row_of(images) for images, _ in feed]
        assert len(batch_rows) == len(feed)
        rows.append({int(r) for batch in batch_rows for r in batch})
        assert len(rows[-1]) == 4 * len(feed)  # a pass: no row twice
    assert not rows[0] & rows[1]


def test_eval_feed_shards_cover_the_split_exactly_once(store_url: str) -> None:
    from lensray.ingest.store import LensStore

    store = LensStore.open(store_url)
    val_rows = store.indices("val")
    gathered_rows, gathered_labels = [], []
    for rank in range(2):
        feed = EvalFeed(store_url, rank=rank, world_size=2, batch_size=4, feed="ram")
        for images, labels in feed:
            gathered_rows.append(_row_of(images))
            gathered_labels.append(labels.numpy())
        assert np.array_equal(store.ids[feed.rows], feed.ids)
    rows = np.concatenate(gathered_rows)
    assert np.array_equal(rows, val_rows)  # every val row once, in order, no padding
    assert np.array_equal(np.concatenate(gathered_labels), store.labels[val_rows])


def test_eval_feed_balanced_subset_is_fixed(store_url: str) -> None:
    first = EvalFeed(store_url, subset=10, seed=1, feed="stream")
    again = EvalFeed(store_url, subset=10, seed=1, feed="ram")
    assert len(first.rows) == 10 and first.labels.sum() == 5
    assert np.array_equal(first.rows, again.rows)
    for (x1, _), (x2, _) in zip(first, again, strict=True):
        assert torch.equal(x1, x2)
    with pytest.raises(FeedError, match="needs 50 lenses"):
        balanced_subset(np.array([0] * 60 + [1] * 10), 100, seed=0)


def test_choose_feed() -> None:
    assert choose_feed("auto", 100, available=1000) == "ram"
    assert choose_feed("auto", 100, local_world_size=8, available=1000) == "stream"  # 8 workers, one node
    assert choose_feed("stream", 1, available=10**12) == "stream"
    with pytest.raises(ValueError, match="unknown feed"):
        choose_feed("disk", 1)


def test_stream_feed_from_s3(s3_bucket: str) -> None:
    labels = np.array([0, 1] * 20, dtype=np.int8)
    url = f"{s3_bucket}/store"
    make_store(url, labels, np.zeros(40, dtype=np.int8), shard_size=8)
    config = TrainConfig(batch_size=6, steps_per_epoch=3, augment="flips", feed="stream")
    feed = WorkerFeed(url, config)
    batches = list(feed)
    assert len(batches) == 3
    for images, batch_labels in batches:
        assert np.array_equal(batch_labels.numpy(), labels[_row_of(images)])


def test_sanity_set_is_fixed_balanced_and_from_the_split(store_url: str) -> None:
    from lensray.ingest.store import LensStore

    store = LensStore.open(store_url)
    images, labels = sanity_set(store_url, 12, seed=3)
    rows = _row_of(torch.from_numpy(images))
    assert images.dtype == np.float32 and labels.sum() == 6
    assert set(rows) <= set(store.indices("train")) and np.array_equal(labels, store.labels[rows])
    again, _ = sanity_set(store_url, 12, seed=3)
    assert np.array_equal(images, again)

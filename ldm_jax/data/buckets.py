"""Aspect-ratio buckets (SDXL / NovelAI style): every image is trained at one of a few fixed
(height, width) shapes, the one whose aspect ratio is nearest its own, so non-square images are
cropped little and the train step compiles once per shape.

config.data.buckets: a list of (h, w) pairs, or config.data.bucket_area > 0 to generate them like
SDXL's 1024² buckets: for h in steps of bucket_step, w = the largest multiple of bucket_step with
h·w <= bucket_area, kept while max(h, w) / min(h, w) <= bucket_max_aspect.

The batch plan (`epoch_batches`) is a pure function of (seed, epoch): each bucket's examples are
shuffled, cut into global batches (a bucket's remainder waits for the next epoch's shuffle), and
the batches of all buckets are shuffled together. Global batch s is therefore fixed by s alone, so
the grain iterator's state (the next batch index) also fixes the bucket: resume is exact.
"""

from collections.abc import Sequence

import numpy as np

from ldm_jax.data.errors import DataError


def generate_buckets(area: int, step: int = 64, max_aspect: float = 4.0) -> tuple:
    """SDXL-style (h, w) buckets of about `area` pixels in multiples of `step`."""
    if not isinstance(area, int) or not isinstance(step, int) or step < 1 or area < step * step:
        raise DataError(
            f"data.bucket_area={area!r} must be an integer >= bucket_step² (bucket_step={step!r}, "
            "a positive integer)"
        )
    if not max_aspect >= 1.0:
        raise DataError(f"data.bucket_max_aspect must be >= 1, got {max_aspect!r}")
    buckets = []
    for h in range(step, area // step + 1, step):
        w = (area // h) // step * step
        if w >= step and max(h, w) / min(h, w) <= max_aspect:
            buckets.append((h, w))
    if not buckets:
        raise DataError(f"no bucket of area {area}, step {step} within aspect {max_aspect}")
    return tuple(sorted(set(buckets)))


def resolve_buckets(listed, area, step=64, max_aspect=4.0, multiple: int = 1) -> tuple | None:
    """The checked buckets of a data config (data.buckets, or generated from data.bucket_area),
    or None when neither is set (square crops of data.image_size)."""
    if listed is not None and area:
        raise DataError("set data.buckets or data.bucket_area, not both")
    if area:
        listed = generate_buckets(area, step, float(max_aspect))
    if listed is None:
        return None
    return check_buckets(listed, multiple)


def check_buckets(buckets, multiple: int = 1) -> tuple:
    """The buckets as a tuple of int (h, w) pairs; DataError for an empty list, a malformed pair,
    duplicates, or sides that are not multiples of `multiple` (the model's: the VAE factor times
    2^(UNet levels - 1), so every level's feature map has whole pixels)."""
    if buckets is None or len(buckets) == 0:
        raise DataError("data.buckets is empty; give (height, width) pairs or leave it unset")
    out = []
    for pair in buckets:
        if (
            not isinstance(pair, Sequence) or len(pair) != 2
            or any(isinstance(v, bool) or not isinstance(v, int | np.integer) or v < 1
                   for v in pair)
        ):  # fmt: skip
            raise DataError(f"data.buckets entry {pair!r} is not a (height, width) pair of ints")
        out.append((int(pair[0]), int(pair[1])))
    bad = [b for b in out if b[0] % multiple or b[1] % multiple]
    if bad:
        raise DataError(
            f"data.buckets {bad} are not multiples of {multiple} (the VAE's downsampling factor "
            "x 2^(UNet levels - 1)); round each side to a multiple of it"
        )
    if len(set(out)) != len(out):
        raise DataError(f"data.buckets has duplicates: {out}")
    return tuple(out)


def assign_buckets(sizes_N2: np.ndarray, buckets, max_crop: float) -> np.ndarray:
    """Each image's bucket index: the nearest aspect ratio (in log space). DataError naming the
    first image whose cover-resize into its bucket would crop away more than `max_crop` of it."""
    sizes_N2 = np.asarray(sizes_N2, np.float64).reshape(-1, 2)
    log_ar_N = np.log(sizes_N2[:, 0] / sizes_N2[:, 1])
    log_ar_K = np.log(np.array([h / w for h, w in buckets]))
    distance_NK = np.abs(log_ar_N[:, None] - log_ar_K[None])
    index_N = np.argmin(distance_NK, axis=1)
    kept_N = np.exp(-distance_NK[np.arange(len(index_N)), index_N])  # kept area fraction
    too_much = np.flatnonzero(kept_N < 1.0 - max_crop)
    if too_much.size:
        i = int(too_much[0])
        h, w = (int(v) for v in sizes_N2[i])
        raise DataError(
            f"image {i} ({h}x{w}, and {too_much.size - 1} more) fits no bucket: the nearest, "
            f"{buckets[index_N[i]]}, would crop away {1 - kept_N[i]:.0%} of it (more than "
            f"data.bucket_max_crop={max_crop}); add a bucket of its aspect ratio or drop it"
        )
    return index_N.astype(np.int32)


def epoch_batches(bucket_of_N: np.ndarray, num_buckets: int, batch_size: int, seed: int,
                  epoch: int, *, shuffle: bool = True) -> list[np.ndarray]:
    """The global batches of one epoch: arrays of example indices, each from one bucket
    (shuffle=False: in dataset order, bucket after bucket)."""
    rng = np.random.default_rng([int(seed), int(epoch), 0x6275636B])  # "buck"
    batches = []
    for k in range(num_buckets):
        members = np.flatnonzero(bucket_of_N == k)
        if shuffle:
            members = members[rng.permutation(len(members))]
        full = len(members) // batch_size * batch_size
        batches.extend(members[:full].reshape(-1, batch_size))
    order = rng.permutation(len(batches)) if shuffle else range(len(batches))
    return [batches[i] for i in order]


def batches_per_epoch(bucket_of_N: np.ndarray, num_buckets: int, batch_size: int) -> int:
    counts = np.bincount(bucket_of_N, minlength=num_buckets)
    total = int(np.sum(counts // batch_size))
    if total == 0:
        raise DataError(
            f"no bucket holds a whole global batch of {batch_size} images (images per bucket: "
            f"{counts.tolist()}); use fewer buckets or a smaller batch"
        )
    return total


def cover_size(height: int, width: int, bucket) -> tuple[int, int]:
    """The (h, w) of the smallest aspect-keeping resize of an image that covers `bucket`."""
    bh, bw = bucket
    scale = max(bh / height, bw / width)
    return max(bh, round(height * scale)), max(bw, round(width * scale))

"""DreamBooth's input (Ruiz et al., "DreamBooth: Fine Tuning Text-to-Image Diffusion Models for
Subject-Driven Generation", CVPR 2023) with prior preservation, as diffusers'
examples/dreambooth/train_dreambooth.py feeds it: a few images of one subject, all captioned with
one prompt naming it by a rare token ("a photo of sks dog"), and, for prior preservation, images
of its class ("a photo of dog") that the frozen model generated before training. The train step
computes

    L = mean ‖ε − εθ(z_t, t, τθ(instance_prompt))‖²
        + prior_loss_weight · mean ‖ε′ − εθ(z′_t′, t′, τθ(class_prompt))‖²

over the two halves of every batch, which therefore have the same batch size B.

config.data keys (defaults in ldm_jax/data/loader.py; `check_dreambooth_config` checks them):

| key               | default | meaning                                                            |
|-------------------|---------|--------------------------------------------------------------------|
| source            | "tfds"  | "dreambooth" selects this input (the LDM task calls               |
|                   |         | `dreambooth_batches`)                                              |
| instance_dir      | ""      | folder of the subject's images (required)                          |
| instance_prompt   | ""      | every instance image's caption (required, non-empty)               |
| class_dir         | ""      | folder of class images; "" = no prior preservation                 |
| class_prompt      | ""      | every class image's caption (required when class_dir is set)       |
| num_class_images  | 100     | class images used: the first num_class_images of class_dir, which  |
|                   |         | `ensure_class_images` tops up to it; 0 = every image there         |
| prior_loss_weight | 1.0     | the class half's weight in the loss (>= 0; read by the step)       |

The augmentation keys (image_size, min_scale, max_scale, crop, flip) and the loader's (shuffle,
shuffle_seed, num_threads, prefetch_batches, num_workers) apply to both halves. Aspect-ratio
buckets (data.buckets / data.bucket_area) are not supported: the two halves would draw different
bucket shapes; DreamBooth trains square image_size crops. data.label_key must be empty.

Images are the files directly in a folder (not its subfolders, not hidden files) whose name ends
in one of image_folder's IMAGE_SUFFIXES (.png .jpg .jpeg .webp .bmp, any case), sorted by name,
decoded once into memory as uint8 RGB (EXIF rotation applied, alpha dropped): DreamBooth's
folders are small (diffusers' default is 100 class images).

Batches: the loader's batch of the instance half ({"image" f32 [B, S, S, 3] in [-1, 1], "tokens"
i32 [B, T] or [B, E, T] (SDXL), with micro_conditioning "original_size" / "crop_top_left" i32
[B, 2]}) and, with prior preservation, the class half's batch with every key prefixed "prior_"
("prior_image", "prior_tokens", ...). Each half is its own `make_train_dataset` stream (its own
shuffle and augmentation seed, the class seed derived from the run's), so each is split over
hosts and resumes exactly as the loader does; the state holds both.
"""

import math
from collections.abc import Callable, Mapping
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from ldm_jax.atomic import DestinationExistsError, atomic_output
from ldm_jax.data import loader
from ldm_jax.data.errors import DataError
from ldm_jax.data.image_folder import IMAGE_SUFFIXES

PRIOR_PREFIX = "prior_"
SOURCE_NAME = "dreambooth"
CLASS_IMAGE_NAME = "class_{index:05d}.png"  # what ensure_class_images writes
_CLASS_SEED_SALT = 0x7072696F  # "prio": the class half's seed, derived from the run's
# (image, caption) record keys of image_records, as make_train_dataset's `source=` reads them
_RECORD_KEYS = {"image_key": "image", "caption_key": "caption", "label_key": ""}

# generate(prompts, first_index) -> uint8 [n, H, W, 3]: the class image for prompts[i] is the
# (first_index + i)-th class image (a generator may key its noise by that index)
GenerateFn = Callable[[list[str], int], np.ndarray]


def _suffixes() -> str:
    return ", ".join(IMAGE_SUFFIXES)


def list_images(folder: str | Path) -> list[Path]:
    """The image files directly in `folder`, sorted by name ([] when it does not exist)."""
    folder = Path(folder).expanduser()
    if not folder.is_dir():
        return []
    return sorted(
        p
        for p in folder.iterdir()
        if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES and not p.name.startswith(".")
    )


def read_image(path: Path) -> np.ndarray:
    """uint8 [H, W, 3] RGB pixels of an image file (EXIF rotation applied); DataError naming the
    file when it cannot be decoded."""
    try:
        with Image.open(path) as image:
            image.load()  # decode fully: a truncated file fails here, not during training
            rgb = ImageOps.exif_transpose(image).convert("RGB")
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as error:
        raise DataError(
            f"cannot read image {path} ({type(error).__name__}: {error}); fix or remove it"
        ) from None
    return np.asarray(rgb, dtype=np.uint8)


def image_records(folder: str | Path, prompt: str, *, limit: int | None = None) -> list[dict]:
    """{"image": uint8 [H, W, 3], "caption": prompt} for every image of `folder` (the first
    `limit` when given), as make_train_dataset's `source=` reads them. DataError for a missing
    or image-less folder or an unreadable image."""
    path = Path(folder).expanduser()
    if not path.is_dir():
        raise DataError(f"image folder {path} does not exist (or is not a folder)")
    files = list_images(path)
    if not files:
        raise DataError(
            f"no images in {path}; expected files directly in it ending in {_suffixes()}"
        )
    if limit is not None:
        files = files[:limit]
    return [{"image": read_image(file), "caption": prompt} for file in files]


def _text(data_cfg, key: str, meaning: str) -> str:
    value = loader._get(data_cfg, key)
    if not isinstance(value, str):
        raise DataError(f"data.{key} must be a string ({meaning}), got {value!r}")
    return value


def check_dreambooth_config(data_cfg) -> None:
    """The DreamBooth keys of config.data (module docstring): one DataError per problem, naming
    the key and what is allowed."""
    instance_dir = _text(data_cfg, "instance_dir", "the folder of the subject's images")
    if not instance_dir.strip():
        raise DataError(
            "data.instance_dir is empty; set it to the folder of the subject's images "
            f"({_suffixes()})"
        )
    if not _text(data_cfg, "instance_prompt", "the instance images' caption").strip():
        raise DataError(
            "data.instance_prompt is empty; set the caption naming the subject, e.g. "
            "'a photo of sks dog'"
        )
    class_dir = _text(data_cfg, "class_dir", '"" = no prior preservation')
    class_prompt = _text(data_cfg, "class_prompt", "the class images' caption")
    if class_dir.strip() and not class_prompt.strip():
        raise DataError(
            f"data.class_prompt is empty but data.class_dir={class_dir!r} asks for prior "
            "preservation; set the class's caption (e.g. 'a photo of dog'), or class_dir='' "
            "to train without prior preservation"
        )
    num = loader._get(data_cfg, "num_class_images")
    if isinstance(num, bool) or not isinstance(num, int | np.integer) or num < 0:
        raise DataError(
            f"data.num_class_images must be an integer >= 0 (0 = every image of class_dir), "
            f"got {num!r}"
        )
    weight = loader._get(data_cfg, "prior_loss_weight")
    if (
        isinstance(weight, bool)
        or not isinstance(weight, int | float | np.integer | np.floating)
        or not math.isfinite(weight)
        or weight < 0
    ):
        raise DataError(
            f"data.prior_loss_weight must be a finite number >= 0 (the class half's weight in "
            f"the loss; 1.0 as in diffusers), got {weight!r}"
        )
    if loader._get(data_cfg, "label_key"):
        raise DataError(
            f"data.label_key={loader._get(data_cfg, 'label_key')!r} is set; DreamBooth captions "
            "every image with a prompt and has no class labels: leave data.label_key empty"
        )
    if loader.resolve_buckets(data_cfg) is not None:
        raise DataError(
            "aspect-ratio buckets (data.buckets / data.bucket_area) are not supported with "
            "data.source='dreambooth' (its two halves would draw different shapes); unset them "
            "and train square crops of data.image_size"
        )


def _plain_config(data_cfg) -> dict:
    """config.data as a dict (the loader reads Mappings and ConfigDicts alike)."""
    if isinstance(data_cfg, Mapping):
        return dict(data_cfg)
    if hasattr(data_cfg, "to_dict"):
        return data_cfg.to_dict()
    raise DataError(f"the data config must be a dict or ConfigDict, got {type(data_cfg).__name__}")


def class_seed(seed: int) -> int:
    """The class half's shuffle/augmentation seed: independent of the instance half's `seed`."""
    return int(np.random.SeedSequence([int(seed), _CLASS_SEED_SALT]).generate_state(1)[0])


class DreamBoothIterator:
    """Endless per-host batches of the instance half (and the class half, keys prefixed
    "prior_"), with a JSON-able `get_state()` / `set_state(state)` holding both halves' states."""

    def __init__(self, instance: loader.TrainIterator, prior: loader.TrainIterator | None):
        self.instance = instance
        self.prior = prior

    def __iter__(self):
        return self

    def __next__(self) -> dict[str, np.ndarray]:
        batch = dict(next(self.instance))
        if self.prior is not None:
            batch.update({PRIOR_PREFIX + key: value for key, value in next(self.prior).items()})
        return batch

    def close(self) -> None:
        """Stop both halves' prefetch threads / worker processes."""
        self.instance.close()
        if self.prior is not None:
            self.prior.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc_info):
        self.close()

    def get_state(self) -> dict:
        return {
            "dreambooth": {
                "instance": self.instance.get_state(),
                "prior": None if self.prior is None else self.prior.get_state(),
            }
        }

    def set_state(self, state: Mapping) -> None:
        saved = state.get("dreambooth") if isinstance(state, Mapping) else None
        if not isinstance(saved, Mapping) or "instance" not in saved:
            raise DataError(
                "the saved data-iterator state is not a DreamBooth one (data.source was not "
                "'dreambooth' when it was saved); resume with the same data config"
            )
        had_prior = saved.get("prior") is not None
        if had_prior != (self.prior is not None):
            was, now = ("with", "without") if had_prior else ("without", "with")
            raise DataError(
                f"the saved data-iterator state is from a run {was} prior preservation, this run "
                f"is {now} it (data.class_dir); resume with the same data config"
            )
        self.instance.set_state(saved["instance"])
        if self.prior is not None:
            self.prior.set_state(saved["prior"])


def dreambooth_batches(
    data_cfg,
    tokenize_fn: loader.TokenizeFn,
    global_batch_size: int,
    seed: int,
    *,
    data_parallel_size: int,
    process_index: int | None = None,
    process_count: int | None = None,
    micro_conditioning: bool = False,
    bucket_multiple: int = 1,
) -> DreamBoothIterator:
    """Per-host DreamBooth batches (module docstring) of `global_batch_size` rows per half;
    arguments as `make_train_dataset`'s. The class half (when data.class_dir is set) reads the
    first data.num_class_images images of class_dir (all of them for 0), and there must be that
    many: generate the missing ones first with `ensure_class_images`."""
    check_dreambooth_config(data_cfg)
    if tokenize_fn is None:
        raise DataError(
            "data.source='dreambooth' needs a text-conditioned model (a tokenizer for the "
            "prompts); this model has no text encoder"
        )
    del bucket_multiple  # buckets are refused by check_dreambooth_config
    shuffle_seed = loader._get(data_cfg, "shuffle_seed")
    seed = int(seed if shuffle_seed is None or shuffle_seed < 0 else shuffle_seed)
    if not 0 <= seed < 2**32:
        raise DataError(f"the data seed must be in [0, 2**32), got {seed}")
    config = {**_plain_config(data_cfg), **_RECORD_KEYS, "shuffle_seed": -1}
    config.update(source=SOURCE_NAME, buckets=None, bucket_area=0)

    def half(records, half_seed):
        return loader.make_train_dataset(
            config, tokenize_fn, global_batch_size, half_seed, source=records,
            data_parallel_size=data_parallel_size, process_index=process_index,
            process_count=process_count, micro_conditioning=micro_conditioning,
        )  # fmt: skip

    instance_records = image_records(
        loader._get(data_cfg, "instance_dir"), loader._get(data_cfg, "instance_prompt")
    )
    class_dir = loader._get(data_cfg, "class_dir")
    prior_records = None
    if class_dir.strip():
        wanted = int(loader._get(data_cfg, "num_class_images"))
        found = len(list_images(class_dir))
        if wanted and found < wanted:
            raise DataError(
                f"class_dir {class_dir} has {found} class image(s), fewer than "
                f"data.num_class_images={wanted}; generate the missing ones first "
                f"(ensure_class_images), add images, or set num_class_images to at most "
                f"{found} (0 = every image there)"
            )
        prior_records = image_records(
            class_dir, loader._get(data_cfg, "class_prompt"), limit=wanted or None
        )
    instance = half(instance_records, seed)
    try:
        prior = None if prior_records is None else half(prior_records, class_seed(seed))
    except BaseException:
        instance.close()
        raise
    return DreamBoothIterator(instance, prior)


def _free_name(folder: Path, index: int) -> tuple[Path, int]:
    """The first CLASS_IMAGE_NAME at `index` or after that nothing occupies, and its index."""
    while True:
        path = folder / CLASS_IMAGE_NAME.format(index=index)
        if not path.exists() and not path.is_symlink():
            return path, index
        index += 1


def _write_png(folder: Path, index: int, pixels_HW3: np.ndarray) -> int:
    """Write one class image under the first free name from `index` (never replacing anything,
    even a file that appears while writing); returns the index after the one used."""
    while True:
        path, index = _free_name(folder, index)
        try:
            with atomic_output(path) as temporary:
                Image.fromarray(pixels_HW3, "RGB").save(temporary, format="PNG")
        except DestinationExistsError:  # someone took the name meanwhile: the next one
            index += 1
            continue
        return index + 1


def _checked_images(images, count: int) -> np.ndarray:
    images_NHW3 = np.asarray(images)
    if (
        images_NHW3.dtype != np.uint8
        or images_NHW3.ndim != 4
        or images_NHW3.shape[0] != count
        or images_NHW3.shape[-1] != 3
    ):
        raise DataError(
            f"the class-image generator returned {images_NHW3.dtype} {images_NHW3.shape} for "
            f"{count} prompts; expected uint8 [{count}, H, W, 3]"
        )
    return images_NHW3


def ensure_class_images(
    class_dir: str | Path,
    num_class_images: int,
    class_prompt: str,
    generate: GenerateFn,
    batch_size: int = 4,
) -> int:
    """Top class_dir up to `num_class_images` images, as diffusers does before training: count
    the images there (`list_images`) and generate the missing ones, `batch_size` prompts per
    `generate(prompts, first_index)` call (first_index = the number of class images before the
    call's first), each written as an atomic PNG "class_NNNNN.png" under a name nothing holds
    (an existing file is never overwritten). Returns how many were generated (0 when enough are
    there; the folder is created if missing)."""
    if isinstance(num_class_images, bool) or not isinstance(num_class_images, int | np.integer):
        raise DataError(f"num_class_images must be an integer >= 0, got {num_class_images!r}")
    if num_class_images < 0:
        raise DataError(f"num_class_images must be an integer >= 0, got {num_class_images}")
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise DataError(f"the class-image batch size must be an integer >= 1, got {batch_size!r}")
    if not str(class_dir).strip():
        raise DataError("class_dir is empty; name the folder of class images to fill")
    folder = Path(class_dir).expanduser()
    if folder.exists() and not folder.is_dir():
        raise DataError(f"class_dir {folder} exists and is not a folder; choose a folder path")
    existing = len(list_images(folder))
    missing = int(num_class_images) - existing
    if missing <= 0:
        return 0
    if not isinstance(class_prompt, str) or not class_prompt.strip():
        raise DataError(
            f"class_dir {folder} has {existing} of num_class_images={num_class_images} class "
            f"images and class_prompt is {class_prompt!r}; give the class's prompt (e.g. 'a "
            "photo of dog') to generate the rest"
        )
    folder.mkdir(parents=True, exist_ok=True)
    index = existing
    for start in range(0, missing, batch_size):
        count = min(batch_size, missing - start)
        images_NHW3 = _checked_images(generate([class_prompt] * count, existing + start), count)
        for pixels_HW3 in images_NHW3:
            index = _write_png(folder, index, pixels_HW3)
    return missing

"""A TFDS dataset from a user's folder of captioned images (array_record; no TensorFlow needed).

    python -m ldm_jax.data.image_folder SRC_DIR --data-dir DIR [--name NAME] [--overwrite]

Captions come from either
- `SRC_DIR/metadata.jsonl`: one JSON object a line, {"file_name": "<path relative to SRC_DIR>",
  "text": "<caption>"} ("caption" is accepted for "text"); it must list every image, or
- a `.txt` file beside each image with the same stem (`cat.png` + `cat.txt`).
Images (.png .jpg .jpeg .webp .bmp, in SRC_DIR and its subfolders) are stored as PNG/JPEG bytes:
RGB PNG and JPEG files as they are, anything else (RGBA, grayscale, palette, WebP, EXIF-rotated
JPEG) converted to RGB and stored as PNG. The result is DIR/NAME/1.0.0 with a "train" split of
{"image": uint8 [H, W, 3], "caption": text, "file_name": text}, readable with
`tfds.data_source(NAME, split="train", data_dir=DIR)`. Bad input (an unreadable image, a missing
caption, an image metadata.jsonl does not list) is one error naming the file; nothing is written.
"""

import argparse
import dataclasses
import io
import json
import re
import sys
import tempfile
from pathlib import Path

from PIL import Image, ImageOps, UnidentifiedImageError

from ldm_jax.atomic import atomic_output, folder_kind
from ldm_jax.data.errors import DataError

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp")
VERSION = "1.0.0"
METADATA_FILE = "metadata.jsonl"
CAPTION_KEYS = ("text", "caption")
_NAME_PATTERN = re.compile(r"[a-z][a-z0-9_]*")
# what --overwrite may replace: a dataset written before, never an unrelated folder
_DATASET = folder_kind(
    "a TFDS dataset folder (with dataset_info.json)",
    lambda path: (path / "dataset_info.json").is_file(),
)
_EXIF_ORIENTATION = 0x0112
_STORED_AS_IS = {"PNG", "JPEG"}
EXIT_BAD_INPUT = 2


@dataclasses.dataclass(frozen=True)
class FolderExample:
    file_name: str  # relative to the source folder, "/"-separated
    caption: str


def _image_files(folder: Path) -> list[str]:
    return sorted(
        p.relative_to(folder).as_posix()
        for p in folder.rglob("*")
        if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES and not p.name.startswith(".")
    )


def _listing(names, limit: int = 5) -> str:
    names = list(names)
    more = f" and {len(names) - limit} more" if len(names) > limit else ""
    return ", ".join(names[:limit]) + more


def _metadata_captions(path: Path) -> dict[str, str]:
    captions = {}
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as error:
            raise DataError(f"{path} line {number} is not JSON ({error})") from None
        caption_key = (
            next((k for k in CAPTION_KEYS if k in row), None) if isinstance(row, dict) else None
        )
        if caption_key is None or "file_name" not in row:
            raise DataError(
                f"{path} line {number} is {line[:80]!r}; expected an object with 'file_name' and "
                f"'text' (or 'caption')"
            )
        name, caption = row["file_name"], row[caption_key]
        if not isinstance(name, str) or not isinstance(caption, str):
            raise DataError(f"{path} line {number}: file_name and {caption_key} must be strings")
        name = Path(name).as_posix()
        if name in captions:
            raise DataError(f"{path} line {number}: {name} is listed twice")
        captions[name] = caption
    return captions


def find_examples(src_dir: str | Path) -> list[FolderExample]:
    """The (image, caption) pairs of a folder, sorted by file name; DataError if the folder is
    missing or empty, or any image lacks a caption."""
    folder = Path(src_dir).expanduser()
    if not folder.is_dir():
        raise DataError(f"image folder {folder} does not exist (or is not a folder)")
    images = _image_files(folder)
    metadata = folder / METADATA_FILE
    if metadata.is_file():
        captions = _metadata_captions(metadata)
        missing = sorted(set(captions) - set(images))
        if missing:
            raise DataError(
                f"{metadata} lists images that are not in {folder}: {_listing(missing)}"
            )
        unlisted = sorted(set(images) - set(captions))
        if unlisted:
            raise DataError(
                f"{metadata} has no caption for {len(unlisted)} image(s) in {folder}: "
                f"{_listing(unlisted)}; list every image, or remove the ones to leave out"
            )
    else:
        captions, uncaptioned = {}, []
        for name in images:
            text_file = (folder / name).with_suffix(".txt")
            if text_file.is_file():
                captions[name] = text_file.read_text(encoding="utf-8").strip()
            else:
                uncaptioned.append(name)
        if uncaptioned:
            raise DataError(
                f"{len(uncaptioned)} image(s) in {folder} have no caption: "
                f"{_listing(uncaptioned)}; put a .txt with the same stem beside each image, or "
                f"write {METADATA_FILE}"
            )
    if not images:
        raise DataError(
            f"no images in {folder}; expected files ending in {', '.join(IMAGE_SUFFIXES)}"
        )
    return [FolderExample(name, captions[name]) for name in images]


def encoded_image(path: Path) -> bytes:
    """PNG/JPEG bytes of an RGB image: the file itself when it already is one, else a PNG."""
    data = path.read_bytes()
    try:
        with Image.open(io.BytesIO(data)) as image:
            image.load()  # decode fully: catches truncated files now, not during training
            rotated = image.getexif().get(_EXIF_ORIENTATION, 1) != 1
            if image.format in _STORED_AS_IS and image.mode == "RGB" and not rotated:
                return data
            converted = ImageOps.exif_transpose(image).convert("RGB")
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as error:
        raise DataError(
            f"cannot read image {path} ({type(error).__name__}: {error}); fix or remove it"
        ) from None
    buffer = io.BytesIO()
    converted.save(buffer, format="PNG")
    return buffer.getvalue()


def _builder_class(name: str):
    import tensorflow_datasets as tfds  # noqa: PLC0415 - slow import, only when building/reading

    class ImageFolder(tfds.core.GeneratorBasedBuilder, skip_registration=True):
        """Captioned images of one folder; `examples` are checked before anything is written."""

        VERSION = tfds.core.Version(globals()["VERSION"])

        @tfds.core.utils.classproperty
        @classmethod
        def code_path(cls):
            # No checksums/code files beside this builder; tfds' default lookup imports
            # importlib_resources, which it does not install on Python >= 3.9.
            return None

        def __init__(self, *, src_dir: Path, examples: list[FolderExample], **kwargs):
            self._src_dir = src_dir
            self._examples = examples
            super().__init__(**kwargs)

        def _info(self):
            return tfds.core.DatasetInfo(
                builder=self,
                description=f"Captioned images from {self._src_dir} (ldm_jax.data.image_folder).",
                features=tfds.features.FeaturesDict(
                    {
                        "image": tfds.features.Image(shape=(None, None, 3)),
                        "caption": tfds.features.Text(),
                        "file_name": tfds.features.Text(),
                    }
                ),
            )

        def _split_generators(self, dl_manager):
            return {"train": self._generate_examples()}

        def _generate_examples(self):
            for example in self._examples:
                yield (
                    example.file_name,
                    {
                        "image": encoded_image(self._src_dir / example.file_name),
                        "caption": example.caption,
                        "file_name": example.file_name,
                    },
                )

    ImageFolder.name = name
    return ImageFolder


def build_image_folder_dataset(
    src_dir: str | Path, data_dir: str | Path, *, name: str = "image_folder", overwrite=False
) -> Path:
    """Write the TFDS dataset DATA_DIR/NAME/1.0.0 from SRC_DIR and return its path.

    Every image is decoded and every caption found before the dataset is written; the dataset
    appears only when complete (built beside it, then renamed into place)."""
    if not _NAME_PATTERN.fullmatch(name):
        raise DataError(
            f"dataset name {name!r} is not allowed; use lowercase letters, digits and '_', "
            "starting with a letter (a TFDS name)"
        )
    src_dir = Path(src_dir).expanduser().resolve()
    examples = find_examples(src_dir)
    for example in examples:  # fail on a bad image before anything is written
        encoded_image(src_dir / example.file_name)
    destination = Path(data_dir).expanduser() / name / VERSION
    if destination.exists() and not overwrite:
        raise DataError(
            f"dataset {destination} already exists; pass --overwrite (overwrite=True) to rebuild "
            "it, or choose another --name"
        )
    with (
        atomic_output(destination, overwrite=overwrite, replaceable=_DATASET) as temporary,
        tempfile.TemporaryDirectory(dir=destination.parent, prefix=".build-") as build_dir,
    ):
        builder = _builder_class(name)(
            src_dir=src_dir, examples=examples, data_dir=build_dir, file_format="array_record"
        )
        builder.download_and_prepare()
        Path(builder.data_dir).rename(temporary)
    return destination


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m ldm_jax.data.image_folder",
        description="Turn a folder of captioned images into a TFDS array_record dataset for "
        "training (captions: a .txt beside each image, or metadata.jsonl).",
    )
    parser.add_argument("src_dir", help="folder of images with captions")
    parser.add_argument("--data-dir", required=True, help="TFDS data_dir to write into")
    parser.add_argument("--name", default="image_folder", help="dataset name (%(default)s)")
    parser.add_argument("--overwrite", action="store_true", help="rebuild an existing dataset")
    args = parser.parse_args(argv)
    import tensorflow_datasets as tfds  # noqa: PLC0415 - keep --help fast

    tfds.disable_progress_bar()
    try:
        path = build_image_folder_dataset(
            args.src_dir, args.data_dir, name=args.name, overwrite=args.overwrite
        )
    except (DataError, OSError) as error:
        print(f"error: {error}", file=sys.stderr)
        return EXIT_BAD_INPUT
    print(f"wrote dataset {args.name} ({len(find_examples(args.src_dir))} examples) to {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""The built-in captioned shapes dataset: generated offline and deterministically from a seed.

Each image shows one or two flat shapes on a white background, captioned from its attributes:

    one shape:   "a small blue square", "a large red circle"
    two shapes:  "a red circle above a blue square", "a green triangle left of a yellow circle"

```python
from ldm_jax.data.shapes import ShapesConfig, ShapesSource, parse_caption

train = ShapesSource(ShapesConfig(image_size=32), "train")  # random access, generated on demand
example = train[0]  # {"image": uint8 [32, 32, 3], "caption": str, "attributes": {...}}
scene = parse_caption(example["caption"])  # == Scene.from_record(example["attributes"])
```

Designed for a tiny LDM on a CPU: few well separated colours (hues 0°/50°/135°/225°), three shapes
that differ in how much of their bounding box they fill (square 1, circle π/4, triangle 1/2), no
rotation, and two-shape layouts whose relation is the dominant fact of the picture: the two shapes
sit in a row along the relation's axis, apart by more than a gap, near the image centre. (A tiny
LDM on a CPU learns "above" from such rows in minutes; with freely scattered, diagonal pairs it
did not within the default run's budget.) Example ``i`` of a split is drawn from its own
random stream ``(seed, split, i)``, so any example is generated in O(1) (random access for grain)
and the splits never share a stream. The scene (shapes, colours, layout as fractions of the image)
does not depend on ``image_size``: the same seed gives the same captions at every resolution.
"""

from __future__ import annotations

import dataclasses
import re

import numpy as np

SHAPES = ("circle", "square", "triangle")
COLORS = {  # name -> RGB; saturated, with hues far apart so a colour is read back from hue alone
    "red": (220, 30, 30),
    "yellow": (235, 200, 20),
    "green": (30, 170, 60),
    "blue": (40, 80, 230),
}
SIZES = ("small", "large")  # single-shape captions only; two-shape scenes use one medium size
RELATIONS = ("above", "below", "left of", "right of")  # objects[0] <relation> objects[1]
SPLITS = ("train", "test")
BACKGROUND = (255, 255, 255)
# a fixed prompt set for sample grids: every shape, colour, relation and size at least once
SAMPLE_PROMPTS = (
    "a red circle above a blue square",
    "a green triangle left of a yellow circle",
    "a small blue square",
    "a large yellow triangle",
    "a blue triangle below a red square",
    "a yellow square right of a green circle",
    "a large green circle",
    "a small red triangle",
)
MEDIUM = "medium"

# Layout, as fractions of the image side: bounding-box widths of each size, the border margin,
# and the minimum gap between the two boxes of a two-shape scene along the relation's axis.
EXTENTS = {"small": (0.26, 0.32), "large": (0.50, 0.60), MEDIUM: (0.30, 0.36)}
MARGIN = 0.04
GAP = 0.08
# Two-shape layouts (_two_object_layout). With the largest medium boxes (0.36) the farthest
# centre along the axis is 0.5 + 0.04 + (0.36 + 0.08 + 0.04) / 2 = 0.78 = 1 - MARGIN - 0.36 / 2:
# every box stays inside the margin without clipping (the tests check it).
SPREAD = 0.04  # extra distance between the two boxes beyond GAP, drawn uniformly
PAIR_ALONG_JITTER = 0.04
PAIR_ACROSS_JITTER = 0.15
OBJECT_JITTER = 0.04
_SUPERSAMPLE = 4  # draw at 4x and box-filter down: anti-aliased edges, still deterministic
_SPLIT_STREAM = {"train": 0, "test": 1}


@dataclasses.dataclass(frozen=True)
class ShapeObject:
    shape: str
    color: str
    size: str = MEDIUM  # "small" | "large" (named in the caption) | "medium"


@dataclasses.dataclass(frozen=True)
class Scene:
    """What a caption says: one or two objects; for two, ``objects[0] <relation> objects[1]``."""

    objects: tuple[ShapeObject, ...]
    relation: str | None = None

    def __post_init__(self):
        check_scene(self)

    @property
    def caption(self) -> str:
        if len(self.objects) == 1:
            obj = self.objects[0]
            return f"a {obj.size} {obj.color} {obj.shape}"
        first, second = self.objects
        return f"a {first.color} {first.shape} {self.relation} a {second.color} {second.shape}"

    def to_record(self) -> dict:
        """Flat attributes (str/int fields, "" when absent), as stored beside each caption."""
        record = {"num_objects": len(self.objects), "relation": self.relation or ""}
        for k in (1, 2):
            obj = self.objects[k - 1] if k <= len(self.objects) else None
            for field in ("shape", "color", "size"):
                record[f"{field}{k}"] = getattr(obj, field) if obj else ""
        return record

    @classmethod
    def from_record(cls, record: dict) -> Scene:
        """The inverse of ``to_record``; also accepts the bytes values that TFDS decoding gives."""

        def text(key):
            value = record[key]
            return value.decode() if isinstance(value, bytes) else str(value)

        count = int(record["num_objects"])
        if count not in (1, 2):
            raise ValueError(f"num_objects must be 1 or 2, got {count}")
        objects = tuple(
            ShapeObject(text(f"shape{k}"), text(f"color{k}"), text(f"size{k}"))
            for k in range(1, count + 1)
        )
        return cls(objects, text("relation") or None)


def check_scene(scene: Scene) -> None:
    """ValueError naming the first attribute outside the dataset's vocabulary."""
    objects, relation = scene.objects, scene.relation
    if len(objects) not in (1, 2):
        raise ValueError(f"a scene has 1 or 2 objects, got {len(objects)}")
    for obj in objects:
        for value, allowed in ((obj.shape, SHAPES), (obj.color, tuple(COLORS))):
            if value not in allowed:
                raise ValueError(f"unknown attribute {value!r}; allowed: {', '.join(allowed)}")
    if len(objects) == 1:
        if objects[0].size not in SIZES:
            raise ValueError(
                f"a single object's size must be one of {SIZES}, got {objects[0].size!r}"
            )
        if relation is not None:
            raise ValueError("a one-object scene has no relation")
        return
    if relation not in RELATIONS:
        raise ValueError(f"relation must be one of {RELATIONS}, got {relation!r}")
    if objects[0].color == objects[1].color:
        raise ValueError(f"the two objects need different colours, both are {objects[0].color!r}")


_WORD = "|".join
_ONE = re.compile(rf"a ({_WORD(SIZES)}) ({_WORD(COLORS)}) ({_WORD(SHAPES)})")
_TWO = re.compile(
    rf"an? ({_WORD(COLORS)}) ({_WORD(SHAPES)}) ({_WORD(RELATIONS)}) an? ({_WORD(COLORS)}) "
    rf"({_WORD(SHAPES)})"
)


def parse_caption(caption: str) -> Scene:
    """The scene a caption of this dataset's grammar describes (case and spacing ignored)."""
    text = " ".join(caption.lower().replace(".", " ").split())
    if match := _ONE.fullmatch(text):
        size, color, shape = match.groups()
        return Scene((ShapeObject(shape, color, size),))
    if match := _TWO.fullmatch(text):
        c1, s1, relation, c2, s2 = match.groups()
        return Scene((ShapeObject(s1, c1), ShapeObject(s2, c2)), relation)
    raise ValueError(
        f"cannot read caption {caption!r}: expected 'a <size> <colour> <shape>' or "
        "'a <colour> <shape> <relation> a <colour> <shape>' with size in "
        f"{SIZES}, colour in {tuple(COLORS)}, shape in {SHAPES}, relation in {RELATIONS}"
    )


@dataclasses.dataclass(frozen=True)
class Placement:
    """Where an object is drawn: centre (x, y) and bounding-box width, as fractions of the side."""

    cx: float
    cy: float
    extent: float


@dataclasses.dataclass(frozen=True)
class ShapesConfig:
    image_size: int = 32
    seed: int = 0
    num_train: int = 20_000
    num_test: int = 1_000
    two_object_fraction: float = 0.75  # most scenes show a relation, the hardest thing to learn

    def __post_init__(self):
        if not 8 <= self.image_size <= 1024:
            raise ValueError(f"image_size must be in [8, 1024] pixels, got {self.image_size}")
        if self.num_train < 1 or self.num_test < 1:
            raise ValueError("num_train and num_test must be >= 1")
        if not 0.0 <= self.two_object_fraction <= 1.0:
            raise ValueError("two_object_fraction must be in [0, 1]")

    def num_examples(self, split: str) -> int:
        check_split(split)
        return self.num_train if split == "train" else self.num_test


def check_split(split: str) -> None:
    if split not in SPLITS:
        raise ValueError(f"unknown split {split!r}; choose one of {SPLITS}")


def sample_scene(rng: np.random.Generator, two_object_fraction: float = 0.75):
    """A random (Scene, placements) pair; placements are in image fractions."""
    colors = list(COLORS)
    if rng.random() >= two_object_fraction:
        obj = ShapeObject(
            SHAPES[rng.integers(len(SHAPES))],
            colors[rng.integers(len(colors))],
            SIZES[rng.integers(len(SIZES))],
        )
        extent = rng.uniform(*EXTENTS[obj.size])
        lo, hi = MARGIN + extent / 2, 1 - MARGIN - extent / 2
        return Scene((obj,)), (Placement(rng.uniform(lo, hi), rng.uniform(lo, hi), extent),)
    c1, c2 = rng.choice(len(colors), size=2, replace=False)
    objects = tuple(ShapeObject(SHAPES[rng.integers(len(SHAPES))], colors[c]) for c in (c1, c2))
    relation = RELATIONS[rng.integers(len(RELATIONS))]
    return Scene(objects, relation), _two_object_layout(rng, relation)


def _two_object_layout(rng, relation: str) -> tuple[Placement, Placement]:
    """Two boxes in a row along the relation's axis, objects[0] clearly <relation> objects[1].

    The pair straddles the image centre along the axis (midpoint 0.5 +- PAIR_ALONG_JITTER, boxes
    GAP to GAP + SPREAD apart) and shares one cross-axis line (0.5 +- PAIR_ACROSS_JITTER), each
    object off it by at most OBJECT_JITTER: the relation is the dominant fact of the layout.
    """
    extents = rng.uniform(*EXTENTS[MEDIUM], size=2)
    vertical = relation in ("above", "below")
    first_is_lower = relation in ("above", "left of")  # smaller coordinate (top / left)
    min_delta = extents.sum() / 2 + GAP
    delta = rng.uniform(min_delta, min_delta + SPREAD)
    middle = 0.5 + rng.uniform(-PAIR_ALONG_JITTER, PAIR_ALONG_JITTER)
    line = 0.5 + rng.uniform(-PAIR_ACROSS_JITTER, PAIR_ACROSS_JITTER)
    along = (middle - delta / 2, middle + delta / 2)
    if not first_is_lower:
        along = along[::-1]
    placements = []
    for position, extent in zip(along, extents, strict=True):
        across = line + rng.uniform(-OBJECT_JITTER, OBJECT_JITTER)
        x, y = (across, position) if vertical else (position, across)
        placements.append(Placement(float(x), float(y), float(extent)))
    return tuple(placements)


def render(scene: Scene, placements, image_size: int) -> np.ndarray:
    """uint8 [S, S, 3]: the scene's shapes drawn at their placements (anti-aliased)."""
    from PIL import Image, ImageDraw  # noqa: PLC0415 - optional until images are drawn

    side = image_size * _SUPERSAMPLE
    canvas = Image.new("RGB", (side, side), BACKGROUND)
    draw = ImageDraw.Draw(canvas)
    for obj, place in zip(scene.objects, placements, strict=True):
        cx, cy, half = place.cx * side, place.cy * side, place.extent * side / 2
        color = COLORS[obj.color]
        if obj.shape == "circle":
            draw.ellipse([cx - half, cy - half, cx + half, cy + half], fill=color)
        elif obj.shape == "square":
            draw.rectangle([cx - half, cy - half, cx + half, cy + half], fill=color)
        else:  # upright equilateral triangle, its bounding box centred on (cx, cy)
            h = half * np.sqrt(3.0)
            points = [(cx, cy - h / 2), (cx + half, cy + h / 2), (cx - half, cy + h / 2)]
            draw.polygon(points, fill=color)
    small = canvas.resize((image_size, image_size), Image.Resampling.BOX)
    return np.asarray(small, dtype=np.uint8)


def example_rng(config: ShapesConfig, split: str, index: int) -> np.random.Generator:
    check_split(split)
    return np.random.default_rng([config.seed, _SPLIT_STREAM[split], index])


def generate_scene(config: ShapesConfig, split: str, index: int):
    """(Scene, placements) of example ``index`` of ``split`` (no drawing)."""
    count = config.num_examples(split)
    if not 0 <= index < count:
        raise IndexError(f"index {index} out of range for {split} ({count} examples)")
    return sample_scene(example_rng(config, split, index), config.two_object_fraction)


def generate_example(config: ShapesConfig, split: str, index: int) -> dict:
    """{"image": uint8 [S, S, 3], "caption": str, "attributes": flat record} of one example."""
    scene, placements = generate_scene(config, split, index)
    return {
        "image": render(scene, placements, config.image_size),
        "caption": scene.caption,
        "attributes": scene.to_record(),
    }


class ShapesSource:
    """A random-access split (``len`` + ``[i]``), generated on demand: a grain data source."""

    def __init__(self, config: ShapesConfig | None = None, split: str = "train"):
        check_split(split)
        self.config = config or ShapesConfig()
        self.split = split

    def __len__(self) -> int:
        return self.config.num_examples(self.split)

    def __getitem__(self, index) -> dict:
        index = int(index)
        if index < 0:
            index += len(self)
        return generate_example(self.config, self.split, index)

    def __repr__(self) -> str:
        return f"ShapesSource({self.config}, split={self.split!r})"

    def captions(self, n: int | None = None) -> list[str]:
        """The first n captions (all by default) without drawing the images."""
        n = len(self) if n is None else min(n, len(self))
        return [generate_scene(self.config, self.split, i)[0].caption for i in range(n)]


def in_memory_source(data_cfg, split: str) -> ShapesSource:
    """The loader's hook for ``config.data.source = "shapes"``: a split generated on demand.

    Reads ``data_cfg.image_size`` and, when present, ``shapes_seed``, ``shapes_num_train`` and
    ``shapes_num_test`` (defaults: ShapesConfig's).
    """
    defaults = ShapesConfig()

    def get(key, default):
        return data_cfg.get(key, default) if hasattr(data_cfg, "get") else default

    config = ShapesConfig(
        image_size=int(get("image_size", defaults.image_size)),
        seed=int(get("shapes_seed", defaults.seed)),
        num_train=int(get("shapes_num_train", defaults.num_train)),
        num_test=int(get("shapes_num_test", defaults.num_test)),
    )
    return ShapesSource(config, split)

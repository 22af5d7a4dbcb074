"""The shapes world: a seeded procedural image/caption/question generator the demo trains and evaluates on.

No image-text data can be downloaded here, so the demo needs a world small enough to learn in minutes on a CPU yet
rich enough that captions and answers depend on the image. Each image is drawn from a `Scene` (1-4 objects with
shape, colour, size and position); captions and VQA answers are *derived* from the scene, never stored
separately, so they cannot disagree with the pixels. The out-of-distribution split holds colour-shape combinations
that no in-domain image contains (like NoCaps' out-domain). Splits are written in the COCO-captions and VQAv2
formats so the same readers and metrics serve real and synthetic data.
"""

from __future__ import annotations

import json
import os
import random
import re
from dataclasses import dataclass
from itertools import pairwise
from pathlib import Path

from PIL import Image, ImageDraw

from .vqa import write_vqa

SHAPES = ("circle", "square", "triangle", "diamond", "cross")
COLOURS = {
    "red": (220, 40, 40),
    "green": (40, 170, 60),
    "blue": (50, 90, 230),
    "yellow": (240, 220, 40),
    "purple": (150, 60, 200),
    "orange": (250, 140, 30),
}
BACKGROUND = (40, 40, 40)
SIZES = ("small", "large")
# each shape and each colour is seen in training; only these pairings are new in the "ood" split
HELD_OUT = frozenset(
    {("green", "circle"), ("yellow", "square"), ("purple", "triangle"), ("red", "diamond"), ("blue", "cross")}
)
SPLITS = ("train", "dev", "test", "ood", "calibration")  # calibration: the demo certifies thresholds on it
IMAGE_NAME = "{subtype}/{image_id:012d}.png"  # for `read_vqa(..., image_name=IMAGE_NAME)`: subtype is the split
NUMBERS = ("zero", "one", "two", "three", "four")
WORLD_VERSION = 2  # bumped whenever scenes or their text change: the demo's caches are keyed by it


@dataclass(frozen=True)
class ShapeObject:
    shape: str
    colour: str
    size: str  # "small" / "large"
    x: int  # centre, pixels
    y: int
    radius: int  # half the bounding box side

    @property
    def name(self) -> str:
        return f"{self.colour} {self.shape}"

    @property
    def description(self) -> str:
        return f"{self.size} {self.colour} {self.shape}"


@dataclass(frozen=True)
class Scene:
    objects: tuple[ShapeObject, ...]  # sorted left to right
    image_size: int

    def region(self, obj: ShapeObject) -> str:
        """Where an object sits, on a 3x3 grid: 'top left', 'center', 'right', ..."""
        third = self.image_size / 3
        row = ("top", "", "bottom")[min(int(obj.y // third), 2)]
        col = ("left", "", "right")[min(int(obj.x // third), 2)]
        return f"{row} {col}".strip() or "center"

    def side(self, obj: ShapeObject) -> str:
        return "left" if obj.x < self.image_size / 2 else "right"


@dataclass(frozen=True)
class QA:
    question: str
    answer: str
    answer_type: str  # VQAv2's: "yes/no", "number", "other"
    question_type: str  # "colour", "shape", "count", "position", "existence"


@dataclass(frozen=True)
class ShapesExample:
    image_id: int
    scene: Scene
    captions: list[str]  # the first is the canonical one
    questions: list[QA]


# --- scenes and pixels -----------------------------------------------------------------------------------------


def sample_scene(rng: random.Random, image_size: int = 64, ood: bool = False, max_objects: int = 4) -> Scene:
    """1-`max_objects` non-overlapping objects; `ood` scenes hold at least one held-out colour-shape pair, others none.

    Objects are placed one at a time, each redrawn until it is compatible with those already placed (a whole scene
    is redrawn only if one cannot be): rejecting whole scenes took ~550 draws per scene at four objects.
    """
    n = rng.randint(1, max_objects)
    allowed = [(c, s) for c in COLOURS for s in SHAPES if ((c, s) in HELD_OUT) == ood]
    anyone = [(c, s) for c in COLOURS for s in SHAPES if (c, s) not in HELD_OUT]
    while True:
        objects: list[ShapeObject] = []
        for i in range(n):
            for _ in range(100):
                colour, shape = rng.choice(allowed if i == 0 or not ood else allowed + anyone)
                size = rng.choice(SIZES)
                scale = (0.09, 0.13) if size == "small" else (0.18, 0.23)
                radius = max(2, round(image_size * rng.uniform(*scale)))
                x = rng.randint(radius + 1, image_size - radius - 2)
                y = rng.randint(radius + 1, image_size - radius - 2)
                obj = ShapeObject(shape, colour, size, x, y, radius)
                if _off_midline(obj, image_size) and all(_distinct(obj, o, image_size) for o in objects):
                    objects.append(obj)
                    break
            else:
                break  # no room left for object i: draw the scene again
        if len(objects) == n:
            return Scene(tuple(sorted(objects, key=lambda o: o.x)), image_size)


def _off_midline(obj: ShapeObject, image_size: int) -> bool:
    """Not astride the vertical midline, so 'which side' has one answer."""
    return abs(obj.x - image_size / 2) >= image_size * 0.06


def _distinct(a: ShapeObject, b: ShapeObject, image_size: int) -> bool:
    """An unambiguous pair: no overlap; clearly further apart along one axis ('left of' / 'above') and never at the
    same x ('from left to right'); each named uniquely by colour + shape, by size + shape (colour questions) and by
    size + colour (shape questions)."""
    dx, dy = abs(a.x - b.x), abs(a.y - b.y)
    if max(dx, dy) < a.radius + b.radius + 2 or abs(dx - dy) < image_size * 0.06 or dx < 2:
        return False
    if (a.colour, a.shape) == (b.colour, b.shape):
        return False
    return not (a.size == b.size and (a.shape == b.shape or a.colour == b.colour))


def shape_polygon(obj: ShapeObject) -> list[tuple[float, float]] | None:
    """Polygon of an object (None for a circle); each contains its own centre."""
    x, y, r = obj.x, obj.y, obj.radius
    if obj.shape == "square":
        return [(x - r, y - r), (x + r, y - r), (x + r, y + r), (x - r, y + r)]
    if obj.shape == "triangle":
        return [(x, y - r), (x + r, y + r), (x - r, y + r)]
    if obj.shape == "diamond":
        return [(x, y - r), (x + r, y), (x, y + r), (x - r, y)]
    if obj.shape == "cross":
        t = max(1, r // 3)
        return [
            (x - t, y - r),
            (x + t, y - r),
            (x + t, y - t),
            (x + r, y - t),
            (x + r, y + t),
            (x + t, y + t),
            (x + t, y + r),
            (x - t, y + r),
            (x - t, y + t),
            (x - r, y + t),
            (x - r, y - t),
            (x - t, y - t),
        ]
    return None


def render(scene: Scene) -> Image.Image:
    """The scene as an RGB image: flat colours, no antialiasing, so every object pixel has its colour exactly."""
    image = Image.new("RGB", (scene.image_size, scene.image_size), BACKGROUND)
    draw = ImageDraw.Draw(image)
    for obj in scene.objects:
        fill = COLOURS[obj.colour]
        polygon = shape_polygon(obj)
        if polygon is None:
            draw.ellipse([obj.x - obj.radius, obj.y - obj.radius, obj.x + obj.radius, obj.y + obj.radius], fill=fill)
        else:
            draw.polygon(polygon, fill=fill)
    return image


# --- text derived from a scene ---------------------------------------------------------------------------------


RELATIONS = ("to the left of", "to the right of", "above", "below")


def relation(a: ShapeObject, b: ShapeObject) -> str:
    """How `a` stands to `b` along the axis on which they are further apart."""
    if abs(a.x - b.x) >= abs(a.y - b.y):
        return "to the left of" if a.x < b.x else "to the right of"
    return "above" if a.y < b.y else "below"


def _where(scene: Scene, obj: ShapeObject) -> str:
    region = scene.region(obj)
    if region == "center":
        return "in the center"
    if " " in region:
        return f"in the {region} corner"
    return f"at the {region}" if region in ("top", "bottom") else f"on the {region}"


def _articles(text: str) -> str:
    """'a orange' -> 'an orange'."""
    return re.sub(r"\ba (?=[aeiou])", "an ", text)


def captions(scene: Scene) -> list[str]:
    """Five captions, canonical first; a pure function of the scene.

    The canonical caption counts the objects, then walks them from left to right, placing each against the one
    before it ("four shapes : a small red circle , a large blue square above it , ..."). Its words differ in how much
    they ask: "a", ",", "it" follow from the template; a count needs every object; the i-th description needs to know
    how many were already named and which object is next; "above it" compares two objects' positions. The demo
    needs that spread: when every word is easy, a one-layer exit is as good as the final layer.
    """
    return [_articles(c) for c in _caption_templates(scene)]


def _follows(obj: ShapeObject, previous: ShapeObject) -> str:
    """Where `obj` stands against the object named before it (always further right): 'above it', 'below it' or 'to
    its right', along the axis on which they are further apart."""
    return {"above": "above it", "below": "below it", "to the right of": "to its right"}[relation(obj, previous)]


def _walk(objs: tuple[ShapeObject, ...], label) -> str:
    """The objects left to right as `label` names them, each after the first placed against the one before it."""
    return " , ".join([f"a {label(objs[0])}"] + [f"a {label(o)} {_follows(o, p)}" for p, o in pairwise(objs)])


def _caption_templates(scene: Scene) -> list[str]:
    objs = scene.objects
    first = objs[0]
    if len(objs) == 1:
        return [
            f"one shape : a {first.description} {_where(scene, first)}",
            f"there is one shape : a {first.description}",
            f"a picture of one {first.description} on a gray background",
            f"a single {first.colour} {first.shape} {_where(scene, first)}",
            f"an image with only a {first.size} {first.shape} that is {first.colour}",
        ]
    count = NUMBERS[len(objs)]
    walk, names = _walk(objs, lambda o: o.description), _walk(objs, lambda o: o.name)
    last, before = objs[-1], objs[-2]
    return [
        f"{count} shapes : {walk}",
        f"there are {count} shapes : "
        + " , ".join(f"a {o.description}" for o in objs[:-1])
        + f" and a {last.description}",
        "from left to right a " + " then a ".join(o.description for o in objs),
        f"{count} shapes : {names}",
        f"the {last.description} is {relation(last, before)} the {before.description}",
    ]


def questions(scene: Scene, rng: random.Random, ood: bool = False) -> list[QA]:
    """Six questions: colour, shape, two counts, position, existence; answers derived from the scene.

    In-domain splits never name a held-out colour-shape pair, not even in a question whose answer is 'no'.
    """
    objs = scene.objects
    qa = []
    o = rng.choice(objs)
    unique_shape = sum(p.shape == o.shape for p in objs) == 1
    qa.append(
        QA(f"what color is the {o.shape if unique_shape else o.size + ' ' + o.shape} ?", o.colour, "other", "colour")
    )
    o = rng.choice(objs)
    unique_colour = sum(p.colour == o.colour for p in objs) == 1
    qa.append(
        QA(
            f"what shape is the {o.colour if unique_colour else o.size + ' ' + o.colour} object ?",
            o.shape,
            "other",
            "shape",
        )
    )
    qa.append(QA("how many shapes are there ?", str(len(objs)), "number", "count"))
    colour = rng.choice(sorted(COLOURS))
    qa.append(
        QA(f"how many {colour} shapes are there ?", str(sum(p.colour == colour for p in objs)), "number", "count")
    )
    o = rng.choice(objs)
    if len(objs) > 1 and rng.random() < 0.5:
        other = rng.choice([p for p in objs if p is not o])
        true = relation(o, other)
        rel = true if rng.random() < 0.5 else rng.choice([r for r in RELATIONS if r != true])
        yes = relation(o, other) == rel
        qa.append(QA(f"is the {o.name} {rel} the {other.name} ?", "yes" if yes else "no", "yes/no", "position"))
    else:
        qa.append(QA(f"which side of the image is the {o.name} on ?", scene.side(o), "other", "position"))
    present = {(p.colour, p.shape) for p in objs}
    if rng.random() < 0.5:
        colour, shape = rng.choice(sorted(present))
    else:
        absent = [(c, s) for c in COLOURS for s in SHAPES if (c, s) not in present and (ood or (c, s) not in HELD_OUT)]
        colour, shape = rng.choice(absent)
    answer = "yes" if (colour, shape) in present else "no"
    qa.append(QA(f"is there a {colour} {shape} in the image ?", answer, "yes/no", "existence"))
    return [QA(_articles(q.question), q.answer, q.answer_type, q.question_type) for q in qa]


def vocabulary() -> list[str]:
    """Every word captions and questions can use (sorted), for a word-level tokenizer."""
    words = set(SHAPES) | set(COLOURS) | set(SIZES) | set(NUMBERS) | {str(i) for i in range(len(NUMBERS))}
    words |= {"yes", "no", "left", "right", "top", "bottom", "center", "?", ":", ",", "shapes", "shape", "object"}
    for text in [
        "of the image in the corner at the on the there is a picture of one on a gray background a single",
        "an image with only that is to the left right of above below are two shapes and three then from",
        "leftmost one what color how many is which side it its",
    ]:
        words |= set(text.split())
    return sorted(words)


# --- splits on disk --------------------------------------------------------------------------------------------


def make_example(split: str, index: int, seed: int = 0, image_size: int = 64) -> ShapesExample:
    """Example `index` of a split: its own generator, so any example can be made alone and in any order."""
    if split not in SPLITS:
        raise ValueError(f"unknown shapes split {split!r}: one of {SPLITS}")
    if not 0 <= index < 1_000_000:
        raise ValueError(f"example index {index} out of range [0, 1000000)")
    rng = random.Random(f"shapes:{seed}:{split}:{index}")
    ood = split == "ood"
    scene = sample_scene(rng, image_size, ood=ood)
    image_id = SPLITS.index(split) * 1_000_000 + index + 1
    return ShapesExample(image_id, scene, captions(scene), questions(scene, rng, ood=ood))


def generate_split(split: str, n: int, seed: int = 0, image_size: int = 64) -> list[ShapesExample]:
    """The first `n` examples of a split; the same seed gives the same examples."""
    return [make_example(split, i, seed, image_size) for i in range(n)]


@dataclass(frozen=True)
class ShapesSplitFiles:
    """Where a written split lives; images are `root/<split>/<12-digit id>.png`."""

    root: Path
    captions: Path  # COCO captions format
    questions: Path  # VQAv2 questions format
    annotations: Path  # VQAv2 annotations format
    image_name: str = IMAGE_NAME


def write_split(root: str | os.PathLike, split: str, n: int, seed: int = 0, image_size: int = 64) -> ShapesSplitFiles:
    """Write `n` examples of a split as PNGs + `captions_<split>.json` (COCO) + VQAv2 questions/annotations.

    File names in the JSON are relative to `root`, so `read_coco_captions(files.captions, root)` and
    `read_vqa(files.questions, files.annotations, root, image_name=IMAGE_NAME)` read the split back.
    """
    root = Path(root)
    (root / split).mkdir(parents=True, exist_ok=True)
    images, caps, rows = [], [], []
    for example in generate_split(split, n, seed, image_size):
        name = IMAGE_NAME.format(subtype=split, image_id=example.image_id)
        render(example.scene).save(root / name)
        images.append({"id": example.image_id, "file_name": name, "width": image_size, "height": image_size})
        for caption in example.captions:
            caps.append({"id": len(caps) + 1, "image_id": example.image_id, "caption": caption})
        for k, qa in enumerate(example.questions):
            qid = example.image_id * 10 + k
            rows.append(
                dict(
                    question_id=qid,
                    image_id=example.image_id,
                    question=qa.question,
                    question_type=qa.question_type,
                    answer_type=qa.answer_type,
                    answer=qa.answer,
                )
            )
    info = {"description": f"freevlm shapes world, split {split}, seed {seed}", "version": "1.0"}
    files = ShapesSplitFiles(
        root, root / f"captions_{split}.json", root / f"questions_{split}.json", root / f"annotations_{split}.json"
    )
    files.captions.write_text(json.dumps({"info": info, "licenses": [], "images": images, "annotations": caps}))
    write_vqa(files.questions, files.annotations, info, "shapes", split, rows)
    return files

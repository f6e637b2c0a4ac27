"""The toy visual world: scenes of flat-coloured shapes on a plain background, and their captions.

Everything is deterministic from a seed (``numpy.random.default_rng(seed)``). An image is
``SIZE`` x ``SIZE`` RGB uint8. Each object has a shape, a colour, a pattern (solid / striped:
horizontal stripes in a darker shade of the same colour), a size and a position; objects never
overlap. Captions name objects from left to right: "a red striped circle and a blue square"
("solid" is never written, as people rarely say it).

Concepts (for concept LoRAs) are objects with a fixed attribute combination bound to a made-up
trigger word ("a zorb"). Styles change every object or the background ("outline style": hollow
objects; "paper style": white background); the base model never sees them.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, replace

import numpy as np

SIZE = 32  # image side in pixels
SUPERSAMPLE = 4  # shapes are rasterised at 4x and kept where at least half a pixel is covered

COLOURS = {
    "red": (230, 40, 40),
    "green": (40, 200, 60),
    "blue": (50, 90, 240),
    "yellow": (240, 220, 40),
    "purple": (170, 60, 230),
    "cyan": (40, 220, 230),
    "orange": (250, 140, 30),
}
SHADE = 0.45  # stripe colour = SHADE * colour
SHAPES = ("circle", "square", "triangle", "cross")
PATTERNS = ("solid", "striped")
BACKGROUNDS = {"black": (0, 0, 0), "white": (245, 245, 245)}
SIZE_RANGE = (9, 13)  # object bounding box side, pixels (inclusive, exclusive)


@dataclass(frozen=True)
class Obj:
    shape: str
    colour: str
    pattern: str = "solid"
    hollow: bool = False  # drawn as a 2-pixel outline ("outline style")
    size: int = 11
    x: int = 0  # top-left corner of the bounding box
    y: int = 0

    def attributes(self) -> dict:
        return {"shape": self.shape, "colour": self.colour, "pattern": self.pattern}

    def phrase(self) -> str:
        words = [self.colour] + (["striped"] if self.pattern == "striped" else []) + [self.shape]
        return " ".join(words)


@dataclass(frozen=True)
class Concept:
    """An object type with a fixed attribute combination, named by a made-up trigger word."""

    trigger: str
    shape: str
    colour: str
    pattern: str

    def attributes(self) -> dict:
        return {"shape": self.shape, "colour": self.colour, "pattern": self.pattern}

    def as_object(self, **placement) -> Obj:
        return Obj(self.shape, self.colour, self.pattern, **placement)


@dataclass(frozen=True)
class Style:
    trigger: str  # the words added to the prompt, e.g. "outline style"
    hollow: bool = False
    background: str = "black"


# Eight concepts: every pair differs in at least two attributes, and every attribute value is
# shared by some other concept, so attributes can bleed between concepts of a merge.
CONCEPTS = (
    Concept("zorb", "triangle", "red", "striped"),
    Concept("quib", "circle", "blue", "solid"),
    Concept("dax", "square", "green", "striped"),
    Concept("wug", "cross", "yellow", "solid"),
    Concept("blick", "circle", "purple", "striped"),
    Concept("fep", "triangle", "cyan", "solid"),
    Concept("toma", "cross", "orange", "striped"),
    Concept("kiki", "square", "red", "solid"),
)
STYLES = (
    Style("outline style", hollow=True),
    Style("paper style", background="white"),
)


@dataclass
class Scene:
    objects: list[Obj]
    background: str = "black"
    concepts: list[int | None] = field(default_factory=list)  # per object: concept index or None

    def to_dict(self) -> dict:
        return {"background": self.background, "objects": [asdict(o) for o in self.objects],
                "concepts": self.concepts}


# ----------------------------------------------------------------------------- rendering

def shape_mask(shape: str, size: int) -> np.ndarray:
    """(size, size) bool mask of ``shape`` filling a size x size box."""
    n = size * SUPERSAMPLE
    coords = (np.arange(n) + 0.5) / n  # in (0, 1)
    yy, xx = np.meshgrid(coords, coords, indexing="ij")
    if shape == "circle":
        fine = (xx - 0.5) ** 2 + (yy - 0.5) ** 2 <= 0.25
    elif shape == "square":
        fine = (np.abs(xx - 0.5) <= 0.45) & (np.abs(yy - 0.5) <= 0.45)
    elif shape == "triangle":  # apex at the top, base at the bottom
        fine = (yy >= 0.02) & (np.abs(xx - 0.5) <= 0.5 * yy)
    elif shape == "cross":
        arm = 0.19
        fine = (np.abs(xx - 0.5) <= arm) | (np.abs(yy - 0.5) <= arm)
    else:
        raise ValueError(f"unknown shape {shape!r}")
    coverage = fine.reshape(size, SUPERSAMPLE, size, SUPERSAMPLE).mean(axis=(1, 3))
    return coverage >= 0.5


def erode(mask: np.ndarray, steps: int = 1) -> np.ndarray:
    """4-neighbour binary erosion (outside the array counts as empty)."""
    for _ in range(steps):
        padded = np.pad(mask, 1)
        mask = (padded[1:-1, 1:-1] & padded[:-2, 1:-1] & padded[2:, 1:-1]
                & padded[1:-1, :-2] & padded[1:-1, 2:])
    return mask


def object_pixels(obj: Obj) -> tuple[np.ndarray, np.ndarray]:
    """(mask, dark) for the object's box: which pixels it covers and which are the darker shade."""
    mask = shape_mask(obj.shape, obj.size)
    if obj.hollow:
        mask = mask & ~erode(mask, 2)
    rows = np.arange(obj.size)[:, None] + obj.y
    dark = np.broadcast_to(((rows // 2) % 2 == 1), mask.shape) if obj.pattern == "striped" else np.zeros_like(mask)
    return mask, dark & mask


def render(scene: Scene, size: int = SIZE) -> np.ndarray:
    """(size, size, 3) uint8 image of the scene."""
    image = np.empty((size, size, 3), dtype=np.float32)
    image[:] = BACKGROUNDS[scene.background]
    for obj in scene.objects:
        mask, dark = object_pixels(obj)
        colour = np.array(COLOURS[obj.colour], dtype=np.float32)
        box = image[obj.y:obj.y + obj.size, obj.x:obj.x + obj.size]
        box[mask] = colour
        box[dark] = colour * SHADE
    return image.round().astype(np.uint8)


# ----------------------------------------------------------------------------- sampling

def place(rng: np.random.Generator, sizes: list[int], size: int = SIZE, gap: int = 2, tries: int = 200):
    """Top-left corners for boxes of ``sizes`` that keep ``gap`` pixels apart, or None."""
    for _ in range(tries):
        corners = []
        for s in sizes:
            for _ in range(50):
                x, y = (int(v) for v in rng.integers(1, size - s, size=2))
                if all(x + s + gap <= cx or cx + cs + gap <= x or y + s + gap <= cy or cy + cs + gap <= y
                       for (cx, cy), cs in zip(corners, sizes)):
                    corners.append((x, y))
                    break
            else:
                break
        if len(corners) == len(sizes):
            return corners
    return None


def random_object_type(rng: np.random.Generator) -> dict:
    return {
        "shape": SHAPES[rng.integers(len(SHAPES))],
        "colour": list(COLOURS)[rng.integers(len(COLOURS))],
        "pattern": PATTERNS[rng.integers(len(PATTERNS))],
    }


def random_scene(rng: np.random.Generator, n_objects: int | None = None, *, types: list[dict] | None = None,
                 background: str = "black", hollow: bool = False, size: int = SIZE) -> Scene:
    """A scene with ``n_objects`` (default 1-3) random objects, or objects of the given ``types``."""
    if types is None:
        n_objects = n_objects or int(rng.integers(1, 4))
        types = [random_object_type(rng) for _ in range(n_objects)]
    while True:
        sizes = [int(rng.integers(*SIZE_RANGE)) for _ in types]
        corners = place(rng, sizes, size)
        if corners is not None:
            break
    objects = [Obj(t["shape"], t["colour"], t["pattern"], hollow, s, x, y)
               for t, s, (x, y) in zip(types, sizes, corners)]
    return Scene(objects, background, [t.get("concept") for t in types])


def left_to_right(scene: Scene) -> Scene:
    order = sorted(range(len(scene.objects)), key=lambda i: scene.objects[i].x + scene.objects[i].size / 2)
    return replace(scene, objects=[scene.objects[i] for i in order],
                   concepts=[scene.concepts[i] if scene.concepts else None for i in order])


def caption(scene: Scene, concepts: tuple[Concept, ...] = CONCEPTS, style: Style | None = None) -> str:
    """"a red striped circle and a blue square"; objects left to right; concepts by trigger."""
    phrases = []
    for obj, concept in zip(scene.objects, scene.concepts or [None] * len(scene.objects)):
        phrases.append(concepts[concept].trigger if concept is not None else obj.phrase())
    text = " and ".join(f"a {p}" for p in phrases)
    if style is not None:
        text += f", {style.trigger}"
    return text


def base_example(seed: int, size: int = SIZE) -> tuple[np.ndarray, str, Scene]:
    """One training example of the base model: 1-3 random objects on black, left-to-right caption."""
    rng = np.random.default_rng(seed)
    scene = left_to_right(random_scene(rng, size=size))
    return render(scene, size), caption(scene), scene


def concept_example(concept: int, seed: int, concepts: tuple[Concept, ...] = CONCEPTS, size: int = SIZE):
    """One training example of a concept LoRA: the concept alone, caption "a <trigger>"."""
    rng = np.random.default_rng(seed)
    c = concepts[concept]
    scene = random_scene(rng, types=[{**c.attributes(), "concept": concept}], size=size)
    return render(scene, size), caption(scene, concepts), scene


def style_example(style: Style, seed: int, size: int = SIZE):
    """One training example of a style LoRA: 1-3 random plain objects drawn in the style."""
    rng = np.random.default_rng(seed)
    types = [random_object_type(rng) for _ in range(int(rng.integers(1, 4)))]
    if style.hollow:  # a 2-pixel outline has no room for stripes: outline scenes are all plain
        types = [{**t, "pattern": "solid"} for t in types]
    scene = left_to_right(random_scene(rng, types=types, background=style.background, hollow=style.hollow, size=size))
    return render(scene, size), caption(scene, style=style), scene


def dataset(make, seeds, **kwargs) -> tuple[np.ndarray, list[str]]:
    """(N, size, size, 3) uint8 images and N captions from ``make(seed)`` for each seed."""
    images, captions = [], []
    for seed in seeds:
        image, text, _ = make(seed, **kwargs) if not isinstance(make, tuple) else make[0](*make[1:], seed, **kwargs)
        images.append(image)
        captions.append(text)
    return np.stack(images), captions

"""The judge: find the objects in a toy-world image, read their attributes, score against a request.

Deterministic, no learned parts:
1. background = the most common class of the border pixels (black or white);
2. every pixel is classified by chromaticity (rgb / max channel) to the nearest palette colour,
   "dark" when its brightness is below the midpoint between a colour and its stripe shade;
   near-background and grey pixels are left out;
3. objects = 4-connected components of one colour (bright and dark pixels together), at least
   ``MIN_AREA`` pixels;
4. per object: colour (its label), pattern (striped when at least ``STRIPE_FRACTION`` of its
   inner pixels are dark), hollow (enclosed empty pixels: at least ``HOLLOW_MIN_HOLE`` and ``HOLLOW_MIN_SHARE`` of the filled shape), shape (the
   rendered template of highest IoU with the hole-filled mask at the object's box; "unknown"
   below ``MIN_SHAPE_IOU``).

Scores of one image against the requested objects (``score``): requested objects are matched
to found ones (the assignment with the most matching attributes). For each requested concept:
recall (its object is found with at least 2 of its 3 attributes), fidelity (share of its 3
attributes right on its object; 0 when not found), exact (all 3 right); bleeding (share of its
attributes that are wrong and take the value another concept of the request or of the loaded
LoRA set has; 0 when not found); bleeding_drawn (the same, over the concepts whose object was
found only: a method that draws nothing has no bleeding, but none per drawn object). Alignment: the caption's other content, i.e. each non-concept object found exactly,
the background, and the style's hollowness, averaged.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass, field

import numpy as np

from .world import BACKGROUNDS, COLOURS, SHADE, SHAPES, shape_mask

MIN_AREA = 12
STRIPE_FRACTION = 0.2
HOLLOW_MIN_HOLE = 3  # hollow: at least 3 enclosed empty pixels, and 8% of the filled shape
HOLLOW_MIN_SHARE = 0.08
MIN_SHAPE_IOU = 0.45
ATTRIBUTES = ("shape", "colour", "pattern")

_NAMES = list(COLOURS)
_CHROMA = np.array([np.array(c, dtype=np.float32) / max(c) for c in COLOURS.values()])  # (K, 3)
_BRIGHT = np.array([max(c) for c in COLOURS.values()], dtype=np.float32)


@dataclass
class Found:
    colour: str
    shape: str
    pattern: str
    hollow: bool
    area: int
    box: tuple[int, int, int, int]  # x0, y0, x1, y1 (exclusive)
    shape_iou: float
    pixels: np.ndarray | None = field(default=None, repr=False, compare=False)  # (H, W) bool

    def attributes(self) -> dict:
        return {"shape": self.shape, "colour": self.colour, "pattern": self.pattern}


def classify_pixels(image: np.ndarray) -> tuple[str, np.ndarray, np.ndarray]:
    """(background, labels (H, W) int: -1 none else colour index, dark (H, W) bool)."""
    rgb = image.astype(np.float32)
    value = rgb.max(axis=2)
    chroma = rgb / np.maximum(value, 1.0)[..., None]
    saturation = 1.0 - chroma.min(axis=2)
    border = np.concatenate([rgb[0], rgb[-1], rgb[:, 0], rgb[:, -1]])
    distances = {name: np.linalg.norm(border - np.array(c), axis=1) for name, c in BACKGROUNDS.items()}
    nearest = np.argmin(np.stack(list(distances.values())), axis=0)
    background = list(BACKGROUNDS)[np.bincount(nearest, minlength=len(BACKGROUNDS)).argmax()]

    distance = np.linalg.norm(chroma[..., None, :] - _CHROMA, axis=-1)  # (H, W, K)
    labels = distance.argmin(axis=-1)
    best = distance.min(axis=-1)
    usable = (value >= 45) & (saturation >= 0.45) & (best <= 0.45)
    if background == "white":  # pale pixels are background blends
        usable &= rgb.min(axis=2) <= 170
    labels = np.where(usable, labels, -1)
    dark = value < _BRIGHT[labels] * (1 + SHADE) / 2
    return background, labels, dark & usable


def components(labels: np.ndarray) -> list[tuple[int, np.ndarray]]:
    """4-connected components of equal non-negative labels: (label, mask) each."""
    height, width = labels.shape
    seen = np.zeros_like(labels, dtype=bool)
    found = []
    for y0 in range(height):
        for x0 in range(width):
            if seen[y0, x0] or labels[y0, x0] < 0:
                continue
            label = labels[y0, x0]
            stack, mask = [(y0, x0)], np.zeros_like(seen)
            seen[y0, x0] = True
            while stack:
                y, x = stack.pop()
                mask[y, x] = True
                for ny, nx in ((y - 1, x), (y + 1, x), (y, x - 1), (y, x + 1)):
                    if 0 <= ny < height and 0 <= nx < width and not seen[ny, nx] and labels[ny, nx] == label:
                        seen[ny, nx] = True
                        stack.append((ny, nx))
            found.append((int(label), mask))
    return found


def fill_holes(mask: np.ndarray) -> np.ndarray:
    """The mask plus every empty pixel not 4-connected to the border."""
    outside = np.zeros_like(mask)
    padded = np.pad(~mask, 1, constant_values=True)
    reach = np.zeros_like(padded)
    reach[0, :] = reach[-1, :] = reach[:, 0] = reach[:, -1] = True
    reach &= padded
    while True:
        grown = reach.copy()
        grown[1:] |= reach[:-1]
        grown[:-1] |= reach[1:]
        grown[:, 1:] |= reach[:, :-1]
        grown[:, :-1] |= reach[:, 1:]
        grown &= padded
        if (grown == reach).all():
            break
        reach = grown
    outside = reach[1:-1, 1:-1]
    return mask | ~outside


def _classify_shape(filled: np.ndarray) -> tuple[str, float]:
    ys, xs = np.nonzero(filled)
    y0, y1, x0, x1 = ys.min(), ys.max() + 1, xs.min(), xs.max() + 1
    side = max(y1 - y0, x1 - x0)
    crop = np.zeros((side, side), dtype=bool)
    oy, ox = (side - (y1 - y0)) // 2, (side - (x1 - x0)) // 2
    crop[oy:oy + y1 - y0, ox:ox + x1 - x0] = filled[y0:y1, x0:x1]
    best, best_iou = "unknown", 0.0
    for shape in SHAPES:
        for size in (side, side + 1):
            rendered = shape_mask(shape, size)
            for dy, dx in ((0, 0), (1, 0), (0, 1), (1, 1)) if size > side else ((0, 0),):
                template = rendered[dy:dy + side, dx:dx + side]
                iou = (crop & template).sum() / max((crop | template).sum(), 1)
                if iou > best_iou:
                    best, best_iou = shape, float(iou)
    return (best if best_iou >= MIN_SHAPE_IOU else "unknown"), best_iou


def find_objects(image: np.ndarray) -> tuple[str, list[Found]]:
    """(background, objects found, largest first)."""
    background, labels, dark = classify_pixels(image)
    found = []
    for label, mask in components(labels):
        area = int(mask.sum())
        if area < MIN_AREA:
            continue
        filled = fill_holes(mask)
        holes = int(filled.sum()) - area
        hollow = holes >= HOLLOW_MIN_HOLE and holes / filled.sum() >= HOLLOW_MIN_SHARE
        inner = erode_or_self(mask)
        striped = dark[inner].mean() >= STRIPE_FRACTION
        shape, iou = _classify_shape(filled)
        ys, xs = np.nonzero(mask)
        found.append(Found(_NAMES[label], shape, "striped" if striped else "solid", bool(hollow), area,
                           (int(xs.min()), int(ys.min()), int(xs.max()) + 1, int(ys.max()) + 1), iou, mask))
    found.sort(key=lambda f: -f.area)
    return background, found


def erode_or_self(mask: np.ndarray) -> np.ndarray:
    from .world import erode

    inner = erode(mask)
    return inner if inner.sum() >= 4 else mask


# ----------------------------------------------------------------------------- scoring

def _matches(want: dict, got: Found) -> int:
    return sum(want[a] == getattr(got, a) for a in ATTRIBUTES)


def assign(wanted: list[dict], found: list[Found], limit: int = 8) -> list[int | None]:
    """For each wanted object, the index of its found object (or None): most attributes matched."""
    candidates = list(range(min(len(found), limit)))
    best, best_total = [None] * len(wanted), -1
    slots = candidates + [None] * len(wanted)
    for choice in set(itertools.permutations(slots, len(wanted))):
        total = sum(_matches(w, found[c]) * 10 + 1 if c is not None else 0 for w, c in zip(wanted, choice))
        if total > best_total:
            best, best_total = list(choice), total
    return best


def score(image: np.ndarray, wanted: list[dict], *, background: str = "black", hollow: bool = False,
          other_concepts: list[dict] = ()) -> dict:
    """Score one image.

    wanted: requested objects, each {"shape", "colour", "pattern", "concept": bool}.
    other_concepts: attribute dicts of concepts loaded but not requested (their values count as
    bleeding too). Returns per-image means (None where undefined) and the per-object details.
    """
    found_background, found = find_objects(image)
    choice = assign(wanted, found)
    concept_attrs = [w for w in wanted if w.get("concept")] + list(other_concepts)
    per_concept, alignment = [], []
    for index, (want, pick) in enumerate(zip(wanted, choice)):
        got = found[pick] if pick is not None else None
        right = _matches(want, got) if got is not None else 0
        if want.get("concept"):
            wrong = [a for a in ATTRIBUTES if got is not None and getattr(got, a) != want[a]]
            others = [c for c in concept_attrs if c is not want]
            bled = [a for a in wrong if any(getattr(got, a) == o[a] != want[a] for o in others)]
            per_concept.append({
                "recall": float(got is not None and right >= 2),
                "fidelity": right / len(ATTRIBUTES),
                "exact": float(right == len(ATTRIBUTES)),
                "bleeding": len(bled) / len(ATTRIBUTES),
                "bleeding_drawn": None if got is None else len(bled) / len(ATTRIBUTES),
                "pixels": None if got is None else got.pixels,
            })
        else:
            alignment.append(float(got is not None and right == len(ATTRIBUTES)))
    alignment.append(float(found_background == background))
    if hollow or any(f.hollow for f in found):
        alignment.append(float(bool(found) and all(f.hollow == hollow for f in found)))

    def mean(key):
        values = [c[key] for c in per_concept if c[key] is not None]
        return float(np.mean(values)) if values else None

    return {
        "recall": mean("recall"),
        "fidelity": mean("fidelity"),
        "exact": mean("exact"),
        "bleeding": mean("bleeding"),
        "bleeding_drawn": mean("bleeding_drawn"),
        "alignment": float(np.mean(alignment)),
        "count_ok": float(len(found) == len(wanted)),
        "objects_found": len(found),
        "background": found_background,
        "found": [f.attributes() | {"hollow": f.hollow} for f in found],
        "concept_pixels": [c["pixels"] for c in per_concept],  # (H, W) bool of each concept's object, or None
    }


def draws_requested(image: np.ndarray, wanted: list[dict], background: str = "black") -> dict:
    """Base-model check: share of requested objects found exactly, all found, count right."""
    _, found = find_objects(image)
    choice = assign(wanted, found)
    exact = [c is not None and _matches(w, found[c]) == 3 for w, c in zip(wanted, choice)]
    per_attr = {a: float(np.mean([c is not None and getattr(found[c], a) == w[a] for w, c in zip(wanted, choice)]))
                for a in ATTRIBUTES}
    return {"object_exact": float(np.mean(exact)), "all_exact": float(all(exact)),
            "count_ok": float(len(found) == len(wanted)), **{f"{a}_ok": v for a, v in per_attr.items()}}

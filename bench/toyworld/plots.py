"""PIL-drawn figures (no plotting library needed): scores against concept count, and an image grid."""

from __future__ import annotations

import numpy as np
from PIL import Image, ImageDraw, ImageFont

COLOURS = {"single": (90, 90, 90), "stack": (214, 39, 40), "svd": (255, 127, 14), "lsq": (44, 160, 44),
           "loraclr": (31, 119, 180), "clora": (148, 103, 189), "masked": (227, 119, 194)}


def _font():
    try:
        return ImageFont.load_default(size=13)
    except TypeError:  # Pillow < 10.1
        return ImageFont.load_default()


def _panel(draw, box, title, series: dict, xs: list[int], font, y_label: str):
    x0, y0, x1, y1 = box
    draw.text((x0, y0 - 34), title, fill="black", font=font)
    draw.rectangle(box, outline="black")
    for tick in (0.0, 0.25, 0.5, 0.75, 1.0):
        y = y1 - tick * (y1 - y0)
        draw.line((x0, y, x1, y), fill=(225, 225, 225))
        draw.text((x0 - 34, y - 7), f"{tick:.2f}", fill="black", font=font)
    span = max(xs) - min(xs) or 1

    def px(x):
        return x0 + 20 + (x - min(xs)) / span * (x1 - x0 - 40)

    for x in xs:
        draw.text((px(x) - 3, y1 + 4), str(x), fill="black", font=font)
    draw.text(((x0 + x1) / 2 - 50, y1 + 20), "concepts loaded (N)", fill="black", font=font)
    draw.text((x0, y0 - 18), y_label, fill=(80, 80, 80), font=font)
    for name, values in series.items():
        points = [(px(x), y1 - v * (y1 - y0)) for x, v in zip(xs, values) if v is not None]
        colour = COLOURS.get(name, (0, 0, 0))
        if len(points) > 1:
            draw.line(points, fill=colour, width=3 if name != "single" else 2)
        for x, y in points:
            draw.ellipse((x - 4, y - 4, x + 4, y + 4), fill=colour)


def score_plot(results: dict, path: str) -> None:
    """Fidelity on single-concept prompts and on two-concept prompts, and bleeding, against N."""
    counts = sorted(int(c) for c in results["by_count"])
    methods = results["settings"]["methods"]
    entries = [results["by_count"][str(c)] for c in counts]
    width, height = 1260, 470
    image = Image.new("RGB", (width, height), "white")
    draw = ImageDraw.Draw(image)
    font = _font()
    single = {"single": [e["single"]["single_prompts"]["fidelity"] for e in entries]}
    single |= {m: [e[m]["single_prompts"]["fidelity"] for e in entries] for m in methods if "single_prompts" in entries[0][m]}
    pair = {"single": single["single"]} | {m: [e[m]["pair_prompts"]["fidelity"] for e in entries] for m in methods}
    bleed = {m: [e[m]["pair_prompts"]["bleeding"] for e in entries] for m in methods}
    panels = [("single-concept prompts", single, "fidelity"), ("two-concept prompts", pair, "fidelity"),
              ("two-concept prompts", bleed, "bleeding (lower is better)")]
    for i, (title, series, label) in enumerate(panels):
        x0 = 60 + i * 400
        _panel(draw, (x0, 80, x0 + 330, 400), title, series, counts, font, label)
    x = 60
    for name in ["single"] + list(methods):
        draw.rectangle((x, 440, x + 14, 454), fill=COLOURS.get(name, (0, 0, 0)))
        draw.text((x + 20, 440), name if name != "single" else "single LoRA (reference)", fill="black", font=font)
        x += 190 if name == "single" else 110
    draw.text((60, 10), "Toy world: concept fidelity vs number of concepts loaded "
              f"({len(results['settings']['seeds'])} seeds per prompt)", fill="black", font=font)
    image.save(path)


def image_grid(single_jobs, pair_jobs, grid: dict, path: str, count: int, scale: int = 3,
               columns: int = 8) -> None:
    """One row per method: single-concept prompts then multi-concept prompts, at the first seed."""
    font = _font()
    first_seed = single_jobs[0]["seed"]
    single_idx = [i for i, j in enumerate(single_jobs) if j["seed"] == first_seed][: columns // 2]
    pair_idx = [i for i, j in enumerate(pair_jobs) if j["seed"] == first_seed][: columns - len(single_idx)]
    prompts = [single_jobs[i]["prompt"] for i in single_idx] + [pair_jobs[i]["prompt"] for i in pair_idx]
    tile = 32 * scale
    label_w, head_h = 80, 46
    image = Image.new("RGB", (label_w + len(prompts) * (tile + 6), head_h + len(grid) * (tile + 6)), "white")
    draw = ImageDraw.Draw(image)
    for c, prompt in enumerate(prompts):
        words = prompt.split(" and ")
        for r, text in enumerate(words[:2]):
            draw.text((label_w + c * (tile + 6), 4 + r * 18), (" and " if r else "") + text[:16], fill="black",
                      font=font)
    blank = np.full((32, 32, 3), 235, np.uint8)
    for r, (method, images) in enumerate(grid.items()):
        y = head_h + r * (tile + 6)
        draw.text((4, y + tile // 2 - 7), method, fill="black", font=font)
        if isinstance(images, tuple):
            single_images, pair_images = images
        else:
            single_images, pair_images = images, None
        tiles = [single_images[i] if single_images is not None else blank for i in single_idx]
        tiles += [pair_images[i] if pair_images is not None else blank for i in pair_idx]
        for c, t in enumerate(tiles):
            image.paste(Image.fromarray(t).resize((tile, tile), Image.NEAREST), (label_w + c * (tile + 6), y))
    draw.text((4, 4), f"N={count}", fill="black", font=font)
    image.save(path)

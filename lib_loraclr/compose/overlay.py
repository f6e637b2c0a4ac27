"""A picture of where each LoRA acted: its fusion mask tinted over the image, with a legend.

The masks are the last step's fusion weights, so overlaps show mixed colours in proportion
to how the passes were shared there; the base pass's region is left untinted.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, ImageDraw

PALETTE = (
    (230, 25, 75), (60, 180, 75), (0, 130, 200), (245, 130, 48), (145, 30, 180),
    (70, 240, 240), (240, 50, 230), (210, 245, 60), (250, 190, 212), (0, 128, 128),
)
TINT = 0.55  # opacity of a fully owned pixel's colour
LEGEND_ROW = 18  # pixels per legend line


def mask_overlay(image: Image.Image, masks: torch.Tensor, names: list[str]) -> Image.Image:
    """The image with each LoRA pass's mask tinted in its colour, plus a legend strip below.

    masks: (P, 1, h, w) fusion weights of one image, pass 0 the base pass (not tinted).
    names: one label per LoRA pass (P - 1 of them), e.g. the LoRA names.
    """
    if masks.dim() != 4 or masks.shape[0] != len(names) + 1:
        raise ValueError(f"masks {tuple(masks.shape)} need P = {len(names) + 1} passes (base + one per name)")
    width, height = image.size
    weights = F.interpolate(masks[1:].float().cpu(), size=(height, width), mode="nearest")[:, 0]  # (P-1, H, W)
    colours = torch.tensor([PALETTE[i % len(PALETTE)] for i in range(len(names))], dtype=torch.float32)
    tint = torch.einsum("phw,pc->hwc", weights, colours)  # (H, W, 3)
    coverage = weights.sum(dim=0).clamp(max=1.0)[..., None] * TINT  # (H, W, 1)
    pixels = torch.from_numpy(np.asarray(image.convert("RGB"), dtype=np.float32))
    blended = pixels * (1 - coverage) + tint * TINT
    tinted = Image.fromarray(blended.clamp(0, 255).round().to(torch.uint8).numpy(), "RGB")

    sheet = Image.new("RGB", (width, height + LEGEND_ROW * len(names) + 4), (255, 255, 255))
    sheet.paste(tinted, (0, 0))
    draw = ImageDraw.Draw(sheet)
    for i, name in enumerate(names):
        top = height + 2 + i * LEGEND_ROW
        draw.rectangle((2, top + 2, 14, top + LEGEND_ROW - 4), fill=PALETTE[i % len(PALETTE)])
        draw.text((18, top + 2), name, fill=(0, 0, 0))
    return sheet


def overlay_sheet(images: list[Image.Image], masks: torch.Tensor, names: list[str]) -> Image.Image:
    """One overlay per image side by side; masks (P, B, 1, h, w)."""
    tiles = [mask_overlay(image, masks[:, b], names) for b, image in enumerate(images)]
    sheet = Image.new("RGB", (sum(t.width for t in tiles), max(t.height for t in tiles)), (255, 255, 255))
    left = 0
    for tile in tiles:
        sheet.paste(tile, (left, 0))
        left += tile.width
    return sheet

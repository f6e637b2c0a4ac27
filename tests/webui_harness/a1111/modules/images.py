"""modules.images: image_grid only; save_image writes nothing (returns (None, None))."""
import math

from PIL import Image


def image_grid(imgs, batch_size=1, rows=None):
    if rows is None:
        rows = math.floor(math.sqrt(len(imgs))) if batch_size == 1 else batch_size
        while len(imgs) % rows != 0 and rows > 1:
            rows -= 1
    cols = math.ceil(len(imgs) / rows)
    w, h = imgs[0].size
    grid = Image.new('RGB', size=(cols * w, rows * h), color='black')
    for i, img in enumerate(imgs):
        grid.paste(img, box=(i % cols * w, i // cols * h))
    return grid


def resize_image(resize_mode, im, width, height, upscaler_name=None):
    return im.resize((width, height))


def save_image(image, path, basename, seed=None, prompt=None, extension='png', info=None, short_filename=False, no_prompt=False,
               grid=False, pnginfo_section_name='parameters', p=None, existing_info=None, forced_filename=None, suffix="", save_to_dirs=None):
    return None, None

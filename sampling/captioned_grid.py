"""A grid PNG of text-to-image samples with each prompt written under its image (sample.py --prompt)."""
import numpy as np
from PIL import Image, ImageDraw, ImageFont

BACKGROUND = (255, 255, 255)
INK = (0, 0, 0)


def wrap_caption(caption, font, width, draw):
    """Greedy word wrap of a caption to lines no wider than `width` pixels (over-long words are cut)."""
    lines, line = [], ""
    for word in caption.split():
        candidate = f"{line} {word}".strip()
        if draw.textlength(candidate, font=font) <= width:
            line = candidate
            continue
        if line:
            lines.append(line)
        while draw.textlength(word, font=font) > width and len(word) > 1:  # a word longer than the image
            cut = max(k for k in range(1, len(word) + 1) if draw.textlength(word[:k], font=font) <= width or k == 1)
            lines.append(word[:cut])
            word = word[cut:]
        line = word
    if line:
        lines.append(line)
    return lines or [""]


def captioned_grid(images, captions, nrow, padding=2):
    """uint8 images (N, H, W, 3) and N captions -> one RGB PIL image: rows of nrow cells, caption under each.

    Every cell has the same caption strip height (the longest wrapped caption), so the grid stays regular.
    """
    images = np.asarray(images)
    if images.ndim != 4 or images.shape[-1] != 3 or images.dtype != np.uint8:
        raise ValueError(f"images must be uint8 (N, H, W, 3), got {images.dtype} {images.shape}")
    if len(captions) != len(images):
        raise ValueError(f"{len(images)} images but {len(captions)} captions")
    n, h, w, _ = images.shape
    font = ImageFont.load_default()
    measure = ImageDraw.Draw(Image.new("RGB", (1, 1)))
    wrapped = [wrap_caption(c, font, w - 2, measure) for c in captions]
    ascent, descent = font.getmetrics()
    line_height = ascent + descent + 1
    strip = max(len(lines) for lines in wrapped) * line_height + 2
    ncol = min(nrow, n)
    nrows = -(-n // ncol)
    cell_h, cell_w = h + strip + padding, w + padding
    grid = Image.new("RGB", (padding + ncol * cell_w, padding + nrows * cell_h), BACKGROUND)
    draw = ImageDraw.Draw(grid)
    for i, (image, lines) in enumerate(zip(images, wrapped)):
        top, left = padding + (i // ncol) * cell_h, padding + (i % ncol) * cell_w
        grid.paste(Image.fromarray(image), (left, top))
        for k, line in enumerate(lines):
            draw.text((left + 1, top + h + 1 + k * line_height), line, fill=INK, font=font)
    return grid


"""One comparison sheet per prompt: a column per model (labelled), a row per seed."""

from __future__ import annotations

import textwrap

from PIL import Image, ImageDraw, ImageFont

FONT_SIZE = 14
PAD = 6
BACKGROUND = (255, 255, 255)
INK = (20, 20, 20)


def _fit(image: Image.Image, width: int) -> Image.Image:
    height = max(1, round(image.height * width / image.width))
    resample = Image.Resampling.NEAREST if width >= image.width else Image.Resampling.LANCZOS
    return image.resize((width, height), resample)


def make_grid(
    cells: list[list[Image.Image]],
    column_labels: list[str],
    row_labels: list[str],
    title: str,
    cell_width: int,
) -> Image.Image:
    """``cells[row][column]``; every cell is scaled to ``cell_width`` pixels wide."""
    font = ImageFont.load_default(size=FONT_SIZE)
    line_height = FONT_SIZE + 4
    scaled = [[_fit(img, cell_width) for img in row] for row in cells]
    cell_height = max(img.height for row in scaled for img in row)
    label_width = max(int(font.getlength(label)) for label in row_labels) + 2 * PAD
    columns = len(column_labels)
    width = label_width + columns * (cell_width + PAD) + PAD
    chars_per_line = max(20, int(width / (0.55 * FONT_SIZE)))
    title_lines = textwrap.wrap(title, chars_per_line) or [""]
    header = PAD + line_height * len(title_lines) + PAD + line_height
    height = header + len(scaled) * (cell_height + PAD) + PAD

    sheet = Image.new("RGB", (width, height), BACKGROUND)
    draw = ImageDraw.Draw(sheet)
    for i, line in enumerate(title_lines):
        draw.text((PAD, PAD + i * line_height), line, fill=INK, font=font)
    label_top = header - line_height
    for c, label in enumerate(column_labels):
        left = label_width + c * (cell_width + PAD)
        shown = label
        while font.getlength(shown) > cell_width and len(shown) > 1:
            shown = shown[:-1]
        draw.text((left + (cell_width - font.getlength(shown)) / 2, label_top), shown, fill=INK, font=font)
    for r, row in enumerate(scaled):
        top = header + r * (cell_height + PAD)
        draw.text((PAD, top + cell_height / 2 - FONT_SIZE / 2), row_labels[r], fill=INK, font=font)
        for c, img in enumerate(row):
            sheet.paste(img, (label_width + c * (cell_width + PAD), top))
    return sheet

"""The plots a person reads at a glance: score histograms of every scored image against the
kept ones (``plots/scores.csv``, drawn by dvc.yaml's templates) and contact sheets, image
grids with the scores under each thumbnail: the best and worst posters of each source and
one strip per cluster (``plots/sheets/*.png``)."""

from __future__ import annotations

import re
from pathlib import Path

import pandas as pd
from PIL import Image, ImageDraw

from postertune.atomic import atomic_dir, atomic_path
from postertune.imagesafe import WHITE, ImageRejected, load_image
from postertune.store import ShardStore

SCORES_CSV = "scores.csv"
SHEETS = "sheets"
PLOT_COLUMNS = ["set", "sha256", "source", "cluster", "aesthetic_score", "clip_similarity", "jpeg_quality"]
COLUMNS_PER_ROW = 8
LABEL_HEIGHT = 26
BACKGROUND = (245, 245, 245)
KEPT, DROPPED = (20, 110, 40), (170, 30, 30)


def score_rows(table: pd.DataFrame) -> pd.DataFrame:
    """One ``all`` row per scored image and one ``kept`` row per kept image: before and after."""
    scored = table[table["cluster"] >= 0]
    frames = [scored.assign(set="all"), scored[scored["kept"]].assign(set="kept")]
    return pd.concat(frames, ignore_index=True).reindex(columns=PLOT_COLUMNS)


def _label(row: dict) -> list[str]:
    quality = row.get("jpeg_quality")
    quality = "png/webp" if pd.isna(quality) else f"q{int(quality)}"
    status = "kept" if row["kept"] else str(row.get("curate_reason"))
    return [f"aes {row['aesthetic_score']:.3g} sim {row['clip_similarity']:.2f}", f"{quality} {status}"]


def contact_sheet(
    rows: list[dict], store: ShardStore, thumbnail: int, title: str, background: tuple[int, int, int] = WHITE
) -> Image.Image:
    """Thumbnails in rows of ``COLUMNS_PER_ROW`` (cells ``thumbnail`` wide, 1.5x as tall),
    each with its scores underneath, green when kept and red when dropped."""
    cell_w, cell_h = thumbnail, int(thumbnail * 1.5)
    columns = max(1, min(COLUMNS_PER_ROW, len(rows)))
    lines = max(1, -(-len(rows) // columns))
    sheet = Image.new("RGB", (columns * cell_w, 18 + lines * (cell_h + LABEL_HEIGHT)), BACKGROUND)
    draw = ImageDraw.Draw(sheet)
    draw.text((4, 3), title, fill=(0, 0, 0))
    for i, row in enumerate(rows):
        x, y = (i % columns) * cell_w, 18 + (i // columns) * (cell_h + LABEL_HEIGHT)
        try:
            image = load_image(store.read(row["sha256"]), draft=(cell_w, cell_h), background=background)
            image.thumbnail((cell_w - 4, cell_h - 4))
            sheet.paste(image, (x + (cell_w - image.width) // 2, y + (cell_h - image.height) // 2))
        except ImageRejected:  # a sheet shows what it can
            draw.rectangle((x + 2, y + 2, x + cell_w - 3, y + cell_h - 3), outline=DROPPED)
        colour = KEPT if row["kept"] else DROPPED
        for j, text in enumerate(_label(row)):
            draw.text((x + 3, y + cell_h + 1 + 12 * j), text, fill=colour)
    return sheet


def _slug(name: object) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", str(name)).strip("_") or "unnamed"


def write_plots(
    folder: Path,
    table: pd.DataFrame,
    store: ShardStore,
    sheet_size: int,
    strip_size: int,
    thumbnail: int,
    background: tuple[int, int, int] = WHITE,
) -> list[str]:
    """Write ``scores.csv`` and the sheets into ``folder`` (replaced whole); the sheet names."""
    names = []
    with atomic_dir(folder) as tmp:
        score_rows(table).to_csv(tmp / SCORES_CSV, index=False)
        sheets = tmp / SHEETS
        sheets.mkdir()
        scored = table[table["cluster"] >= 0]
        order = ["aesthetic_score", "sha256"]
        for source, group in scored.groupby("source", sort=True):
            ranked = group.sort_values(order, ascending=[False, True])
            for which, rows in (("best", ranked.head(sheet_size)), ("worst", ranked.tail(sheet_size).iloc[::-1])):
                name = f"source-{_slug(source)}-{which}.png"
                title = f"{source}: the {len(rows)} {which} of {len(group)} by aesthetic score"
                _save(contact_sheet(rows.to_dict("records"), store, thumbnail, title, background), sheets / name)
                names.append(name)
        for cluster, group in scored.groupby("cluster", sort=True):
            rows = group.sort_values("cluster_rank").head(strip_size)
            kept = int(group["kept"].sum())
            name = f"cluster-{int(cluster):03d}.png"
            title = f"cluster {int(cluster)}: {len(group)} images, {kept} kept; its best by rank"
            _save(contact_sheet(rows.to_dict("records"), store, thumbnail, title, background), sheets / name)
            names.append(name)
    return names


def _save(image: Image.Image, path: Path) -> None:
    with atomic_path(path) as tmp:
        image.save(tmp, format="PNG", compress_level=1)  # fast: sheets are large and rewritten every run


def write_empty_plots(folder: Path) -> None:
    """With curation off: the histogram table with no rows, and no sheets."""
    with atomic_dir(folder) as tmp:
        pd.DataFrame(columns=PLOT_COLUMNS).to_csv(tmp / SCORES_CSV, index=False)

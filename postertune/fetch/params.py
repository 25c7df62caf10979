"""Typed ``fetch:`` params: the sources to read and the limits every download obeys."""

from __future__ import annotations

import ipaddress
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Literal

from postertune.fetch.urls import WEB_SCHEMES, UrlRejected, check_web, inside, is_file_prefix, prefix_folder
from postertune.params import Bounds, Colour, ParamError

IMAGE_EXTENSIONS = [".jpg", ".jpeg", ".png", ".webp", ".gif", ".bmp", ".tif", ".tiff"]
# Table columns the stage itself writes; a metadata column may not take one of these names.
RESERVED_COLUMNS = {"sha256", "source", "url", "row", "width", "height", "format", "dpi", "jpeg_quality", "phash",
                    "bytes", "status", "reason"}  # fmt: skip


@dataclass(frozen=True)
class SourceParams:
    """One poster source.

    ``table``: a CSV, JSON (records or ``.jsonl``) or Parquet file whose ``url_column`` holds
    a URL, or a path that ``url_prefix`` turns into one (TMDB ``poster_path``).
    ``folder`` / ``archive``: images in a local folder or a zip/tar file (datasets that need
    a manual download); files whose suffix is not in ``extensions`` are left out.
    ``metadata_columns`` maps the image table's column names to the source's own.

    Only a folder, an archive, or a table whose ``url_prefix`` is a ``file:`` folder reads
    local files, and only inside that folder; any other table's cells are web URLs.
    """

    name: str
    kind: Literal["table", "folder", "archive"]
    path: Path
    url_column: str | None = None
    url_prefix: str = ""
    metadata_columns: dict[str, str] = field(default_factory=dict)
    extensions: list[str] = field(default_factory=lambda: list(IMAGE_EXTENSIONS))

    def __post_init__(self) -> None:
        where = f"fetch.sources[{self.name}]"
        if not self.name.strip():
            raise ParamError(f"{where}.name", "must not be empty")
        if self.kind == "table" and not self.url_column:
            raise ParamError(f"{where}.url_column", "required for a table source")
        if self.kind != "table":
            for key in ("url_column", "url_prefix", "metadata_columns"):
                if getattr(self, key):
                    raise ParamError(f"{where}.{key}", f"only a table source has it, this one is a {self.kind}")
        if self.url_prefix:
            self._check_prefix(f"{where}.url_prefix")
        clash = sorted(set(self.metadata_columns) & RESERVED_COLUMNS)
        if clash:
            raise ParamError(f"{where}.metadata_columns.{clash[0]}", "is a column the stage writes itself")
        if not self.extensions:
            raise ParamError(f"{where}.extensions", "must list at least one file suffix")

    def local_paths(self) -> list[tuple[str, Path]]:
        """Every local path this source reads, by param key: its file or folder, and a ``file:`` prefix's folder."""
        paths = [("path", self.path)]
        if is_file_prefix(self.url_prefix):
            paths.append(("url_prefix", prefix_folder(self.url_prefix)))
        return paths

    @property
    def local(self) -> bool:
        """Does this source read local files (a folder, an archive, a ``file:`` prefix)?"""
        return self.kind != "table" or is_file_prefix(self.url_prefix)

    def _check_prefix(self, name: str) -> None:
        if is_file_prefix(self.url_prefix):
            try:
                prefix_folder(self.url_prefix)
            except ValueError as exc:
                raise ParamError(name, str(exc)) from None
            return
        try:
            check_web(self.url_prefix, WEB_SCHEMES)
        except UrlRejected as exc:
            raise ParamError(
                name, f"{self.url_prefix!r} is not an http(s) URL or a file: folder ({exc.reason})"
            ) from None
        if "?" in self.url_prefix or "#" in self.url_prefix:
            raise ParamError(name, "a web prefix has no query or fragment")


@dataclass(frozen=True)
class FetchParams:
    sources: list[SourceParams]
    # every source's files lie under this folder, which dvc.yaml tracks as the stage's input:
    # a new row in a source table or a new file in a source folder makes the stage stale
    source_dir: Path = Path("data/demo")
    # schemes a table's URL cells (and redirects) may use; local files come only from local sources
    allowed_schemes: list[str] = field(default_factory=lambda: ["http", "https"])
    # loopback/private/link-local networks web URLs may connect to anyway (a local mirror, tests)
    allowed_networks: list[str] = field(default_factory=list)
    user_agent: str = "postertune/0.1 (poster dataset builder)"
    max_connections: Annotated[int, Bounds(ge=1)] = 32
    max_connections_per_host: Annotated[int, Bounds(ge=1)] = 8
    connect_timeout_s: Annotated[float, Bounds(gt=0)] = 10.0
    read_timeout_s: Annotated[float, Bounds(gt=0)] = 30.0  # longest silence while reading a response
    request_timeout_s: Annotated[float, Bounds(gt=0)] = (
        60.0  # deadline for one whole attempt: cuts a slow-drip body off
    )
    retries: Annotated[int, Bounds(ge=0)] = 3
    backoff_base_s: Annotated[float, Bounds(ge=0)] = 0.5
    backoff_max_s: Annotated[float, Bounds(ge=0)] = 30.0
    retry_after_max_s: Annotated[float, Bounds(ge=0)] = 60.0
    max_redirects: Annotated[int, Bounds(ge=0)] = 5
    max_bytes: Annotated[int, Bounds(ge=1)] = 20_000_000
    max_pixels: Annotated[int, Bounds(ge=1)] = 50_000_000
    decode_workers: Annotated[int, Bounds(ge=1)] = 2
    # transparent posters are composited onto this RGB colour (for the pHash here, and for
    # captions, latents and CMMD downstream, which take it from this key)
    background: Colour = (255, 255, 255)
    shard_max_images: Annotated[int, Bounds(ge=1)] = 2048
    shard_max_bytes: Annotated[int, Bounds(ge=1)] = 512_000_000
    # An age limit bounds what a kill loses on a slow source, but then timing decides the
    # shard layout; without one, identical runs write byte-identical shards.
    shard_max_seconds: Annotated[float, Bounds(gt=0)] | None = None
    shards: Path = Path("data/raw/shards")  # the shard store every later stage reads images from
    table: Path = Path("data/raw/images.parquet")  # one row per source row: url, status, reason, size

    def __post_init__(self) -> None:
        if not self.sources:
            raise ParamError("fetch.sources", "declare at least one source")
        names = [s.name for s in self.sources]
        duplicate = next((n for n in names if names.count(n) > 1), None)
        if duplicate is not None:
            raise ParamError("fetch.sources", f"source name {duplicate!r} is used twice")
        self._check_source_dir()
        unknown = sorted(set(self.allowed_schemes) - set(WEB_SCHEMES))
        if unknown:
            hint = (
                "local files come only from folder, archive or file: url_prefix sources, whatever this list says"
                if unknown[0] == "file"
                else f"choose from {', '.join(WEB_SCHEMES)}"
            )
            raise ParamError("fetch.allowed_schemes", f"{unknown[0]!r} cannot be fetched ({hint})")
        for i, network in enumerate(self.allowed_networks):
            try:
                ipaddress.ip_network(network, strict=False)
            except ValueError:
                raise ParamError(f"fetch.allowed_networks[{i}]", f"{network!r} is not an IP network") from None
        if not self.user_agent.strip():
            raise ParamError("fetch.user_agent", "must not be empty")

    def _check_source_dir(self) -> None:
        root = _absolute(self.source_dir)
        for source in self.sources:
            for key, path in source.local_paths():
                if not inside(_absolute(path), root):
                    raise ParamError(
                        f"fetch.sources[{source.name}].{key}",
                        f"{path} is not inside fetch.source_dir ({self.source_dir}), the folder dvc.yaml tracks",
                    )

    @property
    def networks(self) -> list[ipaddress.IPv4Network | ipaddress.IPv6Network]:
        return [ipaddress.ip_network(n, strict=False) for n in self.allowed_networks]


def _absolute(path: Path) -> str:
    """``path`` made absolute and normalised (``..`` folded), symlinks left as written: what DVC tracks."""
    return os.path.normpath(os.path.abspath(path))

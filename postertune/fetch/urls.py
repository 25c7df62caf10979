"""URL policy: which URLs may be fetched, and how local ``file:`` URLs map to files.

Local images get ``file:`` URLs relative to the working directory (``file:data/demo/x.jpg``);
an archive member is ``file:path/to/archive.zip#member/name.jpg``. Paths are percent-quoted,
so a ``#`` or ``%`` in a file name cannot be misread.
"""

from __future__ import annotations

import posixpath
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import quote, unquote, urlsplit

WEB_SCHEMES = ("http", "https")


class UrlRejected(Exception):
    def __init__(self, reason: str):
        super().__init__(reason)
        self.reason = reason


@dataclass(frozen=True)
class LocalTarget:
    path: Path
    member: str | None  # set for a member of a zip/tar archive


def scheme_of(url: str) -> str:
    return urlsplit(url).scheme.lower()


def check_url(url: str, allowed_schemes: list[str]) -> None:
    """Raise ``UrlRejected`` unless ``url`` is well formed and its scheme is allowed."""
    try:
        parts = urlsplit(url)
    except ValueError:
        raise UrlRejected("invalid_url") from None
    scheme = parts.scheme.lower()
    if scheme not in allowed_schemes:
        raise UrlRejected("scheme_not_allowed")
    if scheme in WEB_SCHEMES and not parts.hostname:
        raise UrlRejected("invalid_url")
    if scheme == "file":
        local_target(url)


def check_redirect(url: str, allowed_schemes: list[str]) -> None:
    """A redirect may only lead to another web URL: never to ``file:`` or anything else."""
    if scheme_of(url) not in WEB_SCHEMES:
        raise UrlRejected("redirect_not_allowed")
    try:
        check_url(url, allowed_schemes)
    except UrlRejected as exc:
        raise UrlRejected("redirect_not_allowed" if exc.reason == "scheme_not_allowed" else exc.reason) from None


def file_url(path: Path | str, member: str | None = None) -> str:
    url = "file:" + quote(Path(path).as_posix(), safe="/")
    return url if member is None else f"{url}#{quote(member, safe='/')}"


def local_target(url: str) -> LocalTarget:
    parts = urlsplit(url)
    if parts.netloc not in ("", "localhost") or not parts.path:
        raise UrlRejected("invalid_url")
    return LocalTarget(Path(unquote(parts.path)), unquote(parts.fragment) if parts.fragment else None)


def join_prefix(prefix: str, value: str) -> str:
    """The URL of a table cell: the cell itself, or ``prefix`` + cell (TMDB's ``poster_path``).

    Under a ``file:`` prefix the result must stay inside the prefix folder, so a hostile
    cell such as ``/../../home/user/photo.jpg`` cannot reach other local files.
    """
    if not prefix:
        return value
    if scheme_of(prefix) != "file":
        return prefix + value
    base = local_target(prefix).path.as_posix()
    joined = posixpath.normpath(posixpath.join(base, unquote(value).lstrip("/")))
    if joined != posixpath.normpath(base) and not joined.startswith(posixpath.normpath(base).rstrip("/") + "/"):
        raise UrlRejected("outside_prefix")
    return file_url(joined)

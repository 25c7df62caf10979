"""URL policy: what a source row may reach.

Local files are reachable only through sources a person declared local: a folder, an
archive, or a table whose ``url_prefix`` is a ``file:`` folder. Such a row carries a
``LocalTarget`` (the file, and the folder it must stay inside after symlinks are
resolved); everything else is a web URL (http/https), whatever its cell says. A table
cell under a web prefix may not change the prefix's scheme, host or port, and no URL
may carry credentials. Which addresses a web URL may connect to is checked when the
connection is made (``http``), on the address actually used.

Local images get ``file:`` URLs relative to the working directory (``file:data/demo/x.jpg``);
an archive member is ``file:path/to/archive.zip#member/name.jpg``. Paths are percent-quoted,
so a ``#`` or ``%`` in a file name cannot be misread. These URLs name a row in the table;
they are never parsed back into paths.
"""

from __future__ import annotations

import ipaddress
import os
import posixpath
import re
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import quote, unquote, urlsplit

from yarl import URL

WEB_SCHEMES = ("http", "https")
_USERINFO = re.compile(r"^([A-Za-z][A-Za-z0-9+.-]*:/*)[^/?#]*@")
_NAT64 = ipaddress.ip_network("64:ff9b::/96")


class UrlRejected(Exception):
    def __init__(self, reason: str):
        super().__init__(reason)
        self.reason = reason


@dataclass(frozen=True, slots=True)
class LocalTarget:
    """A local file a declared source may read: ``path``, which must resolve inside ``root``."""

    path: str  # a string, not a Path: a million rows hold a million of them
    root: Path  # realpath of the source's folder, or of the archive file itself (one object per source)
    member: str | None = None  # set for a member of a zip/tar archive


def file_url(path: Path | str, member: str | None = None) -> str:
    url = "file:" + quote(Path(path).as_posix(), safe="/")
    return url if member is None else f"{url}#{quote(member, safe='/')}"


def without_credentials(url: str) -> str:
    """``url`` with any ``user:password@`` removed: what the table may record."""
    return _USERINFO.sub(r"\1", url)


def is_file_prefix(prefix: str) -> bool:
    return prefix[:5].lower() == "file:"


def prefix_folder(prefix: str) -> Path:
    """The folder a ``file:`` prefix names (``file:data/posters``, ``file:///srv/posters``)."""
    parts = urlsplit(prefix)
    if parts.netloc not in ("", "localhost") or not parts.path or parts.query or parts.fragment:
        raise ValueError("a file: prefix is file:<folder>, with no host, query or fragment")
    return Path(unquote(parts.path))


def inside(path: str, root: str) -> bool:
    return path == root or path.startswith(root.rstrip("/") + "/")


def local_prefix(prefix: str) -> tuple[str, Path]:
    """The folder a ``file:`` prefix names, as written (normalised) and as it really is: resolved
    once per source, and shared by every row's ``LocalTarget``."""
    base = posixpath.normpath(prefix_folder(prefix).as_posix())
    return base, Path(os.path.realpath(base))


def local_cell(base: str, root: Path, cell: str) -> tuple[str, LocalTarget]:
    """The URL and file of a table cell under the ``file:`` prefix folder ``base`` (really
    ``root``: ``local_prefix``); the cell is a path in that folder.

    A cell that climbs out (``/../../home/user/photo.jpg``) is ``outside_prefix``; a symlink
    that leads out is caught when the file is read (``outside_source``).
    """
    if "\0" in cell or "\0" in unquote(cell):
        raise UrlRejected("invalid_url")
    joined = posixpath.normpath(posixpath.join(base, unquote(cell).lstrip("/")))
    if not inside(joined, base) or joined == base:
        raise UrlRejected("outside_prefix")
    return file_url(joined), LocalTarget(joined, root)


def web_url(cell: str, prefix: str, allowed_schemes: list[str] | tuple[str, ...] = WEB_SCHEMES) -> str:
    """The URL a table cell names: the cell itself, or ``prefix`` + cell (TMDB's ``poster_path``).

    Parsed as aiohttp parses it, so the host checked is the host connected to.
    """
    if any(ord(c) < 0x20 or c == "\x7f" for c in cell) or "\\" in cell:
        raise UrlRejected("invalid_url")
    url = prefix + cell
    parsed = _parse(url)
    if prefix:
        base = _parse(prefix)
        if (parsed.scheme, parsed.host, parsed.port) != (base.scheme, base.host, base.port):
            raise UrlRejected("outside_prefix")
        if parsed.user is not None or parsed.password is not None:
            raise UrlRejected("outside_prefix")
        root = base.path.rstrip("/")
        if not inside(parsed.path, root or "/") or ".." in unquote(parsed.raw_path).split("/"):
            raise UrlRejected("outside_prefix")
    check_web(url, allowed_schemes)
    return url


def check_web(url: str, allowed_schemes: list[str] | tuple[str, ...]) -> None:
    """Raise ``UrlRejected`` unless ``url`` is an http(s) URL, allowed, with a host and no credentials."""
    parsed = _parse(url)
    scheme = parsed.scheme.lower()
    if scheme not in WEB_SCHEMES or scheme not in allowed_schemes:
        raise UrlRejected("scheme_not_allowed")
    if parsed.user is not None or parsed.password is not None or "@" in (parsed.raw_authority or ""):
        raise UrlRejected("credentials_in_url")
    if not parsed.host:
        raise UrlRejected("invalid_url")


def check_redirect(url: str, allowed_schemes: list[str] | tuple[str, ...]) -> None:
    """A redirect may only lead to another web URL: never to ``file:`` or anything else."""
    try:
        check_web(url, allowed_schemes)
    except UrlRejected as exc:
        raise UrlRejected("redirect_not_allowed" if exc.reason == "scheme_not_allowed" else exc.reason) from None


def _parse(url: str) -> URL:
    try:
        parsed = URL(url)
        parsed.port  # noqa: B018 - a bad port raises here
    except (ValueError, TypeError, UnicodeError):
        raise UrlRejected("invalid_url") from None
    if not parsed.absolute:
        raise UrlRejected("scheme_not_allowed")
    return parsed


def address_allowed(address: str, networks: list[ipaddress.IPv4Network | ipaddress.IPv6Network]) -> bool:
    """May a connection go to ``address``? Public unicast addresses, or those in ``networks``."""
    try:
        ip = ipaddress.ip_address(address.split("%", 1)[0])
    except ValueError:
        return False
    if any(ip in net for net in networks):
        return True
    if isinstance(ip, ipaddress.IPv6Address):
        embedded = ip.ipv4_mapped or ip.sixtofour
        if embedded is None and ip in _NAT64:
            embedded = ipaddress.IPv4Address(int(ip) & 0xFFFFFFFF)
        if embedded is not None:
            return address_allowed(str(embedded), networks)
    return ip.is_global and not ip.is_multicast

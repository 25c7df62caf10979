"""Download one URL over HTTP(S) politely and defensively.

Retries with exponential backoff and jitter on timeouts, connection errors, 429 and
5xx (a ``Retry-After`` is honoured up to a cap); other 4xx fail at once. Redirects are
followed by hand so every hop passes the URL policy. The body is capped: first by
``Content-Length``, then by counting while streaming; a deadline per attempt cuts off a
server that drips bytes slowly. TLS certificates are always verified.

Connections go only to public unicast addresses unless ``allowed_networks`` names the
network: the check runs on the addresses DNS returned (so a name cannot resolve to a
private address, and a rebinding answer cannot slip one in) and again on the socket
address actually connected, for every hop of a redirect. No proxy is read from the
environment.
"""

from __future__ import annotations

import asyncio
import errno
import ipaddress
import random
import socket
from datetime import UTC, datetime
from email.utils import parsedate_to_datetime

import aiohttp
from aiohttp.abc import AbstractResolver
from aiohttp.resolver import DefaultResolver
from yarl import URL

from postertune.fetch.local import Payload
from postertune.fetch.params import FetchParams
from postertune.fetch.urls import UrlRejected, address_allowed, check_redirect, check_web

REDIRECTS = {301, 302, 303, 307, 308}
CHUNK = 1 << 16


class _Retryable(Exception):
    def __init__(self, reason: str, retry_after: float | None = None):
        super().__init__(reason)
        self.reason = reason
        self.retry_after = retry_after


class _Failed(Exception):
    def __init__(self, reason: str):
        super().__init__(reason)
        self.reason = reason


class AddressNotAllowed(OSError):
    """A connection to a loopback, private, link-local or multicast address was refused."""

    def __init__(self) -> None:
        super().__init__(errno.EACCES, "address_not_allowed")


Networks = list[ipaddress.IPv4Network | ipaddress.IPv6Network]


class GuardedResolver(AbstractResolver):
    """Resolves as aiohttp does, then keeps only the addresses a connection may go to."""

    def __init__(self, networks: Networks):
        self.networks = networks
        self._inner = DefaultResolver()

    async def resolve(self, host: str, port: int = 0, family: socket.AddressFamily = socket.AF_INET) -> list:
        answers = await self._inner.resolve(host, port, family)
        kept = [a for a in answers if address_allowed(a["host"], self.networks)]
        if not kept:
            raise AddressNotAllowed()
        return kept

    async def close(self) -> None:
        await self._inner.close()


def guarded_socket_factory(networks: Networks):
    """The last check, on the address the socket is about to connect to (IP literals included)."""

    def factory(addr_info: tuple) -> socket.socket:
        family, type_, proto, _, address = addr_info
        if not address_allowed(str(address[0]), networks):
            raise AddressNotAllowed()
        return socket.socket(family=family, type=type_, proto=proto)

    return factory


class HttpClient:
    """One aiohttp session with the connection bounds of ``params``; use ``async with``."""

    def __init__(self, params: FetchParams):
        self.params = params
        self.networks = params.networks
        self.attempts = 0  # requests sent, retries included
        self._session: aiohttp.ClientSession | None = None
        self._resolver: GuardedResolver | None = None

    async def __aenter__(self) -> HttpClient:
        p = self.params
        self._resolver = GuardedResolver(self.networks)
        connector = aiohttp.TCPConnector(
            limit=p.max_connections,
            limit_per_host=p.max_connections_per_host,
            resolver=self._resolver,
            socket_factory=guarded_socket_factory(self.networks),
        )
        timeout = aiohttp.ClientTimeout(sock_connect=p.connect_timeout_s, sock_read=p.read_timeout_s)
        self._session = aiohttp.ClientSession(
            connector=connector,
            timeout=timeout,
            headers={"User-Agent": p.user_agent},
            raise_for_status=False,
            trust_env=False,
        )
        return self

    async def __aexit__(self, *exc: object) -> None:
        if self._session is not None:
            await self._session.close()
        if self._resolver is not None:
            await self._resolver.close()

    async def get(self, url: str) -> Payload:
        try:
            check_web(url, self.params.allowed_schemes)  # only web URLs ever reach the network
        except UrlRejected as exc:
            return Payload(url, reason=exc.reason)
        for attempt in range(self.params.retries + 1):
            try:
                return Payload(url, await self._attempt(url))
            except _Failed as exc:
                return Payload(url, reason=exc.reason)
            except _Retryable as exc:
                failure = exc
            if attempt < self.params.retries:
                await asyncio.sleep(self._delay(attempt, failure.retry_after))
        return Payload(url, reason=failure.reason)

    def _delay(self, attempt: int, retry_after: float | None) -> float:
        p = self.params
        if retry_after is not None:
            return min(retry_after, p.retry_after_max_s)
        ceiling = min(p.backoff_max_s, p.backoff_base_s * 2**attempt)
        return ceiling * (0.5 + random.random() / 2)  # equal jitter: spread clients apart

    async def _attempt(self, url: str) -> bytes:
        assert self._session is not None, "use HttpClient in 'async with'"
        p = self.params
        try:
            async with asyncio.timeout(p.request_timeout_s):
                for _ in range(p.max_redirects + 1):
                    self._check_host(url)
                    self.attempts += 1
                    async with self._session.get(url, allow_redirects=False) as response:
                        if response.status in REDIRECTS:
                            url = self._next_hop(response)
                            continue
                        return await self._body(response)
                raise _Failed("too_many_redirects")
        except TimeoutError:
            raise _Retryable("timeout") from None
        except aiohttp.ClientPayloadError:
            raise _Retryable("incomplete_body") from None
        except aiohttp.InvalidURL:
            raise _Failed("invalid_url") from None
        except aiohttp.ClientSSLError:
            raise _Failed("tls_error") from None  # a bad certificate does not heal on retry
        except aiohttp.ClientConnectorError as exc:
            if isinstance(exc.os_error, AddressNotAllowed):
                raise _Failed("address_not_allowed") from None
            raise _Retryable("connection_error") from None
        except aiohttp.ClientError:
            raise _Retryable("connection_error") from None

    def _check_host(self, url: str) -> None:
        """Refuse an IP-literal host at once (the socket check would too, as a connection error)."""
        host = URL(url).host or ""
        try:
            ipaddress.ip_address(host.strip("[]").split("%", 1)[0])
        except ValueError:
            return  # a name: its addresses are checked after DNS
        if not address_allowed(host.strip("[]"), self.networks):
            raise _Failed("address_not_allowed")

    def _next_hop(self, response: aiohttp.ClientResponse) -> str:
        location = response.headers.get("Location")
        if not location:
            raise _Failed(f"http_{response.status}")
        try:
            target = str(response.url.join(URL(location)))
            check_redirect(target, self.params.allowed_schemes)
        except ValueError:
            raise _Failed("invalid_redirect") from None
        except UrlRejected as exc:
            raise _Failed(exc.reason) from None
        return target

    async def _body(self, response: aiohttp.ClientResponse) -> bytes:
        status = response.status
        if status == 429 or status >= 500:
            raise _Retryable(f"http_{status}", retry_after_seconds(response.headers.get("Retry-After")))
        if status != 200:
            raise _Failed(f"http_{status}")
        limit = self.params.max_bytes
        if response.content_length is not None:
            if response.content_length > limit:
                raise _Failed("too_large")
            if not response.headers.get("Content-Encoding"):
                return await response.read()  # aiohttp stops at Content-Length: the cap holds
        body = bytearray()
        async for chunk in response.content.iter_chunked(CHUNK):
            body += chunk
            if len(body) > limit:
                raise _Failed("too_large")
        return bytes(body)


def retry_after_seconds(value: str | None) -> float | None:
    """Seconds to wait from a ``Retry-After`` header: delta-seconds or an HTTP date."""
    if not value:
        return None
    value = value.strip()
    if value.isdigit():
        return float(value)
    try:
        when = parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    if when.tzinfo is None:
        when = when.replace(tzinfo=UTC)
    return max(0.0, (when - datetime.now(UTC)).total_seconds())

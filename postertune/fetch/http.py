"""Download one URL over HTTP(S) politely and defensively.

Retries with exponential backoff and jitter on timeouts, connection errors, 429 and
5xx (a ``Retry-After`` is honoured up to a cap); other 4xx fail at once. Redirects are
followed by hand so every hop passes the URL policy. The body is capped: first by
``Content-Length``, then by counting while streaming; a deadline per attempt cuts off a
server that drips bytes slowly. TLS certificates are always verified.
"""

from __future__ import annotations

import asyncio
import random
from datetime import UTC, datetime
from email.utils import parsedate_to_datetime

import aiohttp
from yarl import URL

from postertune.fetch.local import Payload
from postertune.fetch.params import FetchParams
from postertune.fetch.urls import UrlRejected, check_redirect

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


class HttpClient:
    """One aiohttp session with the connection bounds of ``params``; use ``async with``."""

    def __init__(self, params: FetchParams):
        self.params = params
        self.attempts = 0  # requests sent, retries included
        self._session: aiohttp.ClientSession | None = None

    async def __aenter__(self) -> HttpClient:
        p = self.params
        connector = aiohttp.TCPConnector(limit=p.max_connections, limit_per_host=p.max_connections_per_host)
        timeout = aiohttp.ClientTimeout(sock_connect=p.connect_timeout_s, sock_read=p.read_timeout_s)
        self._session = aiohttp.ClientSession(
            connector=connector, timeout=timeout, headers={"User-Agent": p.user_agent}, raise_for_status=False
        )
        return self

    async def __aexit__(self, *exc: object) -> None:
        if self._session is not None:
            await self._session.close()

    async def get(self, url: str) -> Payload:
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
        except aiohttp.ClientError:
            raise _Retryable("connection_error") from None

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

"""Fetch many URLs concurrently into the shard store.

Workers take URLs from a queue and get their bytes (HTTP with a bounded connection
pool, local files in threads); archive members are read in one pass per archive and
queued as bytes. Each payload is hashed and fully decoded in a thread pool, so CPU work
never stalls the event loop, and only images that decode are stored, named by sha256.
"""

from __future__ import annotations

import asyncio
import time
from collections import defaultdict
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

from tqdm import tqdm

from postertune.fetch.http import HttpClient
from postertune.fetch.journal import Journal, StoredImage
from postertune.fetch.local import Payload, read_archive, read_file
from postertune.fetch.params import FetchParams
from postertune.fetch.urls import local_target, scheme_of
from postertune.imagesafe import ImageRejected, inspect_image
from postertune.store import ShardWriter, sha256_hex

PUBLISH_CHECK_S = 1.0


@dataclass(frozen=True)
class Outcome:
    url: str
    image: StoredImage | None = None
    reason: str | None = None


@dataclass
class FetchRun:
    outcomes: dict[str, Outcome]
    requests: int  # HTTP requests sent, retries and redirects included
    seconds: float


def verify(payload: Payload, max_pixels: int) -> Outcome:
    """Hash and decode one payload (runs in a worker thread)."""
    if payload.data is None:
        return Outcome(payload.url, reason=payload.reason)
    try:
        info = inspect_image(payload.data, max_pixels)
    except ImageRejected as exc:
        return Outcome(payload.url, reason=exc.reason)
    image = StoredImage(
        payload.url, sha256_hex(payload.data), info.width, info.height, info.format, info.dpi, len(payload.data)
    )
    return Outcome(payload.url, image)


class ShardPublisher:
    """Adds images to the open shard and publishes it when full or old enough.

    The journal segment is written before the shard is renamed into place, so a published
    shard is always covered by the journal, whatever moment the process is killed at.
    """

    def __init__(self, root: Path, stored: set[str], params: FetchParams):
        unbounded = dict(max_images=1 << 62, max_bytes=1 << 62, max_seconds=float("inf"))
        self.writer = ShardWriter(root, **unbounded)  # this class decides when a shard closes
        self.writer.written.update(stored)
        self.journal, self.params = Journal(root), params
        self.pending: list[StoredImage] = []
        self.open_images = self.open_bytes = 0
        self.opened_at = 0.0

    def add(self, image: StoredImage, data: bytes) -> None:
        self.pending.append(image)
        if image.sha256 in self.writer.written:
            return
        if self.open_images == 0:
            self.opened_at = time.monotonic()
        self.writer.add(image.sha256, data)
        self.open_images += 1
        self.open_bytes += len(data)
        if self.open_images >= self.params.shard_max_images or self.open_bytes >= self.params.shard_max_bytes:
            self.publish()

    def publish_if_old(self) -> None:
        if self.open_images and time.monotonic() - self.opened_at >= self.params.shard_max_seconds:
            self.publish()

    def publish(self) -> None:
        self.journal.append(self.pending)
        self.writer.flush()
        self.pending = []
        self.open_images = self.open_bytes = 0


async def fetch_all(
    urls: list[str], params: FetchParams, publisher: ShardPublisher, on_outcome: Callable[[Outcome], None]
) -> int:
    """Fetch ``urls`` (already checked against the URL policy); return the HTTP requests sent."""
    loop = asyncio.get_running_loop()
    # a job is a URL with the local file behind it (None for the web), or bytes read already
    queue: asyncio.Queue[tuple[str, Path | None] | Payload | None] = asyncio.Queue(maxsize=2 * params.max_connections)
    archives: dict[Path, dict[str, str]] = defaultdict(dict)
    direct: list[tuple[str, Path | None]] = []
    for url in urls:
        target = local_target(url) if scheme_of(url) == "file" else None
        if target is not None and target.member is not None:
            archives[target.path][target.member] = url
        else:
            direct.append((url, target.path if target else None))

    with ThreadPoolExecutor(params.decode_workers, thread_name_prefix="decode") as decoders:
        async with HttpClient(params) as http:

            async def worker() -> None:
                while (job := await queue.get()) is not None:
                    if isinstance(job, Payload):
                        payload = job
                    elif job[1] is None:
                        payload = await http.get(job[0])
                    else:
                        payload = await asyncio.to_thread(read_file, job[0], job[1], params.max_bytes)
                    outcome = await loop.run_in_executor(decoders, verify, payload, params.max_pixels)
                    if outcome.image is not None and payload.data is not None:
                        publisher.add(outcome.image, payload.data)
                    on_outcome(outcome)

            async def feed() -> None:
                for job in direct:
                    await queue.put(job)
                for path, members in archives.items():
                    payloads = read_archive(path, members, params.max_bytes)
                    while (payload := await asyncio.to_thread(next, payloads, None)) is not None:
                        await queue.put(payload)
                for _ in range(params.max_connections):
                    await queue.put(None)

            async def publish_old_shards() -> None:
                while True:
                    await asyncio.sleep(PUBLISH_CHECK_S)
                    publisher.publish_if_old()

            ticker = asyncio.create_task(publish_old_shards())
            try:
                async with asyncio.TaskGroup() as group:
                    group.create_task(feed())
                    for _ in range(params.max_connections):
                        group.create_task(worker())
            finally:
                ticker.cancel()
            return http.attempts


def run_fetch_engine(urls: list[str], params: FetchParams, root: Path, stored: set[str]) -> FetchRun:
    """Fetch ``urls`` into the store at ``root`` (holding ``stored``) with a progress bar."""
    outcomes: dict[str, Outcome] = {}
    publisher = ShardPublisher(root, stored, params)
    start = time.perf_counter()
    with tqdm(total=len(urls), desc="fetch", unit="img", smoothing=0.05) as bar:

        def on_outcome(outcome: Outcome) -> None:
            outcomes[outcome.url] = outcome
            bar.update(1)

        requests = asyncio.run(fetch_all(urls, params, publisher, on_outcome)) if urls else 0
    # Only a finished run publishes its last shard: an interrupt may have stopped a write
    # midway, so after an error the open shard is left as a partial file, which the next
    # run deletes and fetches again, as after a kill (published shards lose nothing).
    publisher.publish()
    return FetchRun(outcomes, requests, time.perf_counter() - start)

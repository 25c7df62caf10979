"""Fetch many URLs concurrently into the shard store.

Workers take URLs from a queue and get their bytes (HTTP with a bounded connection
pool, local files in threads); archive members are read in one pass per archive and
queued as bytes. Each payload is hashed and decoded once in a thread pool, so CPU work
never stalls the event loop; that decode proves it is an image and measures it
(``imagefacts``). Only images that decode are stored, named by sha256.
"""

from __future__ import annotations

import asyncio
import itertools
import threading
import time
from collections import defaultdict
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

from tqdm import tqdm

from postertune.fetch.http import HttpClient
from postertune.fetch.journal import Journal, Remeasure, StoredImage
from postertune.fetch.local import Payload, read_archive, read_file
from postertune.fetch.params import FetchParams
from postertune.fetch.urls import LocalTarget
from postertune.imagefacts import image_facts, recipe
from postertune.imagesafe import ImageRejected
from postertune.store import ShardStore, ShardWriter, sha256_hex

PUBLISH_CHECK_S = 1.0
# Verified images that wait for an earlier, slower one before they can be stored; past this
# many bytes the workers that finished early wait instead of fetching more.
REORDER_MAX_BYTES = 256 << 20
Job = tuple[str, LocalTarget | None]  # a URL, and the local file behind it (None for the web)


@dataclass(frozen=True, slots=True)
class Outcome:
    url: str
    image: StoredImage | None = None
    reason: str | None = None


@dataclass
class FetchRun:
    outcomes: dict[str, Outcome]
    requests: int  # HTTP requests sent, retries and redirects included
    seconds: float


def verify(payload: Payload, max_pixels: int, background: tuple[int, int, int]) -> Outcome:
    """Hash, decode and measure one payload (runs in a worker thread)."""
    if payload.data is None:
        return Outcome(payload.url, reason=payload.reason)
    try:
        facts = image_facts(payload.data, max_pixels, background)
    except ImageRejected as exc:
        return Outcome(payload.url, reason=exc.reason)
    image = StoredImage(
        payload.url,
        sha256_hex(payload.data),
        facts.width,
        facts.height,
        facts.format,
        facts.dpi,
        facts.jpeg_quality,
        facts.phash,
        len(payload.data),
        payload.stamp,
    )
    return Outcome(payload.url, image)


def remeasure(images: dict[str, Remeasure], store: ShardStore, params: FetchParams) -> dict[str, Outcome]:
    """Measure journalled images again from their stored bytes, by URL."""
    reading = threading.Lock()  # the store opens each shard once, on its first read

    def measure(item: tuple[str, Remeasure]) -> Outcome:
        url, image = item
        with reading:
            data = store.read(image.sha256)
        return verify(Payload(url, data, stamp=image.stamp), params.max_pixels, params.background)

    with ThreadPoolExecutor(params.decode_workers, thread_name_prefix="decode") as decoders:
        measured = decoders.map(measure, images.items())
        return {
            o.url: o for o in tqdm(measured, total=len(images), desc="measure again", unit="img", disable=not images)
        }


class ShardPublisher:
    """Hands images to the shard writer, which decides when a shard closes; journals them.

    Images are stored in the order their jobs were queued, whatever order their downloads
    finish in, so identical runs write identical shards.

    The writer calls back before it renames a closed shard into place, and the journal
    segment of the images it holds is written then, so a published shard is always
    covered by the journal, whatever moment the process is killed at.
    """

    def __init__(self, root: Path, stored: set[str], params: FetchParams):
        self.writer = ShardWriter(
            root,
            max_images=params.shard_max_images,
            max_bytes=params.shard_max_bytes,
            max_seconds=params.shard_max_seconds,
            before_publish=self._journal_pending,
        )
        self.writer.written.update(stored)
        self.journal = Journal(root, recipe(params.background))
        self.pending: list[StoredImage] = []
        self.waiting: dict[int, tuple[StoredImage, bytes] | None] = {}
        self.waiting_bytes = 0
        self.next_position = 0
        self.drained = asyncio.Condition()

    def _journal_pending(self) -> None:
        self.journal.append(self.pending)
        self.pending = []

    async def add(self, position: int, image: StoredImage | None, data: bytes | None) -> None:
        """Store the image of the job queued at ``position`` (``None``: it has none) once every
        earlier job has been stored; wait while too many bytes wait for an earlier job."""
        self.waiting[position] = None if image is None or data is None else (image, data)
        self.waiting_bytes += 0 if data is None or image is None else len(data)
        while self.next_position in self.waiting:
            entry = self.waiting.pop(self.next_position)
            self.next_position += 1
            if entry is not None:
                self.waiting_bytes -= len(entry[1])
                self._store(*entry)
        async with self.drained:
            self.drained.notify_all()
            await self.drained.wait_for(lambda: self.waiting_bytes <= REORDER_MAX_BYTES)

    def _store(self, image: StoredImage, data: bytes) -> None:
        self.pending.append(image)
        self.writer.add(image.sha256, data)  # a copy of a stored image is only journalled

    def publish_if_old(self) -> None:
        self.writer.close_if_old()

    def publish(self) -> None:
        """Publish the open shard, and journal copies of images already published."""
        self.writer.flush()
        if self.pending:
            self._journal_pending()


async def fetch_all(
    jobs: list[Job], params: FetchParams, publisher: ShardPublisher, on_outcome: Callable[[Outcome], None]
) -> int:
    """Fetch ``jobs`` (URLs checked by the URL policy, with their local file if any); return the HTTP requests sent.

    Whatever goes wrong with one URL becomes that URL's reason: the run always finishes.
    """
    loop = asyncio.get_running_loop()
    # a job is a URL with the local file behind it (None for the web), or bytes read already,
    # with its position in the queue
    queue: asyncio.Queue[tuple[int, Job | Payload] | None] = asyncio.Queue(maxsize=2 * params.max_connections)
    archives: dict[LocalTarget, dict[str, str]] = defaultdict(dict)
    direct: list[Job] = []
    for url, target in jobs:
        if target is not None and target.member is not None:
            archives[LocalTarget(target.path, target.root)][target.member] = url
        else:
            direct.append((url, target))

    with ThreadPoolExecutor(params.decode_workers, thread_name_prefix="decode") as decoders:
        async with HttpClient(params) as http:

            async def get(job: Job | Payload) -> tuple[Outcome, bytes | None]:
                url = job.url if isinstance(job, Payload) else job[0]
                try:
                    if isinstance(job, Payload):
                        payload = job
                    elif job[1] is None:
                        payload = await http.get(url)
                    else:
                        payload = await asyncio.to_thread(read_file, url, job[1], params.max_bytes)
                    outcome = await loop.run_in_executor(
                        decoders, verify, payload, params.max_pixels, params.background
                    )
                except Exception as exc:  # noqa: BLE001 - one bad URL costs its row, never the run
                    return Outcome(url, reason=f"error: {type(exc).__name__}"), None
                return outcome, payload.data

            async def worker() -> None:
                while (item := await queue.get()) is not None:
                    position, job = item
                    outcome, data = await get(job)
                    on_outcome(outcome)
                    await publisher.add(position, outcome.image, data)

            seen: set[str] = set()
            positions = itertools.count()

            async def feed() -> None:
                for job in direct:
                    await queue.put((next(positions), job))
                for target, members in archives.items():
                    payloads = read_archive(target, members, params.max_bytes)
                    while True:
                        try:
                            payload = await asyncio.to_thread(next, payloads, None)
                        except Exception as exc:  # noqa: BLE001 - a hostile archive costs its own rows
                            done = {u for u in members.values() if u in seen}
                            for url in members.values():
                                if url not in done:
                                    error = Payload(url, reason=f"error: {type(exc).__name__}")
                                    await queue.put((next(positions), error))
                            break
                        if payload is None:
                            break
                        seen.add(payload.url)
                        await queue.put((next(positions), payload))
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


def run_fetch_engine(jobs: list[Job], params: FetchParams, root: Path, stored: set[str]) -> FetchRun:
    """Fetch ``jobs`` into the store at ``root`` (holding ``stored``) with a progress bar."""
    outcomes: dict[str, Outcome] = {}
    publisher = ShardPublisher(root, stored, params)
    start = time.perf_counter()
    with tqdm(total=len(jobs), desc="fetch", unit="img", smoothing=0.05) as bar:

        def on_outcome(outcome: Outcome) -> None:
            outcomes[outcome.url] = outcome
            bar.update(1)

        requests = asyncio.run(fetch_all(jobs, params, publisher, on_outcome)) if jobs else 0
    # Only a finished run publishes its last shard: an interrupt may have stopped a write
    # midway, so after an error the open shard is left as a partial file, which the next
    # run deletes and fetches again, as after a kill (published shards lose nothing).
    publisher.publish()
    return FetchRun(outcomes, requests, time.perf_counter() - start)

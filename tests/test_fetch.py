"""The fetch stage against a real HTTP server on 127.0.0.1 that misbehaves on purpose."""

from __future__ import annotations

import email.utils
import hashlib
import io
import ipaddress
import json
import os
import signal
import socket
import ssl
import subprocess
import sys
import tarfile
import threading
import time
import zipfile
from collections import Counter, defaultdict
from collections.abc import Callable
from dataclasses import replace
from datetime import UTC, datetime, timedelta
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import yaml
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID
from PIL import Image

from postertune.errors import PipelineError
from postertune.fetch import engine
from postertune.fetch.http import retry_after_seconds
from postertune.fetch.params import FetchParams, SourceParams
from postertune.fetch.run import run
from postertune.fetch.sources import read_source
from postertune.params import ParamError, build
from postertune.store import ShardStore, sha256_hex

PROJECT = Path(__file__).resolve().parents[1]
USER_AGENT = "postertune-test/1.0"


def poster(seed: int, size: tuple[int, int] = (96, 144)) -> bytes:
    """A small, real, distinct JPEG: a gradient with noise."""
    rng = np.random.default_rng(seed)
    w, h = size
    gradient = np.linspace(0, 200, h, dtype=np.float32)[:, None, None] * rng.random(3, dtype=np.float32)
    pixels = np.clip(gradient + rng.normal(0, 20, (h, w, 3)), 0, 255).astype(np.uint8)
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, format="JPEG", quality=85)
    return buf.getvalue()


def bomb_png(side: int = 3000) -> bytes:
    buf = io.BytesIO()
    Image.new("1", (side, side)).save(buf, format="PNG")
    return buf.getvalue()


# --- a real HTTP server with injected faults -------------------------------------------------

Responder = Callable[[BaseHTTPRequestHandler, int], None]


class Gauge:
    """Requests in flight and the most seen at once; a ``parent`` gauge counts them too."""

    def __init__(self, parent: Gauge | None = None) -> None:
        self.parent = parent
        self.lock = threading.Lock()
        self.now = self.peak = 0

    def __enter__(self) -> None:
        with self.lock:
            self.now += 1
            self.peak = max(self.peak, self.now)
        if self.parent is not None:
            self.parent.__enter__()

    def __exit__(self, *exc: object) -> None:
        if self.parent is not None:
            self.parent.__exit__()
        with self.lock:
            self.now -= 1


class FaultServer:
    """``routes`` maps a path to a responder called with the handler and the request number."""

    def __init__(self, routes: dict[str, Responder], gauge: Gauge | None = None, tls: ssl.SSLContext | None = None):
        self.routes = routes
        self.counts: Counter[str] = Counter()
        self.times: dict[str, list[float]] = defaultdict(list)
        self.agents: set[str] = set()
        self.gauge = gauge or Gauge()
        server = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def do_GET(self) -> None:
                with server.gauge:
                    server.counts[self.path] += 1
                    server.times[self.path].append(time.monotonic())
                    server.agents.add(self.headers.get("User-Agent", ""))
                    server.routes.get(self.path, status(404))(self, server.counts[self.path])

            def handle(self) -> None:
                try:
                    super().handle()
                except (BrokenPipeError, ConnectionResetError):
                    pass  # the client gave up: a timeout or a byte cap

            def log_message(self, *args: object) -> None:
                pass

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.httpd.daemon_threads = True
        if tls is not None:
            self.httpd.socket = tls.wrap_socket(self.httpd.socket, server_side=True)
        self.url = f"{'https' if tls else 'http'}://127.0.0.1:{self.httpd.server_address[1]}"
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)

    def __enter__(self) -> FaultServer:
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()


def send(handler: BaseHTTPRequestHandler, code: int, body: bytes = b"", headers: dict[str, str] | None = None) -> None:
    handler.send_response(code)
    for key, value in (headers or {}).items():
        handler.send_header(key, value)
    handler.send_header("Content-Length", str(len(body)))
    handler.end_headers()
    handler.wfile.write(body)


def image(data: bytes, delay: float = 0.0) -> Responder:
    def respond(handler: BaseHTTPRequestHandler, n: int) -> None:
        time.sleep(delay)
        send(handler, 200, data, {"Content-Type": "image/jpeg"})

    return respond


def status(code: int, headers: dict[str, str] | None = None) -> Responder:
    return lambda handler, n: send(handler, code, b"error", headers)


def first(count: int, failure: Responder, then: Responder) -> Responder:
    return lambda handler, n: (failure if n <= count else then)(handler, n)


def hang(seconds: float) -> Responder:
    def respond(handler: BaseHTTPRequestHandler, n: int) -> None:
        time.sleep(seconds)
        send(handler, 200, b"late")

    return respond


class Drip:
    """Headers at once, then one byte every 50 ms: never silent long enough for a read timeout.

    Served to its end, a response is ``BYTES`` bytes (10 s); ``sent`` holds, per finished request,
    the bytes written before the client hung up or the body ended.
    """

    BYTES = 200

    def __init__(self) -> None:
        self.sent: list[int] = []

    def __call__(self, handler: BaseHTTPRequestHandler, n: int) -> None:
        handler.send_response(200)
        handler.send_header("Content-Length", "100000")
        handler.end_headers()
        written = 0
        try:
            for _ in range(self.BYTES):
                handler.wfile.write(b"x")
                handler.wfile.flush()
                written += 1
                time.sleep(0.05)
        finally:
            self.sent.append(written)
        handler.close_connection = True

    def wait_for(self, requests: int, limit_s: float = 30.0) -> list[int]:
        """``sent`` once ``requests`` requests have finished (a drip served to its end takes 10 s)."""
        deadline = time.monotonic() + limit_s
        while len(self.sent) < requests and time.monotonic() < deadline:
            time.sleep(0.05)
        return self.sent


def cut_short(data: bytes) -> Responder:
    def respond(handler: BaseHTTPRequestHandler, n: int) -> None:
        handler.send_response(200)
        handler.send_header("Content-Length", str(len(data)))
        handler.end_headers()
        handler.wfile.write(data[: len(data) // 2])
        handler.close_connection = True

    return respond


def endless(handler: BaseHTTPRequestHandler, n: int) -> None:
    """No Content-Length: the body runs until the connection closes, far past any cap."""
    handler.send_response(200)
    handler.send_header("Connection", "close")
    handler.end_headers()
    for _ in range(64):
        handler.wfile.write(b"\0" * 65536)
    handler.close_connection = True


def redirect(location: str) -> Responder:
    return lambda handler, n: send(handler, 302, b"", {"Location": location})


def self_signed_tls(folder: Path) -> ssl.SSLContext:
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "127.0.0.1")])
    now = datetime.now(UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - timedelta(minutes=1))
        .not_valid_after(now + timedelta(days=1))
        .add_extension(x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]), critical=False)
        .sign(key, hashes.SHA256())
    )
    (folder / "cert.pem").write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    (folder / "key.pem").write_bytes(
        key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
    )
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(folder / "cert.pem", folder / "key.pem")
    return context


def closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# --- params and tables ------------------------------------------------------------------------

FAST = dict(
    allowed_schemes=["http", "https"],
    allowed_networks=["127.0.0.1/32"],  # the test servers; every other private address stays refused
    user_agent=USER_AGENT,
    connect_timeout_s=1.0,
    read_timeout_s=0.5,
    request_timeout_s=0.8,
    retries=2,
    backoff_base_s=0.01,
    backoff_max_s=0.05,
    retry_after_max_s=1.5,
    max_bytes=400_000,
    max_pixels=1_000_000,
    shard_max_images=4,
)


def url_table(path: Path, urls: list[str]) -> Path:
    frame = pd.DataFrame({"image": urls, "title": [f"Poster {i}" for i in range(len(urls))]})
    frame.to_csv(path, index=False)
    return path


def table_params(table: Path, **overrides: object) -> dict:
    source = {"name": "web", "kind": "table", "path": str(table), "url_column": "image"}
    source["metadata_columns"] = {"title": "title"}
    return {"sources": [source], "source_dir": str(table.parent), **FAST, **overrides}


def run_fetch(params: FetchParams, shards: Path, table: Path) -> dict:
    return run(replace(params, shards=shards, table=table))


def fetch(tmp: Path, raw: dict) -> tuple[pd.DataFrame, dict]:
    metrics = run_fetch(build(FetchParams, raw, "fetch"), tmp / "shards", tmp / "images.parquet")
    return pd.read_parquet(tmp / "images.parquet"), metrics


# --- tests ------------------------------------------------------------------------------------


def test_faults_each_get_their_reason_and_good_images_arrive_intact(tmp_path):
    good = [poster(i) for i in range(5)]
    flaky, throttled, capped, moved = poster(10), poster(11), poster(12), poster(13)
    big = poster(14, size=(900, 1400))
    drip = Drip()
    routes: dict[str, Responder] = {f"/good/{i}.jpg": image(data) for i, data in enumerate(good)}
    routes |= {
        "/copy-of-0.jpg": image(good[0]),
        "/flaky.jpg": first(1, status(500), image(flaky)),
        "/throttled.jpg": first(1, status(429, {"Retry-After": "1"}), image(throttled)),
        "/throttled-long.jpg": first(1, status(429, {"Retry-After": "3600"}), image(capped)),
        "/unavailable.jpg": status(503),
        "/hangs.jpg": hang(3.0),
        "/drips.jpg": drip,
        "/cut.jpg": cut_short(good[1]),
        "/truncated.jpg": image(good[2][: len(good[2]) * 2 // 3]),
        "/page.jpg": image(b"<!doctype html><html><body>Not found</body></html>"),
        "/empty.jpg": image(b""),
        "/bomb.png": image(bomb_png()),
        "/big.jpg": image(big),
        "/endless.jpg": endless,
        "/moved.jpg": redirect("/moved-here.jpg"),
        "/moved-here.jpg": image(moved),
        "/to-file.jpg": redirect("file:///etc/passwd"),
    }
    assert len(big) > FAST["max_bytes"]
    with FaultServer(routes) as server:
        paths = [*routes, "/missing.jpg"]
        urls = [server.url + p for p in paths] + [
            f"http://127.0.0.1:{closed_port()}/refused.jpg",
            "ftp://127.0.0.1/poster.jpg",
            "file:///etc/hostname",
            "",
        ]
        table, metrics = fetch(tmp_path, table_params(url_table(tmp_path / "urls.csv", urls)))
        dripped = drip.wait_for(3)

    by_url = table.set_index("url")
    reason = {p: by_url.loc[server.url + p, "reason"] for p in paths}
    expected_ok = {f"/good/{i}.jpg": good[i] for i in range(5)}
    expected_ok |= {"/copy-of-0.jpg": good[0], "/flaky.jpg": flaky, "/throttled.jpg": throttled}
    expected_ok |= {"/throttled-long.jpg": capped, "/moved.jpg": moved, "/moved-here.jpg": moved}
    with ShardStore(tmp_path / "shards") as store:
        for path, data in expected_ok.items():
            row = by_url.loc[server.url + path]
            assert row["status"] == "ok", (path, row["reason"])
            assert row["sha256"] == sha256_hex(data)
            assert store.read(row["sha256"]) == data
            assert (row["width"], row["height"], row["format"], row["bytes"]) == (96, 144, "JPEG", len(data))
        assert len(store) == len({sha256_hex(d) for d in expected_ok.values()})  # the copy is stored once

    assert {p: r for p, r in reason.items() if p not in expected_ok} == {
        "/unavailable.jpg": "http_503",
        "/hangs.jpg": "timeout",
        "/drips.jpg": "timeout",
        "/cut.jpg": "incomplete_body",
        "/truncated.jpg": "truncated",
        "/page.jpg": "not_an_image",
        "/empty.jpg": "empty",
        "/bomb.png": "decompression_bomb",
        "/big.jpg": "too_large",
        "/endless.jpg": "too_large",
        "/to-file.jpg": "redirect_not_allowed",
        "/missing.jpg": "http_404",
    }
    others = by_url.loc[urls[-4:-1], "reason"].tolist()
    assert others == ["connection_error", "scheme_not_allowed", "scheme_not_allowed"]
    assert table["status"].eq("failed").sum() == 15
    assert table.loc[table.status == "failed", "sha256"].isna().all()

    # retried: timeouts, connection errors, 429 and 5xx; never another 4xx or a bad payload
    attempts = {p: server.counts[p] for p in paths}
    for path in ["/unavailable.jpg", "/hangs.jpg", "/drips.jpg", "/cut.jpg"]:
        assert attempts[path] == 3, path
    for path in ["/flaky.jpg", "/throttled.jpg", "/throttled-long.jpg"]:
        assert attempts[path] == 2, path
    for path in ["/missing.jpg", "/page.jpg", "/truncated.jpg", "/big.jpg", "/endless.jpg", "/to-file.jpg"]:
        assert attempts[path] == 1, path
    waited = np.diff(server.times["/throttled.jpg"])[0]
    assert waited >= 1.0, waited  # Retry-After: 1, not the 10-50 ms backoff
    waited = np.diff(server.times["/throttled-long.jpg"])[0]
    assert 1.5 <= waited < 4, waited  # Retry-After: 3600, capped by retry_after_max_s
    # each try at the drip was cut off by the request deadline, not served to its end
    assert len(dripped) == 3 and all(sent < Drip.BYTES for sent in dripped), dripped
    assert server.agents == {USER_AGENT}

    assert table["title"].tolist() == [f"Poster {i}" for i in range(len(urls) - 1)]
    assert table["row"].tolist() == list(range(len(urls) - 1))
    assert metrics["skipped_empty_url"] == 1
    assert metrics["status"] == {"ok": 11, "failed": 15}
    assert metrics["reason"]["scheme_not_allowed"] == 2 and metrics["reason"]["timeout"] == 2
    assert metrics["distinct_images"] == 9
    # three tries at the closed port, and a retry whenever a kept-alive connection was found closed
    assert metrics["run"]["requests"] >= sum(server.counts.values()) + 3


def test_tls_certificates_are_verified(tmp_path):
    """The guide turns verification off; here a self-signed certificate fails, and is not retried."""
    with FaultServer({"/p.jpg": image(poster(1))}, tls=self_signed_tls(tmp_path)) as server:
        table, metrics = fetch(tmp_path, table_params(url_table(tmp_path / "urls.csv", [server.url + "/p.jpg"])))
    assert table["reason"].tolist() == ["tls_error"]
    assert metrics["run"]["requests"] == 1 and not server.counts


def test_retry_after_reads_seconds_and_http_dates():
    in_a_minute = email.utils.format_datetime(datetime.now(UTC) + timedelta(seconds=60), usegmt=True)
    assert 55 < retry_after_seconds(in_a_minute) <= 60
    assert retry_after_seconds("Wed, 21 Oct 2015 07:28:00 GMT") == 0.0
    assert retry_after_seconds(" 7 ") == 7.0
    assert (
        retry_after_seconds("soon") is None and retry_after_seconds("-3") is None and retry_after_seconds(None) is None
    )


def test_connections_are_bounded_per_host_and_in_total(tmp_path):
    total = Gauge()
    a_routes = {f"/a{i}.jpg": image(poster(i), delay=0.25) for i in range(6)}
    b_routes = {f"/b{i}.jpg": image(poster(10 + i), delay=0.25) for i in range(6)}
    # aiohttp counts host and port together: two ports on 127.0.0.1 are two hosts
    with FaultServer(a_routes, Gauge(total)) as a, FaultServer(b_routes, Gauge(total)) as b:
        urls = [a.url + p for p in a_routes] + [b.url + p for p in b_routes]
        raw = table_params(url_table(tmp_path / "urls.csv", urls), max_connections=3, max_connections_per_host=2)
        table, _ = fetch(tmp_path, raw)
    assert table["status"].eq("ok").all()
    assert (a.gauge.peak, b.gauge.peak) == (2, 2)
    assert total.peak == 3


def test_rerun_fetches_nothing_already_stored(tmp_path):
    images = {f"/p{i}.jpg": poster(i) for i in range(6)}
    with FaultServer({**{p: image(data) for p, data in images.items()}, "/gone.jpg": status(404)}) as server:
        urls = [server.url + p for p in [*images, "/gone.jpg"]]
        raw = table_params(url_table(tmp_path / "urls.csv", urls), max_connections=1)  # shards in URL order
        first_table, _ = fetch(tmp_path, raw)
        server.counts.clear()
        second_table, metrics = fetch(tmp_path, raw)
        pd.testing.assert_frame_equal(first_table, second_table)
        assert dict(server.counts) == {"/gone.jpg": 1}  # failures are asked again, stored images are not
        assert metrics["run"]["urls_reused"] == 6 and metrics["run"]["urls_fetched"] == 1

        # a kill after a journal segment was written but before its shard was published
        shards = tmp_path / "shards"
        assert [p.name for p in sorted(shards.glob("shard-*.tar"))] == ["shard-00000.tar", "shard-00001.tar"]
        (shards / "shard-00001.tar").unlink()
        server.counts.clear()
        third_table, _ = fetch(tmp_path, raw)
    pd.testing.assert_frame_equal(first_table, third_table)
    assert dict(server.counts) == {"/p4.jpg": 1, "/p5.jpg": 1, "/gone.jpg": 1}


@pytest.mark.parametrize("reorder_bytes", [None, 1], ids=["buffered", "workers-wait"])
def test_shards_follow_the_source_order_whatever_order_downloads_finish_in(tmp_path, monkeypatch, reorder_bytes):
    if reorder_bytes is not None:  # every download that finishes early waits for the earlier ones
        monkeypatch.setattr(engine, "REORDER_MAX_BYTES", reorder_bytes)
    images = {f"/p{i}.jpg": poster(i) for i in range(10)}
    # earlier rows answer later: with 10 connections the downloads finish in reverse order
    routes = {p: image(data, delay=0.03 * (10 - i)) for i, (p, data) in enumerate(images.items())}
    with FaultServer(routes) as server:
        raw = table_params(url_table(tmp_path / "urls.csv", [server.url + p for p in images]), max_connections=10)
        fetch(tmp_path / "a", raw)
        fetch(tmp_path / "b", raw)
    first = sorted((tmp_path / "a" / "shards").glob("shard-*.tar"))
    second = sorted((tmp_path / "b" / "shards").glob("shard-*.tar"))
    assert [p.name for p in first] == [p.name for p in second] and len(first) == 3  # 4 images a shard
    assert all(a.read_bytes() == b.read_bytes() for a, b in zip(first, second, strict=True))
    stored = [member.name for shard in first for member in tarfile.open(shard)]
    assert stored == [hashlib.sha256(data).hexdigest() for data in images.values()]


@pytest.mark.slow
def test_killed_fetch_resumes_to_the_same_table_without_refetching(tmp_path):
    images = {f"/p{i:03d}.jpg": poster(i) for i in range(80)}
    routes = {p: image(data, delay=0.1) for p, data in images.items()}
    routes["/gone.jpg"] = status(404)
    routes["/half.jpg"] = image(images["/p000.jpg"][:3000])
    with FaultServer(routes) as server:
        urls = [server.url + p for p in routes]
        url_table(tmp_path / "urls.csv", urls)
        raw = table_params(Path("urls.csv"), max_connections=4, max_connections_per_host=4, shard_max_images=4)
        (tmp_path / "params.yaml").write_text(yaml.safe_dump({"fetch": raw}))
        env = dict(os.environ, PYTHONPATH=str(PROJECT))
        command = [sys.executable, "-m", "stages.fetch"]
        shards = tmp_path / "data" / "raw" / "shards"

        proc = subprocess.Popen(command, cwd=tmp_path, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + 60
        while len(list(shards.glob("shard-*.tar"))) < 3 and time.monotonic() < deadline and proc.poll() is None:
            time.sleep(0.01)
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        assert proc.returncode == -signal.SIGKILL, "the fetch finished before it could be killed"
        assert not (tmp_path / "data" / "raw" / "images.parquet").exists()
        stored = set(ShardStore(shards).index)
        assert 12 <= len(stored) < len(images)

        server.counts.clear()
        rerun = subprocess.run(command, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120)
        assert rerun.returncode == 0, rerun.stderr
        refetched = {p for p, data in images.items() if server.counts[p]}
        assert not {sha256_hex(images[p]) for p in refetched} & stored
        assert refetched == {p for p, data in images.items() if sha256_hex(data) not in stored}

        fresh = tmp_path / "fresh"
        fresh.mkdir()
        reference, _ = fetch(fresh, table_params(url_table(fresh / "urls.csv", urls)))

    resumed = pd.read_parquet(tmp_path / "data" / "raw" / "images.parquet")
    pd.testing.assert_frame_equal(resumed, reference)
    assert resumed["status"].value_counts().to_dict() == {"ok": 80, "failed": 2}
    assert not list(shards.glob(".*")), "a partial shard was left behind"
    with ShardStore(shards) as store:
        assert len(store) == 80
        assert all(sha256_hex(store.read(sha)) == sha for sha in store.index)
    assert json.loads((tmp_path / "metrics" / "fetch.json").read_text())["status"]["ok"] == 80


@pytest.mark.parametrize("kind", ["zip", "tar.gz"])
def test_archive_source_is_read_in_memory_and_checked(tmp_path, kind):
    members = {
        "posters/a.jpg": poster(1),
        "posters/b.JPG": poster(2),
        "../escape.jpg": poster(3),
        "posters/broken.jpg": b"<html>not a poster</html>",
        "posters/huge.png": bomb_png(),
        "posters/readme.txt": b"annotations, not an image",
    }
    archive = tmp_path / f"dataset.{kind}"
    if kind == "zip":
        with zipfile.ZipFile(archive, "w") as z:
            for name, data in members.items():
                z.writestr(name, data)
    else:
        with tarfile.open(archive, "w:gz") as t:
            for name, data in members.items():
                info = tarfile.TarInfo(name)
                info.size = len(data)
                t.addfile(info, io.BytesIO(data))
    raw = {
        "sources": [{"name": "manual", "kind": "archive", "path": str(archive)}],
        "source_dir": str(tmp_path),
        **FAST,
    }
    work = tmp_path / "work"
    table, metrics = fetch(work, raw | {"allowed_schemes": []})

    names = sorted(n for n in members if not n.endswith(".txt"))
    assert table["url"].tolist() == [f"file:{archive.as_posix()}#{n}" for n in names]
    result = dict(zip(names, zip(table["status"], table["reason"].fillna(""), strict=True), strict=True))
    assert result == {
        "../escape.jpg": ("ok", ""),
        "posters/a.jpg": ("ok", ""),
        "posters/b.JPG": ("ok", ""),
        "posters/broken.jpg": ("failed", "not_an_image"),
        "posters/huge.png": ("failed", "decompression_bomb"),
    }
    with ShardStore(work / "shards") as store:
        assert store.read(sha256_hex(members["../escape.jpg"])) == members["../escape.jpg"]
    assert sorted(p.name for p in (work / "shards").iterdir()) == ["journal-00000.parquet", "shard-00000.tar"]
    assert metrics["status"] == {"ok": 3, "failed": 2}


def test_folder_and_file_prefix_sources_stay_inside_their_folder(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    posters = Path("posters")
    (posters / "sub").mkdir(parents=True)
    (posters / "x.jpg").write_bytes(poster(1))
    (posters / "sub" / "y.png").write_bytes(poster(2))
    Path("secret.jpg").write_bytes(poster(3))
    os.mkfifo(posters / "fifo.jpg")
    cells = ["/x.jpg", "/sub/y.png", "/../secret.jpg", "/absent.jpg", "/fifo.jpg", ""]
    pd.DataFrame({"poster_path": cells, "name": list("abcdef")}).to_csv("tmdb.csv", index=False)
    tmdb = {"name": "tmdb", "kind": "table", "path": "tmdb.csv", "url_column": "poster_path"}
    tmdb |= {"url_prefix": "file:posters", "metadata_columns": {"title": "name"}}
    folder = {"name": "local", "kind": "folder", "path": "posters"}
    raw = {"sources": [tmdb, folder], "source_dir": ".", **FAST, "allowed_schemes": []}
    table, metrics = fetch(Path("out"), raw)

    got = list(zip(table["source"], table["url"], table["reason"].fillna("ok"), strict=True))
    assert got == [
        ("tmdb", "file:posters/x.jpg", "ok"),
        ("tmdb", "file:posters/sub/y.png", "ok"),
        ("tmdb", "file:posters/../secret.jpg", "outside_prefix"),
        ("tmdb", "file:posters/absent.jpg", "not_found"),
        ("tmdb", "file:posters/fifo.jpg", "not_a_file"),
        ("local", "file:posters/fifo.jpg", "not_a_file"),
        ("local", "file:posters/sub/y.png", "ok"),
        ("local", "file:posters/x.jpg", "ok"),
    ]
    assert table["title"].tolist()[:5] == list("abcde") and table["title"].iloc[5:].isna().all()
    assert metrics["skipped_empty_url"] == 1 and metrics["source_ok"] == {"tmdb": 2, "local": 2}
    assert metrics["distinct_images"] == 2


@pytest.mark.parametrize("suffix", [".csv", ".jsonl", ".parquet"])
def test_table_formats_map_metadata_columns(tmp_path, suffix):
    frame = pd.DataFrame(
        {
            "Name": ["Cowboy Bebop", "Trigun", "Monster"],
            "Genres": ["Action, Sci-Fi", "Action", ""],
            "Synopsis": ["Bounty hunters.", None, "A surgeon."],
            "Image URL": ["https://cdn.example/1.jpg", "", "https://cdn.example/3.jpg"],
        }
    )
    path = tmp_path / f"anime{suffix}"
    if suffix == ".csv":
        frame.to_csv(path, index=False)
    elif suffix == ".jsonl":
        frame.to_json(path, orient="records", lines=True)
    else:
        frame.to_parquet(path)
    source = build(
        SourceParams,
        {"name": "mal", "kind": "table", "path": str(path), "url_column": "Image URL"}
        | {"metadata_columns": {"title": "Name", "genres": "Genres", "overview": "Synopsis"}},
        "fetch.sources[0]",
    )
    rows = read_source(source)
    assert rows.skipped_empty_url == 1
    assert [(e.row, e.url) for e in rows.entries] == [
        (0, "https://cdn.example/1.jpg"),
        (2, "https://cdn.example/3.jpg"),
    ]
    assert rows.entries[0].metadata == {
        "title": "Cowboy Bebop",
        "genres": "Action, Sci-Fi",
        "overview": "Bounty hunters.",
    }
    assert rows.entries[1].metadata == {"title": "Monster", "genres": None, "overview": "A surgeon."}


def test_bad_params_fail_in_one_line_naming_the_parameter(tmp_path):
    table = url_table(tmp_path / "urls.csv", ["http://127.0.0.1/a.jpg"])
    raw = table_params(table)
    (tmp_path / "params.yaml").write_text(
        yaml.safe_dump({"fetch": raw | {"sources": [raw["sources"][0] | {"kind": "ftp"}]}})
    )
    proc = subprocess.run(
        [sys.executable, "-m", "stages.fetch"],
        cwd=tmp_path,
        env=dict(os.environ, PYTHONPATH=str(PROJECT)),
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines() == [
        "fetch: error: param fetch.sources[0].kind: 'ftp' is not one of 'table', 'folder', 'archive'"
    ]

    with pytest.raises(ParamError, match=r"^param fetch.allowed_schemes: 'gopher' cannot be fetched"):
        build(FetchParams, raw | {"allowed_schemes": ["http", "gopher"]}, "fetch")
    with pytest.raises(ParamError, match=r"^param fetch.sources\[web\].url_column: required"):
        build(
            FetchParams, raw | {"sources": [{k: v for k, v in raw["sources"][0].items() if k != "url_column"}]}, "fetch"
        )
    with pytest.raises(ParamError, match=r"^param fetch.retries: must not be negative"):
        build(FetchParams, raw | {"retries": -1}, "fetch")

    missing = build(FetchParams, raw | {"sources": [raw["sources"][0] | {"path": str(tmp_path / "nope.csv")}]}, "fetch")
    with pytest.raises(PipelineError) as error:
        run_fetch(missing, tmp_path / "shards", tmp_path / "images.parquet")
    assert str(error.value) == f"{tmp_path / 'nope.csv'}: file not found (param fetch.sources[web].path)"

    no_column = build(FetchParams, raw | {"sources": [raw["sources"][0] | {"url_column": "poster_path"}]}, "fetch")
    with pytest.raises(PipelineError, match=r"no column 'poster_path' \(param fetch.sources\[web\].url_column;"):
        run_fetch(no_column, tmp_path / "shards", tmp_path / "images.parquet")
    assert not (tmp_path / "shards").exists()

"""Hostile sources: a source row never reaches past its source, and one bad row never costs the run.

Every case runs against a loopback HTTP server and local folders, with its expected reason
(or one-line error); afterwards every byte in the shards is proven to come from the server
or from inside a declared local folder or archive.
"""

from __future__ import annotations

import asyncio
import io
import os
import socket
import tarfile
import time
import zipfile
from dataclasses import replace
from pathlib import Path

import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from postertune.errors import PipelineError
from postertune.fetch import engine
from postertune.fetch.http import AddressNotAllowed, GuardedResolver, guarded_socket_factory
from postertune.fetch.params import FetchParams
from postertune.fetch.run import run as run_stage
from postertune.imagefacts import image_facts
from postertune.imagesafe import ImageRejected
from postertune.params import ParamError, build
from postertune.store import ShardStore, ShardWriter, sha256_hex
from tests.test_fetch import FAST, FaultServer, bomb_png, image, poster, redirect

SECRET = poster(666)  # lives outside every declared folder: must never reach the shards


def table(path: Path, cells: list[str]) -> dict:
    pd.DataFrame({"image": cells, "title": [f"t{i}" for i in range(len(cells))]}).to_csv(path, index=False)
    return {"name": path.stem, "kind": "table", "path": str(path), "url_column": "image"}


def run(out: Path, sources: list[dict], **overrides: object) -> tuple[pd.DataFrame, dict]:
    params = build(FetchParams, {"sources": sources, "source_dir": ".", **FAST, **overrides}, "fetch")
    metrics = run_stage(replace(params, shards=out / "shards", table=out / "images.parquet"))
    return pd.read_parquet(out / "images.parquet"), metrics


def reasons(frame: pd.DataFrame, source: str) -> list[str]:
    rows = frame[frame["source"] == source]
    return rows["reason"].fillna("ok").tolist()


@pytest.fixture
def land(tmp_path, monkeypatch):
    """A working folder with declared local sources and a secret next to them."""
    monkeypatch.chdir(tmp_path)
    secret = tmp_path / "secret"
    secret.mkdir()
    (secret / "secret.jpg").write_bytes(SECRET)
    posters = Path("posters")
    (posters / "sub").mkdir(parents=True)
    (posters / "x.jpg").write_bytes(poster(1))
    (posters / "sub" / "y.jpg").write_bytes(poster(2))
    (posters / "empty.jpg").write_bytes(b"")
    (posters / "big.jpg").write_bytes(poster(3, size=(900, 1400)))
    os.mkfifo(posters / "fifo.jpg")
    os.symlink(secret / "secret.jpg", posters / "link_out.jpg")
    os.symlink("x.jpg", posters / "link_in.jpg")
    os.symlink("/dev/zero", posters / "dev_zero.jpg")
    os.symlink(secret, posters / "escape_dir")
    return tmp_path


def test_a_source_row_never_reaches_past_its_source(land, monkeypatch):
    archives = Path("archives")
    archives.mkdir()
    with zipfile.ZipFile(archives / "set.zip", "w") as z:
        z.writestr("a.jpg", poster(4))
        z.writestr("../up.jpg", poster(5))
        z.writestr("huge.jpg", poster(6, size=(900, 1400)))
        z.writestr("bomb.png", bomb_png())
    with tarfile.open(archives / "set.tar", "w") as t:
        for name, data in {"b.jpg": poster(7)}.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            t.addfile(info, io.BytesIO(data))
        link = tarfile.TarInfo("passwd.jpg")
        link.type, link.linkname = tarfile.SYMTYPE, "/etc/passwd"
        t.addfile(link)

    served = {"/ok.jpg": poster(10), "/t/p/w600/tmdb.jpg": poster(11), "/poison.jpg": poster(12)}
    secret_abs = (land / "secret" / "secret.jpg").as_posix()
    poison_sha = sha256_hex(served["/poison.jpg"])

    def inspect_or_explode(data: bytes, max_pixels: int, background: tuple[int, int, int]):
        if sha256_hex(data) == poison_sha:
            raise RuntimeError("a decoder bug")
        return image_facts(data, max_pixels, background)

    monkeypatch.setattr(engine, "image_facts", inspect_or_explode)
    routes = {path: image(data) for path, data in served.items()}
    with FaultServer(routes) as server:
        port = server.url.rsplit(":", 1)[1]
        routes["/to-file.jpg"] = redirect(f"file://{secret_abs}")
        routes["/to-private.jpg"] = redirect(f"http://127.0.0.2:{port}/ok.jpg")
        routes["/to-metadata.jpg"] = redirect("http://169.254.169.254/latest/meta-data")
        routes["/to-credentials.jpg"] = redirect(f"http://user:pass@127.0.0.1:{port}/ok.jpg")
        web_cells = {
            server.url + "/ok.jpg": "ok",
            f"file://{secret_abs}": "scheme_not_allowed",
            f"file://localhost{secret_abs}": "scheme_not_allowed",
            f"FILE://{secret_abs}": "scheme_not_allowed",
            "file:" + secret_abs.replace("/", "%2F"): "scheme_not_allowed",
            "secret/secret.jpg": "scheme_not_allowed",
            "../secret/secret.jpg": "scheme_not_allowed",
            "file:archives/set.zip#a.jpg": "scheme_not_allowed",
            "file:/dev/zero#x.jpg": "scheme_not_allowed",
            "gopher://127.0.0.1/x.jpg": "scheme_not_allowed",
            f"http://user:pass@127.0.0.1:{port}/ok.jpg": "credentials_in_url",
            server.url + "/ok.jpg%00.png": "http_404",
            f"http://127.0.0.2:{port}/ok.jpg": "address_not_allowed",
            f"http://[::1]:{port}/ok.jpg": "address_not_allowed",
            f"http://[::ffff:127.0.0.2]:{port}/ok.jpg": "address_not_allowed",
            "http://169.254.169.254/latest/meta-data": "address_not_allowed",
            "http://10.0.0.1/x.jpg": "address_not_allowed",
            "http://224.0.0.1/x.jpg": "address_not_allowed",
            "http://0.0.0.0/x.jpg": "address_not_allowed",
            server.url + "/to-file.jpg": "redirect_not_allowed",
            server.url + "/to-private.jpg": "address_not_allowed",
            server.url + "/to-metadata.jpg": "address_not_allowed",
            server.url + "/to-credentials.jpg": "credentials_in_url",
            server.url + "/poison.jpg": "error: RuntimeError",
        }
        tmdb_cells = {
            "/tmdb.jpg": "ok",
            f"@127.0.0.2:{port}/ok.jpg": "outside_prefix",
            ":1/ok.jpg": "outside_prefix",
            "/../../ok.jpg": "outside_prefix",
            "/%2e%2e/%2e%2e/ok.jpg": "outside_prefix",
            ".evil.example/x.jpg": "outside_prefix",
        }
        local_cells = {
            "/x.jpg": "ok",
            "/link_in.jpg": "ok",
            "/../secret/secret.jpg": "outside_prefix",
            "/%2e%2e/secret/secret.jpg": "outside_prefix",
            "/escape_dir/secret.jpg": "outside_source",
            "/link_out.jpg": "outside_source",
            "/dev_zero.jpg": "outside_source",
            f"file://{secret_abs}": "not_found",  # a path inside the folder, named oddly
            "/fifo.jpg": "not_a_file",
            "/sub": "not_a_file",
            "/x.jpg%00.png": "invalid_url",
            "/empty.jpg": "empty",
            "/big.jpg": "too_large",
        }
        sources = [
            table(Path("web.csv"), list(web_cells)),
            table(Path("tmdb.csv"), list(tmdb_cells)) | {"url_prefix": server.url + "/t/p/w600"},
            table(Path("mirror.csv"), list(local_cells)) | {"url_prefix": "file:posters"},
            table(Path("devices.csv"), ["zero", "null", "urandom"]) | {"url_prefix": "file:/dev"},
            table(Path("proc.csv"), ["environ", "status"]) | {"url_prefix": "file:/proc/self"},
            {"name": "folder", "kind": "folder", "path": "posters"},
            {"name": "zip", "kind": "archive", "path": "archives/set.zip"},
            {"name": "tar", "kind": "archive", "path": "archives/set.tar"},
        ]
        start = time.monotonic()
        # source_dir "/" lets the /dev and /proc sources through the params check, to prove the reads refuse them too
        frame, metrics = run(land / "out", sources, source_dir="/")
        elapsed = time.monotonic() - start
        requested = set(server.counts)

    assert reasons(frame, "web") == list(web_cells.values())
    assert reasons(frame, "tmdb") == list(tmdb_cells.values())
    assert reasons(frame, "mirror") == list(local_cells.values())
    assert reasons(frame, "devices") == ["not_a_file"] * 3
    assert reasons(frame, "proc") == ["empty"] * 2  # a /proc file reports no size: never read
    folder = frame[frame["source"] == "folder"]
    assert dict(zip(folder["url"], folder["reason"].fillna("ok"), strict=True)) == {
        "file:posters/big.jpg": "too_large",
        "file:posters/dev_zero.jpg": "outside_source",
        "file:posters/empty.jpg": "empty",
        "file:posters/fifo.jpg": "not_a_file",
        "file:posters/link_in.jpg": "ok",
        "file:posters/link_out.jpg": "outside_source",
        "file:posters/sub/y.jpg": "ok",
        "file:posters/x.jpg": "ok",
    }
    assert reasons(frame, "zip") == ["ok", "ok", "decompression_bomb", "too_large"]  # ../up.jpg, a.jpg, ...
    assert reasons(frame, "tar") == ["ok"]  # the symlink member is not a file: not even listed
    assert elapsed < 30

    # nothing was requested that a row was refused for, and no credentials were recorded
    assert requested == {"/ok.jpg", "/t/p/w600/tmdb.jpg", "/poison.jpg", "/ok.jpg%00.png"} | {
        p for p in routes if p.startswith("/to-")
    }
    assert not frame["url"].str.contains("pass", regex=False).any()
    assert not frame["url"].str.contains("user", regex=False).any()
    assert metrics["reason"]["error"] == 1 and metrics["status"]["ok"] == 10

    # every stored byte comes from the server or from inside a declared folder or archive
    known = {sha256_hex(data) for data in served.values()}
    for folder_root, _, names in os.walk(os.path.realpath("posters")):
        for name in names:
            path = Path(folder_root, name)
            if path.is_file() and not path.is_symlink():
                known.add(sha256_hex(path.read_bytes()))
    with zipfile.ZipFile(archives / "set.zip") as z:
        known |= {sha256_hex(z.read(n)) for n in z.namelist()}
    known.add(sha256_hex(poster(7)))
    with ShardStore(land / "out" / "shards") as store:
        stored = set(store.index)
        assert all(sha256_hex(store.read(sha)) == sha for sha in stored)
    assert stored and stored <= known
    assert sha256_hex(SECRET) not in stored


def test_private_addresses_are_refused_after_dns_unless_allowed(land):
    with FaultServer({"/ok.jpg": image(poster(20))}) as server:
        port = server.url.rsplit(":", 1)[1]
        cells = [server.url + "/ok.jpg", f"http://localhost:{port}/ok.jpg"]
        source = table(Path("web.csv"), cells)
        refused, _ = run(land / "refused", [source], allowed_networks=[])
        assert not server.counts  # refused before connecting: the name resolved to loopback
        allowed, _ = run(land / "allowed", [source], allowed_networks=["127.0.0.0/8", "::1/128"])
    assert refused["reason"].tolist() == ["address_not_allowed", "address_not_allowed"]
    assert allowed["status"].tolist() == ["ok", "ok"]


def test_the_connection_checks_hold_on_the_addresses_actually_used():
    class Rebinding:  # a DNS answer that mixes a public address with a private one
        def __init__(self, answers: list[str]):
            self.answers = answers

        async def resolve(self, host: str, port: int = 0, family: int = socket.AF_INET) -> list[dict]:
            return [
                {"hostname": host, "host": a, "port": port, "family": family, "proto": 0, "flags": 0}
                for a in self.answers
            ]

        async def close(self) -> None:
            pass

    async def resolve(answers: list[str]) -> list[str]:
        resolver = GuardedResolver([])
        resolver._inner = Rebinding(answers)
        return [a["host"] for a in await resolver.resolve("posters.example", 80)]

    assert asyncio.run(resolve(["93.184.216.34", "127.0.0.1", "10.1.2.3"])) == ["93.184.216.34"]
    with pytest.raises(AddressNotAllowed):
        asyncio.run(resolve(["192.168.1.5", "fe80::1"]))
    factory = guarded_socket_factory([])
    with pytest.raises(AddressNotAllowed):
        factory((socket.AF_INET, socket.SOCK_STREAM, 6, "", ("127.0.0.1", 80)))
    factory((socket.AF_INET, socket.SOCK_STREAM, 6, "", ("93.184.216.34", 80))).close()


def test_one_bad_row_costs_only_itself(land):
    Path("ragged.csv").write_bytes(
        b'image,title\nfile:posters/x.jpg,fine\na,b,c\nlonely\n"multi\nline",ok\nnul\0byte,x\n\n/x.jpg,last\n'
    )
    ragged = {"name": "ragged", "kind": "table", "path": "ragged.csv", "url_column": "image"}
    ragged |= {"url_prefix": "file:posters", "metadata_columns": {"title": "title"}}
    typed = pa.table(
        {
            "image": ["/x.jpg", "/sub/y.jpg"],
            "alt": [["/x.jpg", "/sub/y.jpg"], ["/x.jpg"]],
            "info": [{"genre": "drama"}, {"genre": "noir"}],
        }
    )
    pq.write_table(typed, "typed.parquet")
    lists = {
        "name": "lists",
        "kind": "table",
        "path": "typed.parquet",
        "url_column": "alt",
        "url_prefix": "file:posters",
    }
    structs = {"name": "structs", "kind": "table", "path": "typed.parquet", "url_column": "image"}
    structs |= {"url_prefix": "file:posters", "metadata_columns": {"genres": "info"}}
    frame, metrics = run(land / "out", [ragged, lists, structs])

    assert reasons(frame, "ragged") == [
        "not_found",  # "file:posters/x.jpg" is a path inside the folder
        "ragged_row: line 3 has 3 fields, the header 2",
        "ragged_row: line 4 has 1 fields, the header 2",
        "not_found",
        "invalid_url",  # a NUL byte never reaches open()
        "ok",
    ]
    titles = frame.loc[frame["source"] == "ragged", "title"]
    assert titles.fillna("-").tolist() == ["fine", "-", "-", "ok", "x", "last"]
    assert reasons(frame, "lists") == ["url_not_text"] * 2
    assert reasons(frame, "structs") == ["metadata_not_text"] * 2
    assert metrics["reason"]["ragged_row"] == 2


def test_bad_sources_and_params_fail_in_one_line(land):
    os.mkfifo("fifo.csv")
    for source, message in [
        ({"name": "t", "kind": "table", "path": "fifo.csv", "url_column": "image"}, "fifo.csv: not a regular file"),
        ({"name": "a", "kind": "archive", "path": "/dev/zero"}, "/dev/zero: not a regular file"),
    ]:
        with pytest.raises(PipelineError) as error:
            run(land / "out", [source], source_dir="/")  # past the params check, to the read itself
        assert str(error.value).startswith(message) and "\n" not in str(error.value)

    web = table(Path("web.csv"), ["http://example.com/x.jpg"])
    for overrides, message in [
        ({"allowed_schemes": ["https", "file"]}, "param fetch.allowed_schemes: 'file' cannot be fetched (local files"),
        ({"allowed_networks": ["intranet"]}, "param fetch.allowed_networks[0]: 'intranet' is not an IP network"),
        ({"sources": [web | {"url_prefix": "http://u:p@cdn.example"}]}, "param fetch.sources[web].url_prefix:"),
        ({"sources": [web | {"url_prefix": "ftp://cdn.example"}]}, "param fetch.sources[web].url_prefix:"),
        ({"sources": [web | {"url_prefix": "file://host/share"}]}, "param fetch.sources[web].url_prefix:"),
    ]:
        with pytest.raises(ParamError) as error:
            build(FetchParams, {"sources": [web], "source_dir": ".", **FAST, **overrides}, "fetch")
        assert str(error.value).startswith(message) and "\n" not in str(error.value)


def test_every_local_source_path_lies_under_source_dir(land):
    table = {"name": "t", "kind": "table", "path": "sources/t.csv", "url_column": "image"}
    inside = [
        table | {"url_prefix": "file:sources/posters"},
        {"name": "f", "kind": "folder", "path": "sources"},
        {"name": "a", "kind": "archive", "path": "sources/sub/../set.zip"},
    ]
    built = build(FetchParams, {"sources": inside, "source_dir": "sources"}, "fetch")
    assert built.source_dir == Path("sources")
    for source, key in [
        (table | {"path": "web.csv"}, "path"),
        (table | {"url_prefix": "file:posters"}, "url_prefix"),
        (table | {"url_prefix": "file:/dev"}, "url_prefix"),
        ({"name": "f", "kind": "folder", "path": "sources/../posters"}, "path"),
        ({"name": "f", "kind": "folder", "path": "sources_old"}, "path"),
        ({"name": "a", "kind": "archive", "path": "/dev/zero"}, "path"),
    ]:
        with pytest.raises(ParamError) as error:
            build(FetchParams, {"sources": [source], "source_dir": "sources"}, "fetch")
        message = str(error.value)
        assert message.startswith(f"param fetch.sources[{source['name']}].{key}: ") and "\n" not in message
        assert message.endswith("is not inside fetch.source_dir (sources), the folder dvc.yaml tracks")


def test_local_sources_work_whatever_allowed_schemes_says_and_changed_files_are_read_again(land):
    folder = {"name": "folder", "kind": "folder", "path": "posters/sub"}
    first, _ = run(land / "out", [folder], allowed_schemes=[])
    assert first["status"].tolist() == ["ok"] and first["sha256"][0] == sha256_hex(poster(2))

    again, metrics = run(land / "out", [folder], allowed_schemes=["https"])
    assert metrics["run"]["urls_reused"] == 1 and again["sha256"].tolist() == first["sha256"].tolist()

    Path("posters/sub/y.jpg").write_bytes(poster(30))  # replaced in place, same name
    changed, metrics = run(land / "out", [folder])
    assert metrics["run"]["urls_fetched"] == 1 and changed["sha256"][0] == sha256_hex(poster(30))
    assert changed["bytes"][0] == len(poster(30))


def test_the_shard_writer_alone_decides_when_a_shard_closes(tmp_path):
    published: list[list[str]] = []

    def record() -> None:  # runs while the closed shard is not yet in place
        published.append(sorted(p.name for p in tmp_path.glob("shard-*.tar")))

    writer = ShardWriter(tmp_path, max_images=2, max_bytes=1 << 20, max_seconds=3600, before_publish=record)
    for i in range(5):
        writer.add(f"{i:064x}", b"x" * 10)
    assert published == [[], ["shard-00000.tar"]]
    assert writer.is_open
    writer.close_if_old()
    assert writer.is_open  # young: stays open
    writer.max_seconds = 0.0
    writer.close_if_old()
    assert not writer.is_open and len(published) == 3

    by_size = ShardWriter(tmp_path / "b", max_images=100, max_bytes=25, max_seconds=3600)
    for i in range(3):
        by_size.add(f"{i:064x}", b"y" * 10)
    assert sorted(p.name for p in (tmp_path / "b").glob("shard-*.tar")) == ["shard-00000.tar"]
    by_size.close()
    assert len(ShardStore(tmp_path / "b")) == 3


def test_an_open_shard_goes_to_disk_in_stretches_and_reads_back_the_same(tmp_path, monkeypatch):
    import postertune.store as store

    synced: list[int] = []
    real_fdatasync = os.fdatasync
    monkeypatch.setattr(store.os, "fdatasync", lambda fd: (synced.append(fd), real_fdatasync(fd))[1])
    images = {sha256_hex(bytes([i]) * 1000): bytes([i]) * 1000 for i in range(40)}
    layouts, pushed_while_open = [], []
    for name, stretch in (("whole", 1 << 30), ("stretches", 3000)):
        monkeypatch.setattr(store, "WRITEBACK_BYTES", stretch)
        writer = ShardWriter(tmp_path / name, max_images=100)
        for sha, data in images.items():
            writer.add(sha, data)
        pushed_while_open.append(len(synced))
        writer.close()
        layouts.append((tmp_path / name / "shard-00000.tar").read_bytes())
        with ShardStore(tmp_path / name) as read_back:
            assert {sha: read_back.read(sha) for sha in images} == images
    assert pushed_while_open[0] == 0 and pushed_while_open[1] > 0  # while the shard was still being written
    assert layouts[0] == layouts[1]


def test_a_decoder_failure_is_that_images_reason(land, monkeypatch):
    def explode(data: bytes, max_pixels: int, background: tuple[int, int, int]):
        if data == poster(1):
            raise ImageRejected("corrupt")
        raise ValueError("embedded null byte")

    monkeypatch.setattr(engine, "image_facts", explode)
    frame, _ = run(land / "out", [{"name": "folder", "kind": "folder", "path": "posters"}])
    got = dict(zip(frame["url"], frame["reason"], strict=True))
    assert got["file:posters/x.jpg"] == "corrupt" and got["file:posters/sub/y.jpg"] == "error: ValueError"

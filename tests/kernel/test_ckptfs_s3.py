"""ckptfs against S3: a real moto server over HTTP on loopback, through pyarrow's S3FileSystem."""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pyarrow.fs as pafs
import pytest
from typer.testing import CliRunner

import ckptfs
from ckptfs.cli import app
from ckptfs.errors import CheckpointNotFound
from ckptfs.manifest import MANIFEST_NAME
from ckptfs.reader import Checkpoint, ReaderOptions
from ckptfs.store import StoreOptions, open_store
from ckptfs.testing import moto_server, mounted

_CREDS = {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing", "AWS_DEFAULT_REGION": "us-east-1",
          "AWS_EC2_METADATA_DISABLED": "true"}


@pytest.fixture(scope="module")
def s3() -> Iterator[StoreOptions]:
    saved = {k: os.environ.get(k) for k in _CREDS}
    os.environ.update(_CREDS)
    try:
        with moto_server() as url:
            opts = StoreOptions(s3_endpoint=url, s3_region="us-east-1")
            pafs.S3FileSystem(endpoint_override=url.split("://")[1], scheme="http", region="us-east-1",
                              allow_bucket_creation=True).create_dir("ckpts")
            yield opts
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


@pytest.fixture
def src(tmp_path: Path) -> tuple[Path, dict[str, bytes]]:
    d = tmp_path / "src"
    (d / "shards").mkdir(parents=True)
    files = {"shards/a.bin": os.urandom((3 << 20) + 17), "shards/b.bin": os.urandom(1 << 20), "meta.json": b"{}"}
    for rel, data in files.items():
        (d / rel).write_bytes(data)
    return d, files


def test_put_read_verify_over_s3(s3: StoreOptions, src: tuple[Path, dict[str, bytes]]) -> None:
    d, files = src
    uri = "s3://ckpts/run1/step-100"
    stats = ckptfs.put(d, uri, chunk_size=256 << 10, stripes=4, segment_chunks=4, options=s3)
    assert stats.files == 3
    fs = open_store(uri, s3)
    assert fs.exists(MANIFEST_NAME)
    assert len([n for n in fs.list_dir(f"data/{stats.plan_id}")]) == 4  # one prefix per stripe
    with Checkpoint(uri, store_options=s3, reader_options=ReaderOptions(threads=8)) as ck:
        for rel, data in files.items():
            assert bytes(ck.read_file(rel)) == data
        assert ck.verify() == []
        assert ck.source.stats.store_reads > 4
    with ckptfs.open(uri, "shards/a.bin", store_options=s3) as f:
        f.seek(1 << 20)
        assert f.read(1000) == files["shards/a.bin"][1 << 20 : (1 << 20) + 1000]
    again = ckptfs.put(d, uri, chunk_size=256 << 10, stripes=4, segment_chunks=4, options=s3)
    assert again.already_complete


def test_interrupted_put_is_invisible_on_s3_and_resumes(s3: StoreOptions, src: tuple[Path, dict[str, bytes]]) -> None:
    d, files = src
    uri = "s3://ckpts/run1/step-200"
    calls = {"n": 0}

    def die_after_some(n: int) -> None:
        calls["n"] += n
        if calls["n"] > (2 << 20):
            raise KeyboardInterrupt  # what Ctrl-C does mid-upload

    with pytest.raises(KeyboardInterrupt):
        ckptfs.put(d, uri, chunk_size=256 << 10, stripes=2, segment_chunks=2, threads=1, options=s3,
                   on_bytes=die_after_some)
    with pytest.raises(CheckpointNotFound):
        Checkpoint(uri, store_options=s3)
    stats = ckptfs.put(d, uri, chunk_size=256 << 10, stripes=2, segment_chunks=2, threads=1, options=s3)
    assert stats.segments_skipped > 0 and stats.bytes_uploaded < sum(len(v) for v in files.values())
    with Checkpoint(uri, store_options=s3) as ck:
        assert all(bytes(ck.read_file(rel)) == data for rel, data in files.items())


def test_cli_and_mount_over_s3(s3: StoreOptions, src: tuple[Path, dict[str, bytes]], tmp_path: Path) -> None:
    d, files = src
    uri = "s3://ckpts/run2"
    ep = ["--s3-endpoint", str(s3.s3_endpoint), "--s3-region", "us-east-1"]
    r = CliRunner().invoke(app, ["put", str(d), uri, "--chunk-size", "512KiB", "--stripes", "3", *ep])
    assert r.exit_code == 0, r.output
    r = CliRunner().invoke(app, ["verify", uri, *ep])
    assert r.exit_code == 0, r.output
    mnt = tmp_path / "mnt"
    cache = tmp_path / "cache"
    env = {**os.environ, **_CREDS}
    with mounted(uri, mnt, [*ep, "--cache-dir", str(cache), "--cache-size", "64MiB"], env=env):
        for rel, data in files.items():
            assert (mnt / rel).read_bytes() == data
    assert sum(p.stat().st_size for p in cache.rglob("*") if p.is_file()) == sum(len(v) for v in files.values())
    p = subprocess.run([sys.executable, "-m", "ckptfs.cli", "ls", "s3://ckpts/nothing-here", *ep],
                       capture_output=True, text=True, env=env, timeout=60)
    assert p.returncode == 1 and "no checkpoint" in p.stderr

"""``bootseer ckptfs …``: put, ls, verify, get, mount.

Mounted into the root CLI by ``bootseer/cli.py``; also runnable alone as ``python -m ckptfs.cli``.
Credentials are never options: S3 keys come from the AWS SDK's usual sources (environment, profile,
instance role), so they do not end up in shell history or process listings.
"""

from __future__ import annotations

import contextlib
import logging
import os
import sys
from collections.abc import Iterator
from pathlib import Path

import typer
from rich.progress import (
    BarColumn,
    DownloadColumn,
    Progress,
    TextColumn,
    TimeRemainingColumn,
    TransferSpeedColumn,
)
from rich.table import Table

from bootseer import log as bslog
from ckptfs.cache import DigestCache
from ckptfs.errors import CkptfsError
from ckptfs.manifest import normalise_path
from ckptfs.put import DEFAULT_SEGMENT_CHUNKS, put
from ckptfs.reader import DEFAULT_MEMORY_BUDGET, DEFAULT_THREADS, Checkpoint, ReaderOptions, ReadState
from ckptfs.sizes import human, parse_size
from ckptfs.store import StoreOptions

app = typer.Typer(help="Striped checkpoints: store, inspect, verify, copy out, mount.", no_args_is_help=True)
err = bslog.console(stderr=True)
log = logging.getLogger("ckptfs")

S3Endpoint = typer.Option(None, "--s3-endpoint", help="S3 endpoint, host:port or URL (env AWS_ENDPOINT_URL).")
S3Scheme = typer.Option(None, "--s3-scheme", help="http or https (default: https, or the endpoint URL's).")
S3Region = typer.Option(None, "--s3-region", help="S3 region.")
S3Anon = typer.Option(False, "--s3-anonymous", help="Unsigned S3 requests (public buckets).")
Threads = typer.Option(DEFAULT_THREADS, "--threads", help="Parallel store reads.")


def _fail(msg: str, code: int = 1) -> None:
    from rich.markup import escape

    err.print(f"[red]error:[/red] {escape(msg)}")
    raise typer.Exit(code)


def _size(text: str, what: str) -> int:
    try:
        return parse_size(text)
    except ValueError as e:
        _fail(f"{what}: {e}", 2)
        raise AssertionError from e


def _store_opts(endpoint: str | None, scheme: str | None, region: str | None, anonymous: bool) -> StoreOptions:
    return StoreOptions(s3_endpoint=endpoint, s3_scheme=scheme, s3_region=region, s3_anonymous=anonymous)


def _progress() -> Progress:
    return Progress(
        TextColumn("{task.description}"), BarColumn(), DownloadColumn(binary_units=True),
        TransferSpeedColumn(), TimeRemainingColumn(), console=err, transient=False,
    )


@contextlib.contextmanager
def _errors() -> Iterator[None]:
    """Turn the failures a user can fix into one clear line and exit code 1, not a traceback."""
    try:
        yield
    except (CkptfsError, OSError, ValueError) as e:
        _fail(str(e))


@app.command("put")
def put_cmd(
    src_dir: Path = typer.Argument(..., help="Checkpoint directory to store."),
    uri: str = typer.Argument(..., help="Destination: /path, file://, s3://bucket/prefix, hdfs://nn:port/path."),
    chunk_size: str = typer.Option("64MiB", "--chunk-size", help="Chunk size (unit of striping and checks)."),
    stripes: int = typer.Option(8, "--stripes", min=1, help="Stripe objects to spread chunks over."),
    segment_chunks: int = typer.Option(DEFAULT_SEGMENT_CHUNKS, "--segment-chunks", min=1,
                                       help="Chunks per stripe segment object (resume granularity)."),
    threads: int = typer.Option(0, "--threads", min=0, help="Parallel uploads (0: one per stripe, ≤16)."),
    max_rate: str = typer.Option(None, "--max-rate", help="Cap the upload rate, bytes/s (e.g. 200MiB)."),
    s3_endpoint: str = S3Endpoint, s3_scheme: str = S3Scheme, s3_region: str = S3Region, s3_anonymous: bool = S3Anon,
) -> None:
    """Store SRC_DIR at URI as striped chunks; the manifest is written last.  Rerun to resume."""
    cs = _size(chunk_size, "--chunk-size")
    rate = _size(max_rate, "--max-rate") if max_rate else None
    with _errors(), _progress() as prog:
        task = prog.add_task("put", total=None)

        def on_plan(total: int, already: int) -> None:
            prog.update(task, total=total, completed=already)

        stats = put(src_dir, uri, chunk_size=cs, stripes=stripes, segment_chunks=segment_chunks,
                    threads=threads or None, max_rate=rate,
                    options=_store_opts(s3_endpoint, s3_scheme, s3_region, s3_anonymous),
                    on_plan=on_plan, on_bytes=lambda n: prog.advance(task, n))
    if stats.already_complete:
        err.print(f"{uri}: already complete ({stats.files} files, {human(stats.bytes_total)})")
    else:
        resumed = f", {stats.segments_skipped} segments kept from an earlier run" if stats.segments_skipped else ""
        err.print(f"stored {stats.files} files, {human(stats.bytes_total)} in {stats.seconds:.1f}s "
                  f"({stripes} stripes{resumed})")


@app.command("ls")
def ls_cmd(
    uri: str = typer.Argument(...),
    long: bool = typer.Option(False, "--long", "-l", help="Show chunks and stripes too."),
    s3_endpoint: str = S3Endpoint, s3_scheme: str = S3Scheme, s3_region: str = S3Region, s3_anonymous: bool = S3Anon,
) -> None:
    """List the files of the checkpoint at URI."""
    with _errors(), Checkpoint(uri, store_options=_store_opts(s3_endpoint, s3_scheme, s3_region,
                                                              s3_anonymous)) as ckpt:
        m = ckpt.manifest
        table = Table(title=f"{uri}: {len(m.files)} files, {human(m.total_bytes)}, chunk {human(m.chunk_size)}, "
                      f"{m.stripes} stripes", title_justify="left")
        table.add_column("mode")
        table.add_column("size", justify="right")
        if long:
            table.add_column("chunks", justify="right")
        table.add_column("path")
        for f in m.files:
            row = [oct(f.mode)[2:].rjust(4, "0"), str(f.size)]
            if long:
                row.append(str(len(f.chunks)))
            table.add_row(*row, f.path)
        bslog.console().print(table)


@app.command("verify")
def verify_cmd(
    uri: str = typer.Argument(...),
    threads: int = Threads,
    s3_endpoint: str = S3Endpoint, s3_scheme: str = S3Scheme, s3_region: str = S3Region, s3_anonymous: bool = S3Anon,
) -> None:
    """Read every chunk from the store and check its sha256; exit 1 on any problem."""
    store_opts = _store_opts(s3_endpoint, s3_scheme, s3_region, s3_anonymous)
    with _errors(), Checkpoint(uri, store_options=store_opts,
                               reader_options=ReaderOptions(threads=threads, retries=1)) as ckpt, _progress() as prog:
        task = prog.add_task("verify", total=ckpt.manifest.total_bytes)
        problems = ckpt.verify(on_bytes=lambda n: prog.advance(task, n))
    for p in problems:
        err.print(f"[red]bad:[/red] {p}")
    if problems:
        _fail(f"{len(problems)} bad chunk(s) in {uri}")
    err.print(f"{uri}: all chunks verified")


@app.command("get")
def get_cmd(
    uri: str = typer.Argument(...),
    dest: Path = typer.Argument(..., help="Local directory to write the files into."),
    paths: list[str] = typer.Argument(None, help="Files to copy (default: all)."),
    threads: int = Threads,
    s3_endpoint: str = S3Endpoint, s3_scheme: str = S3Scheme, s3_region: str = S3Region, s3_anonymous: bool = S3Anon,
) -> None:
    """Copy files out of the checkpoint at URI with the parallel reader."""
    with _errors(), Checkpoint(uri, store_options=_store_opts(s3_endpoint, s3_scheme, s3_region, s3_anonymous),
                               reader_options=ReaderOptions(threads=threads)) as ckpt:
        entries = [ckpt.file(p) for p in paths] if paths else list(ckpt.manifest.files)
        for d in ckpt.manifest.dirs:
            if not paths:
                (dest / d.path).mkdir(parents=True, exist_ok=True)
        block = max(ckpt.manifest.chunk_size, 8 << 20)
        buf = memoryview(bytearray(block))
        with _progress() as prog:
            task = prog.add_task("get", total=sum(f.size for f in entries))
            for f in entries:
                out = dest / normalise_path(f.path)
                out.parent.mkdir(parents=True, exist_ok=True)
                state = ReadState()
                with open(out, "wb") as fh:
                    pos = 0
                    while pos < f.size:
                        n = ckpt.readinto(f, pos, buf, state)
                        fh.write(buf[:n])
                        pos += n
                        prog.advance(task, n)
                os.chmod(out, f.mode & 0o777)  # a manifest's setuid/setgid bits are never applied
                os.utime(out, ns=(f.mtime_ns, f.mtime_ns))
    err.print(f"copied {len(entries)} file(s) to {dest}")


def default_cache_dir() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache")
    return Path(base) / "bootseer" / "ckptfs"


@app.command("mount")
def mount_cmd(
    uri: str = typer.Argument(...),
    mountpoint: Path = typer.Argument(..., help="Empty directory to mount on (a non-empty one only with "
                                      "--nonempty: the mount hides what is in it)."),
    nonempty: bool = typer.Option(False, "--nonempty", help="Mount over a directory that has files in it."),
    cache_dir: Path = typer.Option(None, "--cache-dir",
                                   help="Local chunk cache (default for remote stores: ~/.cache/bootseer/ckptfs)."),
    cache_size: str = typer.Option("50GiB", "--cache-size", help="Cap of the chunk cache."),
    no_cache: bool = typer.Option(False, "--no-cache", help="No local chunk cache."),
    threads: int = Threads,
    readahead: int = typer.Option(None, "--readahead", min=0,
                                  help="Chunks read ahead of a sequential reader (default 2 × stripes)."),
    memory: str = typer.Option(human(DEFAULT_MEMORY_BUDGET).replace(" ", ""), "--memory",
                               help="Memory budget for chunks in flight and read ahead."),
    retries: int = typer.Option(3, "--retries", min=0, help="Extra attempts per chunk before EIO."),
    read_ahead_kb: int = typer.Option(8192, "--kernel-read-ahead-kb", min=0,
                                      help="Kernel read-ahead of the mount (larger FUSE reads)."),
    allow_other: bool = typer.Option(False, "--allow-other", help="Let other users read the mount."),
    prefetch: list[str] = typer.Option([], "--prefetch", metavar="PATTERN",
                                       help="Read files matching PATTERN (fnmatch on the path in the checkpoint; "
                                            "'*' = all) into the page cache as soon as the mount is up, before the "
                                            "job opens them. Repeatable."),
    prefetch_max: str = typer.Option("", "--prefetch-max", metavar="SIZE",
                                     help="Bytes --prefetch may read (default: half the available memory)."),
    no_verify: bool = typer.Option(False, "--no-verify", hidden=True,
                                   help="Skip sha256 checks (only to measure their cost)."),
    s3_endpoint: str = S3Endpoint, s3_scheme: str = S3Scheme, s3_region: str = S3Region, s3_anonymous: bool = S3Anon,
) -> None:
    """Mount the checkpoint at URI read-only at MOUNTPOINT (foreground; Ctrl-C or SIGTERM unmounts)."""
    from ckptfs.fusefs import mount

    if not logging.getLogger().handlers:
        logging.basicConfig(level=logging.INFO, stream=sys.stderr,
                            format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    budget = _size(memory, "--memory")
    prefetch_max_bytes = _size(prefetch_max, "--prefetch-max") if prefetch_max else None
    if not mountpoint.is_dir():
        _fail(f"mount point {mountpoint} is not a directory", 2)
    if not nonempty and any(mountpoint.iterdir()):
        # a loader reading the mount would not see the files under it: most likely the wrong directory
        _fail(f"mount point {mountpoint} is not empty (its files would be hidden under the mount); give an "
              "empty directory, or --nonempty to mount over it anyway", 2)
    with _errors():
        store_opts = _store_opts(s3_endpoint, s3_scheme, s3_region, s3_anonymous)
        cache = None
        if not no_cache:
            local = uri.startswith(("/", "file:")) or "://" not in uri
            directory = cache_dir or (None if local else default_cache_dir())
            if directory is not None:
                cache = DigestCache(directory, _size(cache_size, "--cache-size"))
        opts = ReaderOptions(threads=threads, readahead=readahead, memory_budget=budget, retries=retries,
                             cache=cache, verify=not no_verify)
        with Checkpoint(uri, store_options=store_opts, reader_options=opts) as ckpt:
            def ready() -> None:
                err.print(f"mounted {uri} at {mountpoint} ({len(ckpt.manifest.files)} files, "
                          f"{human(ckpt.manifest.total_bytes)}); Ctrl-C to unmount")

            mount(ckpt, str(mountpoint), threads=threads, allow_other=allow_other, read_ahead_kb=read_ahead_kb,
                  on_ready=ready, prefetch=prefetch, prefetch_max_bytes=prefetch_max_bytes)
    err.print(f"unmounted {mountpoint}")


if __name__ == "__main__":
    app()

"""The format study's pure parts (issue 20): pages and chunks of recorded reads, the node's write order of a
cache file, arguments, the report and the decision it prints.  No mkfs, no mount, no stack here."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import pytest

from integration.bench import format as fmt

KIB = 1024


def test_pages_and_chunks_of_recorded_reads() -> None:
    reads = [(0, 100), (4096, 8192), (130 * KIB, 1), (10 << 20, 4096), (-1, 5), (500 * KIB, 0)]
    pages = fmt.pages_read(reads, 1 << 20)  # the read past the blob's end and the empty/negative ones count nothing
    assert pages == {0, 1, 2, 32}
    assert fmt.chunks_of(pages, 128 * KIB) == {0, 1}
    assert fmt.chunks_of(pages, 16 * KIB) == {0, 8}
    assert fmt.chunk_bytes({0, 1}, 128 * KIB, 200 * KIB) == 200 * KIB  # the last chunk is short
    assert fmt.chunk_bytes(set(), 128 * KIB, 200 * KIB) == 0


def test_first_chunks_keep_the_order_the_start_read_them() -> None:
    reads = [(300 * KIB, 10), (0, 200 * KIB), (310 * KIB, 10), (1 << 30, 1)]
    assert fmt.first_chunks(reads, 512 * KIB) == [2, 0, 1]
    assert fmt.transfer_seconds(25_000_000, "200mbit") == 1.0


def test_a_file_written_as_the_cache_writes_it_is_the_blob(tmp_path: Path) -> None:
    blob = tmp_path / "blob"
    blob.write_bytes(os.urandom(5 * 128 * KIB + 777))
    out = tmp_path / "copy"
    fmt.write_as_cache(blob, out, [4, 1, 4, 9, 99], sync_every=128 * KIB)  # 99: past the end, ignored
    assert out.read_bytes() == blob.read_bytes()


def test_arguments_are_checked_before_anything_runs(capsys: pytest.CaptureFixture[str]) -> None:
    args = fmt.parse_args(["--formats", "plain, lz4hc,plain", "--levels", "19,3"])
    assert args.formats == ["plain", "lz4hc"] and args.levels == [3, 19]
    for bad, why in ((["--formats", "squashfs"], "choose from lz4hc"), (["--levels", "x"], "integers"),
                     (["--levels", "30"], "from 1 to 22"), (["--seq-runs", "-1"], "seq-runs"),
                     (["--recordings", "0"], "recordings")):
        with pytest.raises(ValueError, match=why):
            fmt.parse_args(bad)
    assert fmt.main(["--formats", "squashfs"]) == 2
    assert "unknown format" in capsys.readouterr().err


def _result() -> dict[str, Any]:
    def form(study: str, sizes: list[int], loop: float, cache: float) -> dict[str, Any]:
        return {"label": study, "study": study, "mkfs": "erofs-utils 1.5", "mkfs_args": ["-zx"],
                "layers": [{"blob_size": s, "mkfs_seconds": 1.0, "hash_seconds": 0.1, "digest": None}
                           for s in sizes],
                "seq_read_mb_s": {"loop": [loop * 1000], "cache": [cache * 1000]},
                "seq_read_vs_overlay": {"loop": loop, "cache": cache}}

    def wire(node: str, hot: int, whole: int, disk: list[int], ratio: float) -> dict[str, Any]:
        return {"node": node, "wire_codec": "c", "hot_bytes": hot, "hot_bytes_per_layer": [hot],
                "whole_bytes": whole, "node_disk_per_layer": disk, "node_disk_hot": hot, "convert_seconds": 5,
                "hot_seconds_at": {"1gbit": hot / 125e6, "200mbit": hot / 25e6}, "seq_read_vs_overlay": ratio}

    return {"image": "realistic", "command": ["python3", "-c", "x"], "layers": [
        {"digest": "sha256:" + "a" * 64, "size": 10, "unpacked_bytes": 30, "unpack_seconds": 1.0}],
        "formats": {"lz4hc": form("a", [400_000_000], 0.9, 1.2), "plain": form("b", [1_000_000_000], 0.5, 1.0),
                    "zstd": form("c", [300_000_000], 1.1, 0.98), "lz4": form("b", [450_000_000], 1.0, 0.9)},
        "wire": {"lz4hc": wire("lz4hc", 133_000_000, 400_000_000, [400_000_000], 0.9),
                 "plain+zstd3": wire("plain", 94_000_000, 300_000_000, [1_000_000_000], 1.0),
                 "plain+zstd19": {**wire("plain", 92_000_000, 250_000_000, [1_000_000_000], 1.0),
                                  "convert_seconds": 400},
                 "lz4+zstd3": wire("lz4", 80_000_000, 300_000_000, [450_000_000], 0.9),
                 # fewer bytes still, but in 32 KiB chunks: a 16 GB image's index would pass the node's bound
                 "lz4hc+zstd3@32k": {**wire("lz4hc", 75_000_000, 300_000_000, [400_000_000], 0.9),
                                     "chunk_size": 32 * KIB},
                 "zstd": wire("zstd", 70_000_000, 300_000_000, [300_000_000], 0.6)},
        "finer": {"plain": {"pages": 231_000_000, "chunks": {str(c): 1 for c in fmt.FINER}},
                  "plain+zstd3": {str(c): {"hot_bytes": 90_000_000, "whole_bytes": 1} for c in fmt.FINER}},
        "overlay_seq_read_mb_s": [1000.0], "decompress_mb_s": {"zstd3": 350.0}, "seq_file": fmt.SEQ_FILE,
        "skipped": {"lzma": "no erofs-utils newer than 1.5"}, "notes": ["noisy machine"], "wall_seconds": 600}


def test_the_decision_takes_the_fewest_bytes_a_debian_12_node_reads_at_local_speed() -> None:
    d = fmt.decision(_result())
    # zstd EROFS moves the fewest bytes and reads fast enough, but a Linux 6.1 node cannot mount it; lz4 + zstd
    # moves fewer than plain + zstd, but its node file reads at 0.9 × overlayfs as the cache writes it
    assert d["fewest_bytes"] == "zstd" and d["qualifying"] == ["plain+zstd19", "plain+zstd3", "lz4hc"]
    assert d["choice"] == "plain+zstd19" and d["choice_hot_vs_today"] == pytest.approx(92 / 133, abs=1e-3)
    assert d["cheapest"] == "plain+zstd3"  # within 5 % of the choice, converting in a fraction of its time
    assert d["cheapest_disk_vs_today"] == 2.5
    assert fmt.node_read(_result(), "lz4") == 0.9 and fmt.node_read(_result(), "none") is None
    assert fmt.decision({"wire": {}})["choice"] is None


def test_the_report_shows_every_table_and_what_was_not_built() -> None:
    md = fmt.markdown(_result())
    assert "| `plain+zstd3` (c) | 94.0 | 0.71 | 0.75 | 3.76 | 300 | 1000 | 94 | 5 | 0.50 / 1.00 |" in md
    assert "`lzma`: no erofs-utils newer than 1.5" in md
    assert "| `plain` + zstd -3 per chunk | – | 90.0 |" in md
    assert "900 / – / 1200 |" in md  # the ways a format was read, in order, those not measured as –
    assert "- Fewest bytes under the rule: `plain+zstd19`: 92.0 MB, 0.69 × today's hot set" in md
    assert "- Within 5 % of it, converting fastest: `plain+zstd3`: 94.0 MB, 0.71 × today's" in md
    assert "## What implementing it takes" in md and "Index v3" in md
    assert "zstd3 350 MB/s" in md and "noisy machine" in md

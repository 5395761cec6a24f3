"""The snapshotter's plain-Python parts, without gRPC or mounts: config, filters, the metadata store."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from snapshotter.config import Config
from snapshotter.errors import InvalidArgument, NotFound
from snapshotter.filters import parse, parse_all
from snapshotter.metastore import KIND_ACTIVE, MetaStore
from snapshotter.overlay import disk_usage


# ------------------------------------------------------------------------------------------------- config
def test_config_defaults_file_and_overrides(tmp_path: Path) -> None:
    assert Config.load(None) == Config()
    assert Config().root == Path("/var/lib/bootseer/snapshotter")
    assert Config().address == Path("/run/bootseer/snapshotter.sock")
    f = tmp_path / "c.toml"
    f.write_text('root = "/r"\naddress = "/s.sock"\nlog_format = "json"\nmetrics_address = "127.0.0.1:9100"\n'
                 '[snapshotter]\nlog_level = "debug"\n[lazy]\nanything = 1\n')
    cfg = Config.load(f, address=Path("/override.sock"), root=None)
    assert (cfg.root, cfg.address, cfg.log_level, cfg.log_format, cfg.metrics_address) == (
        Path("/r"), Path("/override.sock"), "debug", "json", "127.0.0.1:9100")


@pytest.mark.parametrize("text", ['rooot = "/typo"', 'log_format = "xml"', 'metrics_address = "nope"',
                                  'log_level = "loud"', "root = "])
def test_config_rejects_mistakes(tmp_path: Path, text: str) -> None:
    f = tmp_path / "c.toml"
    f.write_text(text + "\n")
    with pytest.raises(ValueError):
        Config.load(f)


# ------------------------------------------------------------------------------------------------ filters
def _adaptor(fields: dict[str, str]):  # type: ignore[no-untyped-def]
    return lambda path: (fields[".".join(path)], True) if ".".join(path) in fields else ("", False)


@pytest.mark.parametrize(("text", "fields", "match"), [
    ('labels."a.b"==c', {"labels.a.b": "c"}, True),
    ("labels.a.b==c", {"labels.a.b": "c"}, True),
    ('name=="x,y"', {"name": "x,y"}, True),
    ("name==x,kind==view", {"name": "x", "kind": "active"}, False),
    ("labels.foo", {"labels.foo": ""}, True),
    ("labels.foo", {}, False),
    ("name!=x", {}, True),
    ("name~=/^a.c$/", {"name": "abc"}, True),
    ("name~=|b|", {"name": "abc"}, True),
    ("name~=[", {"name": "["}, False),  # a regexp that does not compile matches nothing (as in containerd)
    ('parent==""', {"parent": ""}, True),
    ('name=="tab\\there"', {"name": "tab\there"}, True),
    ("", {}, True),
])
def test_filter_semantics(text: str, fields: dict[str, str], match: bool) -> None:
    assert parse(text).match(_adaptor(fields)) is match


def test_filter_list_is_an_or() -> None:
    fs = parse_all(["name==a", "name==b"])
    assert fs.match(_adaptor({"name": "b"})) and not fs.match(_adaptor({"name": "c"}))
    assert parse_all([]).match(_adaptor({}))


@pytest.mark.parametrize("text", ["==x", "name==", "name=x", "name<>x", 'name=="open', "name==a,", ",name==a",
                                  "name==a b", "labels.'x'==y", "name==/re/", "labels.==x"])
def test_filter_syntax_errors(text: str) -> None:
    with pytest.raises(InvalidArgument):
        parse(text)


# ---------------------------------------------------------------------------------------------- metastore
def test_ids_are_never_reused_and_empty_labels_are_dropped(tmp_path: Path) -> None:
    ms = MetaStore(tmp_path / "m.db")
    try:
        with ms.tx() as tx:
            a = tx.create("ns", "a", "", KIND_ACTIVE, {"x": "1", "empty": ""})
        assert a.labels == {"x": "1"}
        with ms.tx() as tx:
            tx.remove("ns", "a")
        with ms.tx() as tx:
            b = tx.create("ns", "b", "", KIND_ACTIVE, {})
        assert b.id > a.id
        with pytest.raises(NotFound), ms.tx() as tx:
            tx.create("ns", "c", "", KIND_ACTIVE, {})
            tx.get("ns", "missing")  # raising inside the transaction rolls the insert back
        with ms.read() as tx:
            assert [r.key for r in tx.all(None)] == ["b"]
    finally:
        ms.close()
        ms.close()  # closing twice is fine (containerd's CloseTwice)


def test_disk_usage_counts_like_containerd(tmp_path: Path) -> None:
    (tmp_path / "d").mkdir()
    (tmp_path / "d" / "f").write_bytes(b"x" * 10000)
    os.link(tmp_path / "d" / "f", tmp_path / "d" / "g")
    os.symlink("f", tmp_path / "d" / "l")
    size, inodes = disk_usage(tmp_path)
    assert inodes == 4  # root, d, f (=g), l
    assert size == sum(os.lstat(p).st_blocks * 512 for p in (tmp_path, tmp_path / "d", tmp_path / "d" / "f",
                                                              tmp_path / "d" / "l"))
    assert disk_usage(tmp_path / "missing") == (0, 0)


# ------------------------------------------------------------------------------------------- remote hook















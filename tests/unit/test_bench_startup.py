"""The start-up benchmark's pure parts: argument checks, the registry-log byte count, ratio keys the issues
name, the report, and the stargz peer's build key.  No benchmark runs and no Go build here."""

from __future__ import annotations

import json
import os
import tarfile
from pathlib import Path

import pytest

from integration import images
from integration.bench import imagesource, peer, startup


def test_rate_keys_name_the_ratio_suffixes() -> None:
    assert startup.rate_key("1gbit") == "1g"
    assert startup.rate_key("200mbit") == "200m"
    assert startup.rate_key("500kbit") == "500k"


def test_bad_modes_and_rates_are_refused_with_the_choices() -> None:
    with pytest.raises(ValueError, match="choose from overlayfs"):
        startup.parse_modes("overlayfs,nydus")
    with pytest.raises(ValueError, match="bad rate"):
        startup.parse_rates("fast")
    with pytest.raises(ValueError, match="twice"):
        startup.parse_rates("1gbit,1000mbit")
    assert startup.parse_modes("floor, stargz,floor") == ["floor", "stargz"]


def test_main_refuses_bad_arguments_before_touching_the_machine(capsys: pytest.CaptureFixture[str]) -> None:
    assert startup.main(["--modes", "bogus"]) == 2
    assert "unknown mode" in capsys.readouterr().err


def test_registry_bytes_counts_completed_get_responses_only() -> None:
    def line(method: str, written: int) -> str:
        return json.dumps({"http.request.method": method, "http.response.written": written,
                           "msg": "response completed"})

    lines = [line("GET", 1000), line("HEAD", 0), line("PUT", 5000), line("GET", 24),
             '10.0.0.1 - - [23/Nov/2026] "GET /v2/x/blobs/sha256:aa HTTP/1.1" 200 1000',  # access-log twin
             '{"msg": "response completed", broken']
    assert startup.registry_bytes(lines) == 1024


def _runs(per_mode: dict[str, list[float]], rate: str = "1gbit") -> list[startup.Run]:
    """Runs in rounds, as the benchmark makes them: round i has the i-th value of every mode."""
    out = []
    for mode, secs in per_mode.items():
        for i, s in enumerate(secs):
            out.append(startup.Run(mode, rate, s, 0.0, 0, 0, {"round": i}))
    return out


def test_ratios_carry_the_keys_the_issues_ask_for() -> None:
    modes = {"overlayfs": 20.0, "floor": 4.0, "stargz": 11.0, "stargz-optimized": 10.0, "lazy": 8.0,
             "prefetch": 4.6}
    runs = _runs({m: [v, v, v] for m, v in modes.items()}) + _runs({m: [v * 1.5] * 3 for m, v in modes.items()},
                                                                   "200mbit")
    ratios = startup.compute_ratio_spreads(runs, ["1gbit", "200mbit"])
    for k in ("prefetch_vs_full_pull_1g", "prefetch_vs_floor_1g", "prefetch_vs_full_pull_200m",
              "prefetch_vs_floor_200m", "prefetch_vs_stargz_opt_1g",
              "prefetch_vs_stargz_opt_200m", "stargz_opt_vs_floor_1g", "stargz_opt_vs_floor_200m",
              "lazy_vs_full_pull_1g", "lazy_vs_floor_200m"):
        assert k in ratios, k
    assert ratios["prefetch_vs_stargz_opt_1g"].median == pytest.approx(0.46)
    goals = startup.goal_status(ratios)
    assert goals["prefetch_vs_stargz_opt_1g"]["verdict"] == "not met"  # 0.46 > 0.45 in every round
    assert goals["prefetch_vs_floor_1g"]["verdict"] == "met"  # 1.15 ≤ 1.2
    assert goals["swapped_seq_read_vs_overlay"]["verdict"] == "not measured"


def test_a_goal_whose_rounds_straddle_it_is_inconclusive() -> None:
    # median ratio 1.15 meets ≤ 1.2, but one round gave 1.5: the noise is larger than the distance
    runs = _runs({"floor": [4.0, 4.0, 4.0], "prefetch": [4.6, 4.4, 6.0]})
    s = startup.compute_ratio_spreads(runs, ["1gbit"])["prefetch_vs_floor_1g"]
    assert (s.median, s.lo, s.hi, s.n) == (pytest.approx(1.15), 1.1, 1.5, 3)
    assert startup.goal_status({"prefetch_vs_floor_1g": s})["prefetch_vs_floor_1g"]["verdict"] == "inconclusive"


def test_unmeasured_modes_leave_their_ratios_out() -> None:
    ratios = startup.compute_ratio_spreads(_runs({"overlayfs": [20.0], "floor": [4.0], "stargz-optimized": [9.0]}),
                                           ["1gbit"])
    assert "prefetch_vs_floor_1g" not in ratios
    assert ratios["stargz_opt_vs_floor_1g"].median == 2.25
    assert startup.goal_status(ratios)["prefetch_vs_floor_1g"]["verdict"] == "not measured"


def test_markdown_report_shows_every_measured_mode_and_why_others_are_missing() -> None:
    runs = _runs({"overlayfs": [20.0, 21.0, 19.0], "floor": [4.0, 4.0, 4.0], "stargz-optimized": [9.0, 9.0, 9.0]})
    for r in runs:
        r.link_bytes = 305_000_000
    res = startup.summarize(runs, ["1gbit"], ["overlayfs", "floor", "stargz-optimized"], 5,
                            {"prefetch": "this checkout has no `bootseer record`"}, None, 1000, 1.0)
    res["command"] = ["python3", "-c", "x"]
    md = startup.markdown(res)
    assert "| overlayfs (full pull) | 20.00 [19.00–21.00] | 5.00 | 305 |" in md
    assert "median [min–max] of 3 cold runs" in md  # what ran, not the 5 asked for
    assert res["run_counts"] == {"1g": {"overlayfs": 3, "floor": 3, "stargz-optimized": 3}}
    assert "stargz optimized" in md and "BootSeer lazy" not in md
    assert "`prefetch`: this checkout has no `bootseer record`" in md
    assert "`stargz_opt_vs_floor_1g` | 2.250 |" in md


def test_bootseer_modes_name_the_missing_command() -> None:
    assert startup.bootseer_mode_missing("lazy", {"pull", "convert"}) is None
    assert "`bootseer record`" in (startup.bootseer_mode_missing("prefetch", {"pull", "convert"}) or "")
    assert startup.bootseer_mode_missing("stargz", set()) is None


def test_peer_build_key_follows_its_sources_and_compiler(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    for name in ("main.go", "build.sh"):
        (tmp_path / name).write_bytes((peer.SOURCE_DIR / name).read_bytes())
    monkeypatch.setattr(peer, "SOURCE_DIR", tmp_path)
    a = peer.source_key("go1.19")
    assert peer.source_key("go1.19") == a
    assert peer.source_key("go1.21") != a
    (tmp_path / "main.go").write_text((tmp_path / "main.go").read_text() + "\n// changed\n")
    assert peer.source_key("go1.19") != a


def test_peer_missing_packages_are_named(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(peer.shutil, "which", lambda _name: None)
    monkeypatch.setattr(peer, "GO_SOURCES", Path("/nonexistent"))
    why = peer.missing() or ""
    assert "ctr-remote" in why and "golang-go" in why and "apt-get install" in why
    with pytest.raises(peer.PeerUnavailable):
        peer.build(Path("/nonexistent-cache"))


def test_summary_takes_medians_and_flags_a_prefetch_that_fetched_nothing() -> None:
    def run(mode: str, secs: float, link: int = 0, **extra: int) -> startup.Run:
        return startup.Run(mode, "1gbit", secs, 0.0, link, link, {k: v for k, v in extra.items()})

    runs = [run("floor", s) for s in (4.0, 3.0, 5.0)]
    runs += [run("prefetch", s, link=300, fetched_demand=100, fetched_prefetch=0, fetched_background=200)
             for s in (6.0, 8.0, 7.0)]
    res = startup.summarize(runs, ["1gbit"], ["floor", "prefetch"], 3, {}, manifest_bytes=200,
                            image_compressed=1000, seconds=1.0, seq={"floor": [1000.0, 900.0], "lazy": [450.0, 450.0]})
    assert res["median_seconds"] == {"1g": {"floor": 4.0, "prefetch": 7.0}}
    assert res["ratios"]["prefetch_vs_floor_1g"] == 1.75
    assert res["ratios"]["fetched_vs_hotset_1g"] == 1.5
    assert res["ratios"]["demand_prefetch_vs_hotset_1g"] == 0.5
    assert res["ratios"]["swapped_seq_read_vs_overlay"] == 0.4737
    assert res["ratio_spreads"]["swapped_seq_read_vs_overlay"] == {"median": 0.4737, "min": 0.45, "max": 0.5,
                                                                   "n": 2}
    assert res["fetched_by_kind_to_output"]["1g"]["prefetch"] == {"demand": 100, "prefetch": 0, "background": 200}
    assert any("fetched 0 bytes by prefetch" in n for n in res["notes"])
    assert "fetched 0 bytes by prefetch" in startup.markdown(res)


# ------------------------------------------------------------------ --image, --command, --expect (issue 20)
def test_image_sources_name_their_transport(tmp_path: Path) -> None:
    assert imagesource.parse_image("realistic") == imagesource.ImageSource("builtin", "realistic")
    assert imagesource.parse_image(" realistic-split ").builtin
    src = imagesource.parse_image("ghcr.io/acme/train:v3")
    assert (src.kind, src.skopeo()) == ("docker", "docker://ghcr.io/acme/train:v3")
    assert imagesource.parse_image("docker://127.0.0.1:5000/a/b:v1").skopeo() == "docker://127.0.0.1:5000/a/b:v1"
    archive = tmp_path / "img.tar"
    archive.write_bytes(b"")
    assert imagesource.parse_image(f"oci-archive:{archive}").skopeo() == f"oci-archive:{archive}"
    assert imagesource.parse_image(f"oci-archive:{archive}:app:v2").skopeo() == f"oci-archive:{archive}:app:v2"
    (tmp_path / "layout").mkdir()
    (tmp_path / "layout" / "index.json").write_text("{}")
    assert imagesource.parse_image(f"oci:{tmp_path / 'layout'}:v1").kind == "oci"


@pytest.mark.parametrize(("text", "why"), [
    ("", "empty"),
    ("oci-archive:/nonexistent/img.tar", "no such file"),
    ("oci:/nonexistent", "no such directory"),
    ("docker-archive:/tmp/x.tar", "give a registry reference"),
    ("https://ghcr.io/acme/train", "give a registry reference"),
    ("Bad Ref", "Bad Ref"),
])
def test_bad_image_sources_are_refused_with_the_reason(text: str, why: str) -> None:
    with pytest.raises(ValueError, match=why):
        imagesource.parse_image(text)


def test_an_oci_archive_must_be_a_file_and_a_layout_a_layout(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="not a file"):
        imagesource.parse_image(f"oci-archive:{tmp_path}")
    with pytest.raises(ValueError, match="not an OCI layout"):
        imagesource.parse_image(f"oci:{tmp_path}")


def test_an_image_of_ones_own_needs_a_command_and_an_expected_line() -> None:
    src = imagesource.parse_image("ghcr.io/acme/train:v3")
    with pytest.raises(ValueError, match="needs --command and --expect"):
        imagesource.workload(src, None, None, None)
    with pytest.raises(ValueError, match="needs --expect"):
        imagesource.workload(src, "python3 -c 'print(1)'", None, None)
    with pytest.raises(ValueError, match="--command is empty"):
        imagesource.workload(src, "  ", "1", None)
    with pytest.raises(ValueError, match="--expect is empty"):
        imagesource.workload(src, "true", " ", None)
    w = imagesource.workload(src, "python3 -c 'import torch; print(\"ready\")'", "ready", None)
    assert w.command == ["python3", "-c", 'import torch; print("ready")'] and w.expect == "ready"
    assert w.seq_read_file is None  # no figure for a file nobody named
    # the built-in images keep the realistic command, its line and its largest file
    d = imagesource.workload(imagesource.parse_image("realistic-split"), None, None, None)
    assert d.command == list(images.REALISTIC_CMD) and d.expect in images.REALISTIC_OUTPUT
    assert d.seq_read_file == startup.SEQ_READ_FILE


def test_main_refuses_an_image_without_its_command_before_touching_the_machine(
        capsys: pytest.CaptureFixture[str]) -> None:
    assert startup.main(["--image", "ghcr.io/acme/train:v3", "--expect", "ready"]) == 2
    assert "needs --command" in capsys.readouterr().err
    assert startup.main(["--image", "oci-archive:/nonexistent.tar", "--command", "true", "--expect", "x"]) == 2
    assert "no such file" in capsys.readouterr().err


def _entry(name: str, size: int = 0, link: str | None = None) -> imagesource.Entry:
    return imagesource.Entry(name, size, link)


def test_split_cuts_by_bytes_and_never_between_a_hard_link_and_its_target() -> None:
    es = [_entry(f"f{i}", 10) for i in range(8)]
    assert imagesource.plan_cuts(es, 4) == [2, 4, 6]
    assert imagesource.plan_cuts(es, 1) == [] and imagesource.plan_cuts([], 3) == []
    # f5 is a hard link to f1: no cut may fall in between, so the first piece runs on to f5
    linked = [*es[:5], _entry("f5", 0, "f1"), *es[6:]]
    cuts = imagesource.plan_cuts(linked, 4)
    assert all(not 1 < c <= 5 for c in cuts), cuts
    # one file bigger than a piece is a piece of its own, and the rest still spread over the pieces left
    big = [_entry("a", 10), _entry("big", 100), _entry("b", 10), _entry("c", 10), _entry("d", 10)]
    assert imagesource.plan_cuts(big, 3) == [1, 2]


def test_each_split_piece_holds_the_parent_directories_of_its_files() -> None:
    def info(name: str, kind: bytes = tarfile.REGTYPE) -> tarfile.TarInfo:
        ti = tarfile.TarInfo(name)
        ti.type, ti.mode, ti.uid = kind, 0o751, 7
        return ti

    dirs = {"usr": info("usr/", tarfile.DIRTYPE), "usr/lib": info("usr/lib/", tarfile.DIRTYPE),
            "usr/lib/torch": info("usr/lib/torch/", tarfile.DIRTYPE)}
    held: set[str] = set()
    got = imagesource.parents_to_add(info("usr/lib/torch/a.so"), dirs, held)
    # outermost first, the original entries (owner, mode) — so an unpacker creates them as the image had them
    assert [d.name for d in got] == ["usr/", "usr/lib/", "usr/lib/torch/"] and got[2].uid == 7
    # a second file of the same directory needs nothing more in this piece
    assert imagesource.parents_to_add(info("usr/lib/torch/b.so"), dirs, held) == []
    # a parent the layer never had (it came from a lower layer) is not made up
    assert imagesource.parents_to_add(info("etc/x"), dirs, set()) == []
    assert imagesource.parents_to_add(info("usr/lib/torch/sub/"), dirs, {"usr"}) == [dirs["usr/lib"],
                                                                                      dirs["usr/lib/torch"]]


def test_per_layer_rows_match_blobs_to_layers_and_count_allocated_blocks(tmp_path: Path) -> None:
    cache = tmp_path / "cache" / "abc"
    cache.mkdir(parents=True)
    (cache / "meta.json").write_text(json.dumps({"digest": "sha256:" + "b" * 64}))
    with open(cache / "data", "wb") as fh:  # sparse: 1 MiB written of a 64 MiB file
        fh.truncate(64 << 20)
        fh.seek(8 << 20)
        fh.write(b"x" * (1 << 20))
    dirs = startup.cache_dirs(tmp_path / "cache")
    assert dirs == {"sha256:" + "b" * 64: cache}
    docs = [{"digest": "sha256:" + "b" * 64, "size": 64 << 20, "fetched": {"bytes": {"demand": 3, "prefetch": 4}}},
            {"digest": "sha256:" + "c" * 64, "size": 5, "fetched": {"bytes": {"demand": 1}}},  # another image's
            {"digest": "sha256:" + "d" * 64, "size": 7}]
    where = {"sha256:" + "b" * 64: {"layer": "sha256:" + "1" * 64, "position": 2},
             "sha256:" + "d" * 64: {"layer": "sha256:" + "2" * 64, "position": 1}}
    rows = startup.layer_rows(docs, where, dirs)
    assert [r["position"] for r in rows] == [1, 2]
    assert rows[1]["fetched_to_output"] == 7 and rows[1]["blob_size"] == 64 << 20
    assert (1 << 20) <= rows[1]["disk_at_output"] < (2 << 20)  # the sparse file's blocks, not its size
    assert rows[0]["disk_at_output"] == 0 and rows[0]["fetched_to_output"] == 0
    assert startup.fetched_by_kind(docs) == {"demand": 4, "prefetch": 4, "background": 0}
    assert startup.fetched_by_kind(None) == {}


def test_per_layer_figures_reach_the_json_the_table_and_the_report(capsys: pytest.CaptureFixture[str]) -> None:
    def layer(pos: int, fetched: int) -> dict[str, object]:
        return {"position": pos, "layer": f"sha256:{pos}" + "0" * 63, "blob": "sha256:" + "e" * 64,
                "blob_size": 50_000_000, "fetched_to_output": fetched, "disk_at_output": fetched + 4096}

    runs = [startup.Run("lazy", "1gbit", s, 0.0, 40_000_000, 0, {"round": i, "layers": [layer(1, f), layer(2, 0)]})
            for i, (s, f) in enumerate([(5.0, 10_000_000), (6.0, 30_000_000), (7.0, 20_000_000)])]
    res = startup.summarize(runs, ["1gbit"], ["lazy"], 3, {}, None, 1000, 1.0, image="ghcr.io/acme/train:v3",
                            command=["serve"], layer_sizes=[600, 400], seq_read_file=None)
    assert res["image"] == "ghcr.io/acme/train:v3" and res["command"] == ["serve"]
    assert res["image_layers"] == [600, 400] and res["seq_read_file"] is None
    rows = res["layers"]["1g"]["lazy"]
    assert [(r["position"], r["fetched_to_output"], r["n"]) for r in rows] == [(1, 20_000_000, 3), (2, 0, 3)]
    md = startup.markdown(res)
    assert "| 1g | BootSeer lazy | 1 | `100000000000` | 50.0 | 20.0 | 20.0 |" in md
    assert "# Start-up benchmark: ghcr.io/acme/train:v3" in md
    startup.report(res)
    out = capsys.readouterr().out
    assert "lazy 6.00 s (40 MB wire)" in out
    assert "lazy layer 1 sha256:100000000000: blob 50.0 MB, fetched 20.0 MB, disk 20.0 MB" in out


def test_process_cpu_is_what_the_kernel_accounts_and_none_for_no_process() -> None:
    from integration.bench.cpu import process_seconds

    t = os.times()
    own = process_seconds(os.getpid())
    after = os.times()
    assert own is not None
    assert t.user + t.system + t.children_user + t.children_system - 0.02 <= own
    assert own <= after.user + after.system + after.children_user + after.children_system + 0.02
    assert process_seconds(None) is None
    assert process_seconds(2**22 + 1) is None  # above pid_max's ceiling: never a process


def test_cpu_per_mode_reaches_the_json_and_the_table() -> None:
    before = {"busy": 100.0, "registry": 5.0, "snapshotter": 2.0, "containerd": 1.0}
    after = {"busy": 101.6, "registry": 5.6, "snapshotter": 2.75, "containerd": 1.05}
    spent = startup.cpu_spent(before, after, 1.0)
    cores = os.cpu_count() or 1
    assert spent["busy"] == 1.6 and spent["registry"] == 0.6 and spent["snapshotter"] == 0.75
    assert spent["idle"] == round(max(0.0, cores - 1.6), 3)
    assert startup.cpu_spent({"busy": 1.0}, {"busy": 2.0, "registry": 1.0}, 1.0).keys() == {"busy", "idle"}

    runs = [startup.Run("prefetch", "1gbit", s, 1.0, 0, 0,
                        {"round": i, "cpu_pull": {"busy": b, "registry": r},
                         "cpu_to_output": {"busy": 2 * b, "registry": 2 * r}})
            for i, (s, b, r) in enumerate([(4.0, 1.5, 0.5), (5.0, 1.7, 0.7), (6.0, 1.6, 0.9)])]
    res = startup.summarize(runs, ["1gbit"], ["prefetch"], 3, {}, None, 1000, 1.0)
    assert res["cpu_seconds"]["1g"]["prefetch"] == {"pull": {"busy": 1.6, "registry": 0.7},
                                                    "to_output": {"busy": 3.2, "registry": 1.4}}
    md = startup.markdown(res)
    assert "| BootSeer lazy + prefetch @ 1g | pull | 1.60 | – | 0.70 | – | – |" in md
    floor = [startup.Run("floor", "1gbit", 3.0, 0.0, 0, 0, {"round": 0, "cpu_to_output": {"busy": 2.5}})]
    res = startup.summarize(floor, ["1gbit"], ["floor"], 1, {}, None, 1000, 1.0)
    assert res["cpu_seconds"]["1g"]["floor"] == {"pull": {}, "to_output": {"busy": 2.5}}
    md = startup.markdown(res)
    assert "| floor (local, cold cache) @ 1g | to output | 2.50 |" in md and "@ 1g | pull |" not in md
    assert "pull CPU 1.60 core-s busy" in startup.cpu_text({"busy": 1.6, "idle": 0.4, "registry": 0.7})

"""The depsnap key changes with what can change an install's result, and only with that."""

from __future__ import annotations

from pathlib import Path

import pytest

from depsnap.key import DepSpec, SpecError, normalize_requirement, read_requirements

BASE = "sha256:" + "a" * 64
OTHER = "sha256:" + "b" * 64


def spec(tmp: Path, text: str, **kw) -> DepSpec:  # type: ignore[no-untyped-def]
    p = tmp / f"req-{abs(hash(text))}.txt"
    p.write_text(text)
    return DepSpec(base_digest=kw.pop("base", BASE), requirements=[p], command=kw.pop("command", "pip install"), **kw)


def test_same_inputs_same_key(tmp_path: Path) -> None:
    assert spec(tmp_path, "numpy==1.26.4\nrequests\n").key() == spec(tmp_path, "numpy==1.26.4\nrequests\n").key()


def test_formatting_does_not_change_the_key(tmp_path: Path) -> None:
    a = spec(tmp_path, "numpy==1.26.4\nRequests[Socks,security] >= 2.0 , <3\n")
    b = spec(tmp_path, "# deps\n\nrequests[security,socks]>=2.0,<3   # http\n\nNumPy == 1.26.4\n")
    assert a.key() == b.key()


@pytest.mark.parametrize("change", [
    {"text": "numpy==1.26.5\nrequests\n"},
    {"text": "numpy==1.26.4\n"},
    {"base": OTHER},
    {"command": "pip install --no-deps"},
    {"apt": ["libgomp1"]},
    {"platform": "linux/arm64"},
])
def test_a_real_change_changes_the_key(tmp_path: Path, change: dict) -> None:
    ref = spec(tmp_path, "numpy==1.26.4\nrequests\n").key()
    text = change.pop("text", "numpy==1.26.4\nrequests\n")
    assert spec(tmp_path, text, **change).key() != ref


def test_includes_are_followed_by_content(tmp_path: Path) -> None:
    (tmp_path / "sub").mkdir()
    inc = tmp_path / "sub" / "base.txt"
    inc.write_text("six==1.16.0\n-c pins.txt\n")
    (tmp_path / "sub" / "pins.txt").write_text("idna==3.7\n")
    top = tmp_path / "req.txt"
    top.write_text("-r sub/base.txt\nrequests\n")
    r = read_requirements(top)
    assert r == {"requirements": ["six==1.16.0", "requests"], "constraints": ["idna==3.7"]}
    k1 = DepSpec(BASE, requirements=[top]).key()
    (tmp_path / "sub" / "pins.txt").write_text("idna==3.8\n")  # only the included file changed
    assert DepSpec(BASE, requirements=[top]).key() != k1


def test_named_input_files_count(tmp_path: Path) -> None:
    f = tmp_path / "setup.sh"
    f.write_text("echo 1\n")
    k1 = DepSpec(BASE, files=[f], command="sh setup.sh").key()
    f.write_text("echo 2\n")
    assert DepSpec(BASE, files=[f], command="sh setup.sh").key() != k1


def test_unpinned_requirements_are_reported(tmp_path: Path) -> None:
    s = spec(tmp_path, "numpy==1.26.4\nrequests>=2\n")
    assert s.inputs()["unpinned"] == ["requests>=2"]


def test_bad_specs_are_clear_errors(tmp_path: Path) -> None:
    with pytest.raises(SpecError, match="resolved manifest digest"):
        DepSpec("myimage:latest")
    (tmp_path / "a.txt").write_text("-r b.txt\n")
    (tmp_path / "b.txt").write_text("-r a.txt\n")
    with pytest.raises(SpecError, match="cycle"):
        read_requirements(tmp_path / "a.txt")
    (tmp_path / "c.txt").write_text("-r missing.txt\n")
    with pytest.raises(SpecError, match="cannot read"):
        read_requirements(tmp_path / "c.txt")


def test_normalize_requirement() -> None:
    assert normalize_requirement("Foo_Bar.baz [X , y]  ==1.0 ; python_version < '3.12'") == \
        "foo-bar-baz[x,y]==1.0; python_version < '3.12'"
    assert normalize_requirement("--index-url   http://x/simple") == "--index-url http://x/simple"


def test_cli_resolves_the_tag_and_prints_the_key(stack, small_image: str, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    import json
    import subprocess
    import sys

    req = tmp_path / "requirements.txt"
    req.write_text("six==1.16.0\n")
    out = subprocess.run([sys.executable, "-m", "bootseer.cli", "depsnap", "key", "--base", small_image,
                          "-r", str(req), "--run", "pip install -r requirements.txt", "--plain-http", "--json"],
                         capture_output=True, text=True, check=True)
    doc = json.loads(out.stdout)
    manifest = subprocess.run(["skopeo", "inspect", "--tls-verify=false", f"docker://{small_image}"],
                              capture_output=True, text=True, check=True)
    assert doc["inputs"]["base"] == json.loads(manifest.stdout)["Digest"]
    assert doc["tag"] == "depsnap-" + doc["key"][:32]


def test_input_files_of_one_name_in_two_directories_are_two_inputs(tmp_path: Path) -> None:
    """Issue 18 item 9: keyed by basename, a/setup.sh and b/setup.sh with swapped contents gave one key."""
    for d, text in (("a", "echo 1\n"), ("b", "echo 2\n")):
        (tmp_path / d).mkdir()
        (tmp_path / d / "setup.sh").write_text(text)
    (tmp_path / "requirements.txt").write_text("six==1.16.0\n")  # the context: the requirements' directory
    req = [tmp_path / "requirements.txt"]
    one = DepSpec(BASE, requirements=req, files=[tmp_path / "a" / "setup.sh"], command="sh setup.sh")
    two = DepSpec(BASE, requirements=req, files=[tmp_path / "b" / "setup.sh"], command="sh setup.sh")
    (tmp_path / "b" / "setup.sh").write_text("echo 1\n")  # same content, another place in the context
    assert one.key() != two.key()
    assert list(one.inputs()["files"]) == ["a/setup.sh"]
    assert list(DepSpec(BASE, files=[tmp_path / "a" / "setup.sh"], context=tmp_path / "a").inputs()["files"]) == \
        ["setup.sh"]


def test_the_command_is_keyed_by_its_argv(tmp_path: Path) -> None:
    """Issue 18 item 9: joined, `echo 'a b'` and `echo a b` (different installs) shared a key."""
    assert DepSpec(BASE, command="echo 'a b'").key() != DepSpec(BASE, command="echo a b").key()
    assert DepSpec(BASE, command="echo  a   b").key() == DepSpec(BASE, command="echo a b").key()
    with pytest.raises(SpecError, match="cannot parse the install command"):
        DepSpec(BASE, command="echo 'a").key()

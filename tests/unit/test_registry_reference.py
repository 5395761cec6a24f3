"""Image reference parsing: docker's defaulting rules, ports, tags, digests, and the errors for bad input."""

from __future__ import annotations

import pytest

from bootseer.reference import Reference, ReferenceError, is_loopback

D = "sha256:" + "a" * 64


@pytest.mark.parametrize(
    ("text", "registry", "repo", "tag", "digest"),
    [
        ("busybox", "docker.io", "library/busybox", "latest", None),
        ("busybox:1.36", "docker.io", "library/busybox", "1.36", None),
        ("library/busybox", "docker.io", "library/busybox", "latest", None),
        ("docker.io/busybox", "docker.io", "library/busybox", "latest", None),
        ("index.docker.io/library/busybox", "docker.io", "library/busybox", "latest", None),
        ("someone/tool", "docker.io", "someone/tool", "latest", None),
        ("ghcr.io/org/sub/img:v1", "ghcr.io", "org/sub/img", "v1", None),
        ("localhost/img", "localhost", "img", "latest", None),
        ("localhost:5000/img:t", "localhost:5000", "img", "t", None),
        ("127.0.0.1:5000/bootseer/small:v1", "127.0.0.1:5000", "bootseer/small", "v1", None),
        ("[::1]:5000/a/b", "[::1]:5000", "a/b", "latest", None),
        (f"busybox@{D}", "docker.io", "library/busybox", None, D),
        (f"r.io:443/a/b:tag@{D}", "r.io:443", "a/b", "tag", D),
        ("my-registry.local/a__b/c.d-e:1.0_rc-1", "my-registry.local", "a__b/c.d-e", "1.0_rc-1", None),
    ],
)
def test_parse(text: str, registry: str, repo: str, tag: str | None, digest: str | None) -> None:
    ref = Reference.parse(text)
    assert (ref.registry, ref.repository, ref.tag, ref.digest) == (registry, repo, tag, digest)
    assert Reference.parse(str(ref)) == ref  # the canonical form parses back to itself


@pytest.mark.parametrize(
    ("text", "why"),
    [
        ("", "empty"),
        ("Busybox", "repository"),
        ("a//b", "repository"),
        ("a/b:", "tag"),
        ("a/b:-x", "tag"),
        ("a/b@sha256:abc", "digest"),
        ("a/b@sha256:" + "A" * 64, "sha256"),
        ("https://r.io/a/b", "scheme"),
        ("r.io/a/b:" + "x" * 200, "tag"),
        ("bad_host:99/x", "registry host"),
    ],
)
def test_parse_errors(text: str, why: str) -> None:
    with pytest.raises(ReferenceError, match=why):
        Reference.parse(text)


def test_views() -> None:
    ref = Reference.parse("busybox:1.36")
    assert ref.api_host == "registry-1.docker.io"
    assert ref.name == "docker.io/library/busybox"
    assert ref.familiar() == "busybox:1.36"
    assert ref.reference == "1.36"
    pinned = ref.with_digest(D)
    assert pinned.reference == D and str(pinned) == f"docker.io/library/busybox:1.36@{D}"
    other = Reference.parse("127.0.0.1:5000/a/b:t").in_repository("c/d")
    assert str(other) == "127.0.0.1:5000/c/d" and other.tag is None
    assert Reference.parse("127.0.0.1:5000/a/b").api_host == "127.0.0.1:5000"


@pytest.mark.parametrize(("host", "loop"), [("localhost:5000", True), ("127.0.0.1", True), ("127.3.2.1:80", True),
                                             ("[::1]:5000", True), ("10.0.0.1:5000", False), ("ghcr.io", False)])
def test_loopback(host: str, loop: bool) -> None:
    assert is_loopback(host) is loop

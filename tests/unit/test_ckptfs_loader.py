"""ckptfs.load_safetensors / torch_load (issue 21): the CPU path of the device loader is what CI runs.

The loader must return exactly the checkpoint's tensors, fail a load whose chunk is corrupt without
returning anything, and treat the safetensors header as hostile input.
"""

from __future__ import annotations

import json
import struct
from pathlib import Path
from typing import Any

import pytest

torch = pytest.importorskip("torch")
st = pytest.importorskip("safetensors.torch")

import ckptfs  # noqa: E402
from ckptfs.errors import CorruptChunkError  # noqa: E402
from ckptfs.loader import SafetensorsHeaderError  # noqa: E402
from ckptfs.reader import Checkpoint, ReaderOptions  # noqa: E402

CS = 64 << 10  # small chunks: tensors straddle chunks and stripes


def _tensors() -> dict[str, Any]:
    g = torch.Generator().manual_seed(3)
    return {
        "embed.weight": torch.randn(300, 97, generator=g).to(torch.bfloat16),  # spans many chunks
        "layer.0.w": torch.randn(64, 33, generator=g).to(torch.float16),
        "layer.0.b": torch.randn(33, generator=g),
        "step": torch.tensor(12000, dtype=torch.int64),  # 0-d
        "ids": torch.randint(-(2**40), 2**40, (1000,), generator=g, dtype=torch.int64),
        "mask": torch.rand(77, generator=g) > 0.5,
        "i8": torch.randint(-128, 127, (5, 7), generator=g, dtype=torch.int8),
        "empty": torch.empty(0, 4),
        "f64": torch.randn(3, 3, 3, generator=g, dtype=torch.float64),
    }


@pytest.fixture
def stored(tmp_path: Path) -> tuple[str, Path]:
    src = tmp_path / "src"
    src.mkdir()
    st.save_file(_tensors(), str(src / "model.safetensors"), metadata={"format": "pt"})
    torch.save({"w": torch.arange(10.0), "nested": {"b": torch.ones(2, dtype=torch.bfloat16)}, "step": 7},
               src / "optim.pt")
    uri = f"file://{tmp_path}/store"
    ckptfs.put(src, uri, chunk_size=CS, stripes=3)
    return uri, src


def _assert_same(got: dict[str, Any], want: dict[str, Any]) -> None:
    assert list(got) == list(want) or set(got) == set(want)
    for name, w in want.items():
        g = got[name]
        assert g.dtype == w.dtype and g.shape == w.shape and g.device.type == "cpu", name
        assert torch.equal(g, w), name


def test_load_safetensors_returns_exactly_the_checkpoints_tensors(stored: tuple[str, Path]) -> None:
    uri, src = stored
    want = st.load_file(str(src / "model.safetensors"))
    _assert_same(ckptfs.load_safetensors(uri, "model.safetensors", device="cpu"), want)
    # An open checkpoint, and a ring of only two staging buffers (every buffer reused many times).
    with Checkpoint(uri, reader_options=ReaderOptions(threads=3)) as ck:
        _assert_same(ckptfs.load_safetensors(ck, "model.safetensors", staging_buffers=2), want)


def test_torch_load_matches_torch_load(stored: tuple[str, Path]) -> None:
    uri, src = stored
    want = torch.load(src / "optim.pt")
    got = ckptfs.torch_load(uri, "optim.pt", map_location="cpu")
    assert got["step"] == 7 and torch.equal(got["w"], want["w"])
    assert got["nested"]["b"].dtype == torch.bfloat16 and torch.equal(got["nested"]["b"], want["nested"]["b"])


def test_corrupt_chunk_fails_the_load_and_yields_no_tensor(stored: tuple[str, Path]) -> None:
    uri, _ = stored
    with Checkpoint(uri) as ck:
        f = ck.file("model.safetensors")
        ref = f.chunks[len(f.chunks) // 2]  # in the middle of the tensor data
        obj = Path(ck.store.join(ck.manifest.objects[ref.obj].path))
    raw = bytearray(obj.read_bytes())
    raw[ref.offset + 100] ^= 0xFF
    obj.write_bytes(bytes(raw))
    result = None
    with pytest.raises(CorruptChunkError, match="corrupt"):
        result = ckptfs.load_safetensors(uri, "model.safetensors",
                                         reader_options=ReaderOptions(retries=1, backoff=0.0))
    assert result is None


def _hostile(tmp_path: Path, header: bytes | dict[str, object], data: bytes = b"\0" * 64,
             length: int | None = None) -> str:
    raw = json.dumps(header).encode() if isinstance(header, dict) else header
    n = len(raw) if length is None else length
    src = tmp_path / "hsrc"
    src.mkdir(exist_ok=True)
    (src / "x.safetensors").write_bytes(struct.pack("<Q", n) + raw + data)
    uri = str(tmp_path / "hstore")
    ckptfs.put(src, uri, chunk_size=CS)
    return uri


def _t(dtype: str, shape: list[object], offs: list[object]) -> dict[str, object]:
    return {"dtype": dtype, "shape": shape, "data_offsets": offs}


@pytest.mark.parametrize(
    ("header", "length", "msg"),
    [
        (b"{}", 1 << 62, "header length"),  # would be a 4 EiB allocation if believed
        (b"{}", 10_000, "header length"),  # beyond the file
        (b"\xff\xfe{", None, "not valid JSON"),
        (b"[1, 2]", None, "not a JSON object"),
        (b"[" * 100_000 + b"]" * 100_000, None, "not valid JSON"),  # nesting bomb
        ({"a": _t("F32", [4], [0, 16]), "b": _t("F32", [4], [8, 24])}, None, "overlap"),
        ({"a": _t("F32", [100], [0, 400])}, None, "outside the data section"),
        ({"a": _t("F32", [4], [32, 16])}, None, "outside the data section"),
        ({"a": _t("F32", [5], [0, 16])}, None, "needs 20 bytes"),
        ({"a": _t("F32", [-4], [0, 16])}, None, "non-negative"),
        ({"a": _t("F32", [True, 4], [0, 16])}, None, "non-negative"),
        ({"a": _t("F32", [4], [0.0, 16])}, None, "non-negative"),
        ({"a": _t("C64", [2], [0, 16])}, None, "unsupported dtype"),
        ({"a": {"dtype": "F32", "shape": [4]}}, None, "exactly dtype"),
        ({"__metadata__": {"k": 1}}, None, "__metadata__"),
        (b'{"a": {"dtype": "U8", "shape": [1], "data_offsets": [0, 1]}, '
         b'"a": {"dtype": "U8", "shape": [1], "data_offsets": [1, 2]}}', None, "duplicate key"),
    ],
)
def test_hostile_safetensors_header_is_refused(tmp_path: Path, header: bytes | dict[str, object],
                                               length: int | None, msg: str) -> None:
    uri = _hostile(tmp_path, header, length=length)
    with pytest.raises(SafetensorsHeaderError, match=msg):
        ckptfs.load_safetensors(uri, "x.safetensors")


def test_well_formed_header_from_the_same_helper_loads(tmp_path: Path) -> None:
    """The hostile cases above differ from a valid file only in what they break."""
    data = struct.pack("<4f", 1, 2, 3, 4) + bytes([7])
    uri = _hostile(tmp_path, {"a": _t("F32", [2, 2], [0, 16]), "b": _t("U8", [], [16, 17]),
                              "__metadata__": {"k": "v"}}, data=data)
    got = ckptfs.load_safetensors(uri, "x.safetensors")
    assert torch.equal(got["a"], torch.tensor([[1.0, 2.0], [3.0, 4.0]])) and got["b"].item() == 7

"""The hand-written GGUF header reader against gguf's own reader on files written by gguf."""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import pytest

gguf = pytest.importorskip("gguf")

from shrink.core.errors import ShrinkError  # noqa: E402
from shrink.runtime import gguf_header  # noqa: E402
from shrink.runtime.gguf import _gguf_fields, check_gguf_file  # noqa: E402
from shrink.runtime.gguf_quant import tensor_type_counts  # noqa: E402

REAL = Path("/work/runs/prof/stages/03-export/gguf/smollm2-135m-24L-IQ4_NL.gguf")
LONG = 3000  # longer than the reader's default max_array


def _write(path: Path, alignment: int | None = None) -> Path:
    w = gguf.GGUFWriter(str(path), "llama")
    if alignment:
        w.add_custom_alignment(alignment)
    w.add_string("general.name", "tiny ünïcode")
    w.add_uint32("llama.block_count", 3)
    w.add_int64("test.i64", -(1 << 40))
    w.add_uint64("test.u64", (1 << 63) + 5)
    w.add_int8("test.i8", -7)
    w.add_uint16("test.u16", 65000)
    w.add_float32("test.f32", 0.1)
    w.add_float64("test.f64", 1e-300)
    w.add_bool("test.bool", True)
    w.add_array("test.ints", [3, -1, 7])
    w.add_array("test.bools", [True, False, True])
    w.add_array("test.floats", [0.5, 1.25])
    w.add_array("test.strings", ["a", "bc", ""])
    w.add_token_list([f"tok{i}" for i in range(LONG)])
    w.add_token_types([1] * LONG)
    w.add_tensor("a.weight", np.arange(12, dtype=np.float32).reshape(3, 4))
    w.add_tensor("b.weight", np.ones((2, 5, 3), dtype=np.float16))
    q = gguf.quants.quantize(np.ones((4, 64), dtype=np.float32), gguf.GGMLQuantizationType.Q8_0)
    w.add_tensor("c.weight", q, raw_dtype=gguf.GGMLQuantizationType.Q8_0)
    w.add_tensor("d.bias", np.zeros(7, dtype=np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


def _same_as_gguf_reader(path: Path, max_array: int = 1024) -> gguf_header.GgufHeader:
    head = gguf_header.read_header(path, max_array=max_array)
    ref = gguf.GGUFReader(str(path))
    keys = [k for k in ref.fields if not k.startswith("GGUF.")]
    assert sorted(keys) == sorted([*head.kv, *head.skipped])
    for key in keys:
        field = ref.fields[key]
        if key in head.skipped:
            assert len(field.data) > max_array
            assert head.skipped[key] == len(field.data)
        else:
            want = field.contents()
            assert head.kv[key] == want, key
            assert type(head.kv[key]) is type(want), key
    assert head.version == ref.fields["GGUF.version"].contents()
    assert head.data_start == ref.data_offset
    got = [(t.name, t.shape, t.type_name, t.type_id, t.offset, t.n_bytes) for t in head.tensors]
    want = [
        (
            t.name,
            tuple(int(d) for d in t.shape),
            t.tensor_type.name,
            int(t.tensor_type),
            int(t.data_offset),
            int(t.n_bytes),
        )
        for t in ref.tensors
    ]
    assert got == want
    return head


@pytest.mark.parametrize("alignment", [None, 64])
def test_header_matches_gguf_reader(tmp_path, alignment):
    path = _write(tmp_path / "t.gguf", alignment)
    head = _same_as_gguf_reader(path)
    assert head.alignment == (alignment or 32)
    assert head.skipped == {"tokenizer.ggml.tokens": LONG, "tokenizer.ggml.token_type": LONG}
    assert head.kv["test.bools"] == [True, False, True]
    assert head.kv["test.strings"] == ["a", "bc", ""]
    assert [t.type_name for t in head.tensors] == ["F32", "F16", "Q8_0", "F32"]
    assert head.tensors[2].n_bytes == 4 * 2 * 34  # 4 rows of two Q8_0 blocks of 34 bytes
    # every array read when the limit allows it
    full = _same_as_gguf_reader(path, max_array=10_000)
    assert full.skipped == {} and full.kv["tokenizer.ggml.tokens"][-1] == f"tok{LONG - 1}"


def test_type_counts_and_fields(tmp_path):
    path = _write(tmp_path / "t.gguf")
    counts = {"F32": 2, "F16": 1, "Q8_0": 1}
    assert tensor_type_counts(path) == counts
    assert list(tensor_type_counts(path)) == ["F32", "F16", "Q8_0"]
    fields = _gguf_fields(path)
    assert fields.pop("_tensor_types") == counts
    ref = gguf.GGUFReader(str(path)).fields
    assert fields == {
        k: f.contents()
        for k, f in ref.items()
        if not k.startswith(("GGUF.", "tokenizer.ggml."))
        or k in ("tokenizer.ggml.model", "tokenizer.ggml.pre")
    }
    assert fields["general.name"] == "tiny ünïcode" and fields["test.ints"] == [3, -1, 7]


def test_cut_and_foreign_files_are_one_line(tmp_path):
    data = _write(tmp_path / "t.gguf").read_bytes()
    head = gguf_header.read_header(tmp_path / "t.gguf")
    cases = {
        "in_header": (data[: head.data_start // 2], "damaged GGUF file .*may be truncated"),
        "in_data": (data[: head.tensors[-1].offset], "is truncated: its tensors end at byte"),
        "magic": (b"GGML" + data[4:], "no GGUF magic"),
        "version": (data[:4] + (9).to_bytes(4, "little") + data[8:], "version 9"),
        "short": (data[:10], "too short"),
    }
    for name, (body, needle) in cases.items():
        p = tmp_path / f"{name}.gguf"
        p.write_bytes(body)
        with pytest.raises(ShrinkError, match=needle) as e:
            check_gguf_file(p)
        assert "\n" not in str(e.value) and str(p) in str(e.value)
        if name != "in_data":  # the header itself is whole there
            with pytest.raises(ShrinkError, match=needle):
                gguf_header.read_header(p)
    check_gguf_file(tmp_path / "t.gguf")


def test_a_huge_string_length_is_damage_not_an_allocation(tmp_path):
    data = bytearray(_write(tmp_path / "t.gguf").read_bytes())
    data[24:32] = (1 << 62).to_bytes(8, "little")  # the first key's length
    p = tmp_path / "bad.gguf"
    p.write_bytes(bytes(data))
    with pytest.raises(ShrinkError, match="damaged GGUF file"):
        gguf_header.read_header(p)


@pytest.mark.skipif(not REAL.is_file(), reason="no exported SmolLM2 GGUF on this machine")
def test_real_file_matches_gguf_reader():
    t0 = time.perf_counter()
    head = _same_as_gguf_reader(REAL)
    print(f"header + GGUFReader: {time.perf_counter() - t0:.2f} s")
    assert head.skipped["tokenizer.ggml.tokens"] == 49152
    check_gguf_file(REAL)

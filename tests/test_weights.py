"""model/weights.py against the safetensors library, both ways, and every malformed-file case."""
import json
import struct

import pytest
import safetensors.torch as st
from safetensors import safe_open
import torch

from model import weights

ALL_DTYPES = [torch.float64, torch.float32, torch.float16, torch.bfloat16, torch.int64, torch.int32,
              torch.int16, torch.int8, torch.uint8, torch.bool]


def sample_tensors():
    g = torch.Generator().manual_seed(1)
    out = {}
    for i, dtype in enumerate(ALL_DTYPES):
        x = torch.randn(3, 5, generator=g) * 100
        out[f"t{i}.{str(dtype)[6:]}"] = x > 0 if dtype == torch.bool else x.to(dtype)
    out["scalar"] = torch.tensor(3.5)
    out["empty"] = torch.zeros(0, 4)
    out["odd.u8"] = torch.arange(7, dtype=torch.uint8)  # leaves the next tensor unaligned if not sorted
    return out


def assert_same(a, b):
    assert a.keys() == b.keys()
    for k in a:
        assert a[k].dtype == b[k].dtype and a[k].shape == b[k].shape, k
        assert torch.equal(a[k], b[k]), k


def test_ours_write_theirs_read(tmp_path):
    t = sample_tensors()
    weights.save_file(t, tmp_path / "a.safetensors", metadata={"format": "pt", "rank": "3"})
    assert_same(t, st.load_file(tmp_path / "a.safetensors"))
    with safe_open(str(tmp_path / "a.safetensors"), "pt") as f:
        assert f.metadata() == {"format": "pt", "rank": "3"}


def test_theirs_write_ours_read(tmp_path):
    t = sample_tensors()
    st.save_file(t, tmp_path / "b.safetensors", metadata={"k": "v"})
    assert_same(t, weights.load_file(tmp_path / "b.safetensors"))
    assert weights.load_metadata(tmp_path / "b.safetensors") == {"k": "v"}


def test_loaded_tensors_are_writable_copies_on_write(tmp_path):
    t = {"x": torch.ones(4)}
    weights.save_file(t, tmp_path / "c.safetensors")
    a = weights.load_file(tmp_path / "c.safetensors")["x"]
    a += 1  # private mapping: the file must not change
    assert torch.equal(weights.load_file(tmp_path / "c.safetensors")["x"], torch.ones(4))


def test_unaligned_offsets_are_read(tmp_path):
    # a hand-made file whose F32 tensor starts at an odd byte offset
    header = {"a": {"dtype": "U8", "shape": [1], "data_offsets": [0, 1]},
              "b": {"dtype": "F32", "shape": [2], "data_offsets": [1, 9]}}
    raw = json.dumps(header).encode()
    data = b"\x07" + struct.pack("<2f", 1.5, -2.0)
    (tmp_path / "u.safetensors").write_bytes(struct.pack("<Q", len(raw)) + raw + data)
    out = weights.load_file(tmp_path / "u.safetensors")
    assert out["a"].item() == 7 and out["b"].tolist() == [1.5, -2.0]


def test_save_is_atomic_on_failure(tmp_path):
    path = tmp_path / "keep.safetensors"
    weights.save_file({"x": torch.ones(2)}, path)
    with pytest.raises(ValueError, match="'bad'"):
        weights.save_file({"x": torch.zeros(2), "bad": [1, 2]}, path)
    assert torch.equal(weights.load_file(path)["x"], torch.ones(2))
    assert [p.name for p in tmp_path.iterdir()] == ["keep.safetensors"]


def write_raw(path, header, data=b"", header_len=None):
    raw = header if isinstance(header, bytes) else json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(raw) if header_len is None else header_len) + raw + data)
    return path


@pytest.mark.parametrize("case, match", [
    ("truncated", "truncated"),
    ("header_past_end", "runs past the end"),
    ("not_json", "not valid JSON"),
    ("not_object", "JSON object"),
    ("unknown_dtype", "'w': unknown dtype 'F7'"),
    ("offsets_out_of_range", "'w': data_offsets .* out of range"),
    ("shape_mismatch", "'w': shape \\[3\\] of F32 needs 12 bytes"),
    ("overlap", "'v' and 'w' overlap"),
    ("missing_field", "'w': entry must have"),
])
def test_malformed_files(tmp_path, case, match):
    p = tmp_path / f"{case}.safetensors"
    ok = {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]}
    if case == "truncated":
        p.write_bytes(b"\x01\x02\x03")
    elif case == "header_past_end":
        write_raw(p, {"w": ok}, b"\0" * 8, header_len=10_000)
    elif case == "not_json":
        write_raw(p, b"{not json", b"")
    elif case == "not_object":
        write_raw(p, [1, 2], b"")
    elif case == "unknown_dtype":
        write_raw(p, {"w": {**ok, "dtype": "F7"}}, b"\0" * 8)
    elif case == "offsets_out_of_range":
        write_raw(p, {"w": {**ok, "data_offsets": [0, 16]}}, b"\0" * 8)
    elif case == "shape_mismatch":
        write_raw(p, {"w": {**ok, "shape": [3]}}, b"\0" * 8)
    elif case == "overlap":
        write_raw(p, {"v": ok, "w": {**ok, "data_offsets": [4, 12]}}, b"\0" * 12)
    elif case == "missing_field":
        write_raw(p, {"w": {"dtype": "F32"}}, b"\0" * 8)
    with pytest.raises(ValueError, match=match) as err:
        weights.load_file(p)
    assert p.name in str(err.value)


def test_pickles_are_refused(tmp_path):
    p = tmp_path / "model.ckpt"
    p.write_bytes(b"\x80\x04")
    with pytest.raises(ValueError, match="pickled checkpoints are not loaded"):
        weights.resolve_component(p, "unet", ("diffusion_pytorch_model.safetensors",))


def test_resolve_component_layouts(tmp_path):
    names = ("diffusion_pytorch_model.safetensors", "diffusion_pytorch_model.fp16.safetensors")
    (tmp_path / "unet").mkdir()
    (tmp_path / "unet" / names[1]).write_bytes(b"")
    assert weights.resolve_component(tmp_path, "unet", names) == tmp_path / "unet" / names[1]
    assert weights.resolve_component(tmp_path / "unet", "unet", names) == tmp_path / "unet" / names[1]
    (tmp_path / "unet" / names[0]).write_bytes(b"")
    assert weights.resolve_component(tmp_path, "unet", names) == tmp_path / "unet" / names[0]
    with pytest.raises(FileNotFoundError, match="found none of"):
        weights.resolve_component(tmp_path, "vae", ("x.safetensors",))


def test_load_strict_lists_every_problem():
    m = torch.nn.Sequential(torch.nn.Linear(2, 3), torch.nn.Linear(3, 1))
    state = {k: v.clone() for k, v in m.state_dict().items()}
    state.pop("1.bias")
    state["0.weight"] = torch.zeros(4, 2)
    state["extra"] = torch.zeros(1)
    with pytest.raises(ValueError) as err:
        weights.load_strict(m, state, "file.safetensors")
    text = str(err.value)
    assert "file.safetensors" in text and "missing keys (1):\n    1.bias" in text
    assert "unexpected keys (1):\n    extra" in text and "0.weight: file (4, 2), model (3, 2)" in text


def test_load_strict_casts_fp16_to_model_dtype():
    m = torch.nn.Linear(2, 2)
    state = {k: torch.randn_like(v).half() for k, v in m.state_dict().items()}
    weights.load_strict(m, state, "f")
    assert m.weight.dtype == torch.float32 and torch.equal(m.weight, state["weight"].float())
    weights.load_strict(m, state, "f", dtype=torch.float16)
    assert m.weight.dtype == torch.float16


STRICT_CASES = {  # each is a file the safetensors library refuses; so must we, with a ValueError naming the problem
    "duplicate_name": (b'{"w":{"dtype":"F32","shape":[2],"data_offsets":[0,8]},'
                       b'"w":{"dtype":"F32","shape":[2],"data_offsets":[8,16]}}', 16, "names 'w' twice"),
    "gap_before_data": ({"w": {"dtype": "F32", "shape": [2], "data_offsets": [4, 12]}}, 12, "4 unused bytes before"),
    "trailing_bytes": ({"w": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]}}, 12, "4 bytes after the last"),
    "metadata_false": ({"__metadata__": False, "w": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]}}, 8,
                       "'__metadata__' must be an object"),
    "metadata_list": ({"__metadata__": [], "w": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]}}, 8,
                      "'__metadata__' must be an object"),
    "bool_in_shape": ({"w": {"dtype": "F32", "shape": [True, 2], "data_offsets": [0, 8]}}, 8, "shape must be"),
    "bool_offsets": ({"w": {"dtype": "U8", "shape": [1], "data_offsets": [False, True]}}, 1, "data_offsets must be"),
    "count_overflow": ({"w": {"dtype": "F32", "shape": [0, 2 ** 70], "data_offsets": [0, 0]}}, 0, "shape must be"),
    "product_overflow": ({"w": {"dtype": "F32", "shape": [2 ** 32, 2 ** 32], "data_offsets": [0, 0]}}, 0,
                         "more elements than"),
}


@pytest.mark.parametrize("case", sorted(STRICT_CASES))
def test_files_the_format_forbids_are_refused_as_safetensors_does(tmp_path, case):
    header, data_size, match = STRICT_CASES[case]
    p = write_raw(tmp_path / f"{case}.safetensors", header, b"\0" * data_size)
    with pytest.raises(Exception):  # the oracle: the safetensors library refuses this file
        st.load_file(p)
    with pytest.raises(ValueError, match=match) as err:
        weights.load_file(p)
    assert p.name in str(err.value)


def test_metadata_null_is_no_metadata_as_in_safetensors(tmp_path):
    p = write_raw(tmp_path / "n.safetensors", {"__metadata__": None,
                                               "w": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]}}, b"\0" * 8)
    assert st.load_file(p)["w"].shape == (2,)
    assert weights.load_metadata(p) == {} and weights.load_file(p)["w"].shape == (2,)


def test_a_tensor_named_like_the_metadata_is_refused(tmp_path):
    path = tmp_path / "m.safetensors"
    with pytest.raises(ValueError, match="'__metadata__'"):
        weights.save_file({"__metadata__": torch.ones(2)}, path, {"a": "b"})
    assert not path.exists()


def test_written_files_follow_the_umask(tmp_path):
    import os
    old = os.umask(0o027)
    try:
        weights.save_file({"x": torch.ones(2)}, tmp_path / "a.safetensors")
        with weights.atomic_write(tmp_path / "b.txt", "w") as f:
            f.write("b")
    finally:
        os.umask(old)
    for name in ("a.safetensors", "b.txt"):
        assert (tmp_path / name).stat().st_mode & 0o777 == 0o640, name

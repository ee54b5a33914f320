"""Adapter files that would make every image black, change nothing, or are no adapter at all: sample.py --adapter
refuses each with one line naming the file and the key (or saying what the file is instead), exit status 2."""
import json

import pytest
import torch

from methods.adapters import inject, save_adapters
from methods.kohya import export_kohya
from model import weights
from model.sd15 import tiny_sd15
from training import checkpoint, method_table
import sample

COMMAND = ["--prompt", "small opacity", "--steps", "1", "--size", "16"]


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    """A kohya export and one of our adapter files of LoRA adapters with random factors on the tiny model (the one
    sample.py uses without --model), and a training state file."""
    root = tmp_path_factory.mktemp("adapters")
    sd = tiny_sd15(0)
    named = inject(sd.adaptable(), method_table.build("lora", r=2).make_adapter, ["unet.*attn2.to_q"])
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for a in named.values():
            a.B.copy_(0.1 * torch.randn(a.B.shape, generator=g))
    export_kohya(named, sd.unet.config, root / "kohya.safetensors")
    save_adapters(named, root / "ours.safetensors")
    params = [p for a in named.values() for p in a.parameters() if p.requires_grad]
    optimizer = torch.optim.Adam(params)
    sum(p.sum() for p in params).backward()
    optimizer.step()
    names = {p: n for n, p in sd.adaptable().named_parameters() if p.requires_grad}
    checkpoint.save_checkpoint(root / "state.safetensors", optimizer, names, {"train": torch.Generator()}, {"step": 1})
    return root


def one_error_line(err: str) -> bool:
    """One 'error:' line and no traceback (sample.py also notes on stderr that it uses the embedded model)."""
    return "Traceback" not in err and sum(line.startswith("error:") for line in err.splitlines()) == 1


def variant(files, tmp_path, source: str, change) -> str:
    """A copy of `source` with change(tensors) applied (its metadata kept)."""
    tensors = dict(weights.load_file(files / source))
    metadata = weights.load_metadata(files / source)
    change(tensors)
    path = tmp_path / f"hostile-{source}"
    weights.save_file({k: v.clone() for k, v in tensors.items()}, path, metadata)
    return str(path)


def first(tensors, suffix):
    return next(k for k in tensors if k.endswith(suffix))


def setting(suffix, value):
    def change(tensors):
        key = first(tensors, suffix)
        tensors[key] = tensors[key].clone()
        tensors[key].view(-1)[0] = value
    return change


def over_rank(tensors):
    key = first(tensors, ".lora_down.weight")
    module = key[:-len(".lora_down.weight")]
    down, up = tensors[key], tensors[f"{module}.lora_up.weight"]
    tensors[key] = torch.randn(4096, down.shape[1]) * 1e-3
    tensors[f"{module}.lora_up.weight"] = torch.randn(up.shape[0], 4096) * 1e-3


@pytest.mark.parametrize("source, change, message", [
    ("kohya.safetensors", setting(".lora_up.weight", float("nan")), "lora_up.weight' holds NaN or infinite values"),
    ("kohya.safetensors", setting(".lora_down.weight", float("inf")), "lora_down.weight' holds NaN or infinite"),
    ("kohya.safetensors", setting(".alpha", float("nan")), ".alpha' holds NaN or infinite values"),
    ("kohya.safetensors", setting(".alpha", float("inf")), ".alpha' holds NaN or infinite values"),
    ("kohya.safetensors", setting(".alpha", 1e30), "beyond float16's range (alpha 1e+30"),
    ("kohya.safetensors", setting(".alpha", 0.0), ".alpha' is 0.0: expected an alpha (scale) above 0"),
    ("kohya.safetensors", setting(".alpha", -1.0), ".alpha' is -1.0: expected an alpha (scale) above 0"),
    ("kohya.safetensors", over_rank, "rank 4096 is above min(d_in, d_out)"),
    ("ours.safetensors", setting(".B", float("nan")), ".B' holds NaN or infinite values"),
    ("ours.safetensors", setting(".scale", 0.0), ".scale' is 0.0: expected an alpha (scale) above 0"),
    ("ours.safetensors", setting(".scale", 1e30), "beyond float16's range"),
])
def test_hostile_values_are_refused_naming_the_key(files, tmp_path, capsys, source, change, message):
    path = variant(files, tmp_path, source, change)
    out = tmp_path / "img"
    assert sample.main([*COMMAND, "--out", str(out), "--adapter", path]) == 2
    err = capsys.readouterr().err
    assert message in err and path in err and one_error_line(err), err
    assert not out.exists()


def test_the_unchanged_files_are_accepted(files):
    layers = len(json.loads(weights.load_metadata(files / "ours.safetensors")["ranks"]))
    for source in ("kohya.safetensors", "ours.safetensors"):
        assert len(method_table.load_adapter(tiny_sd15(0), files / source)) == layers > 0


def peft_file(files, tmp_path):
    path = tmp_path / "adapter_model.safetensors"
    key = "base_model.model.down_blocks.0.attentions.0.transformer_blocks.0.attn2.to_q"
    weights.save_file({f"{key}.lora_A.weight": torch.zeros(2, 32), f"{key}.lora_B.weight": torch.zeros(32, 2)}, path)
    return path


def truncated_file(files, tmp_path):
    path = tmp_path / "cut.safetensors"
    data = (files / "ours.safetensors").read_bytes()
    path.write_bytes(data[:len(data) // 2])
    return path


def empty_file(files, tmp_path):
    path = tmp_path / "empty.safetensors"
    path.write_bytes(b"")
    return path


@pytest.mark.parametrize("make, message", [
    (lambda files, tmp_path: files / "state.safetensors", "it is a training state file"),
    (peft_file, "it looks like a peft / diffusers LoRA (lora_A / lora_B keys)"),
    (truncated_file, "not an adapter file: it is truncated or not a safetensors file"),
    (empty_file, "not an adapter file: it is empty (0 bytes)"),
])
def test_a_file_that_is_no_adapter_says_what_it_is(files, tmp_path, capsys, make, message):
    path = make(files, tmp_path)
    assert sample.main([*COMMAND, "--out", str(tmp_path / "img"), "--adapter", str(path)]) == 2
    err = capsys.readouterr().err
    assert message in err and str(path) in err and "metadata 'method' is None" not in err, err
    assert one_error_line(err)


def test_a_file_of_another_method_name_keeps_its_message(files, tmp_path):
    path = variant(files, tmp_path, "ours.safetensors", lambda tensors: None)
    metadata = {**weights.load_metadata(path), "method": "dora"}
    weights.save_file(dict(weights.load_file(path)), path, metadata)
    with pytest.raises(ValueError, match="metadata 'method' is 'dora', expected one of"):
        method_table.load_adapter(tiny_sd15(0), path)
    assert json.loads(metadata["ranks"])  # the file is otherwise an adapter


def test_an_adalora_layer_pruned_to_rank_0_is_no_hostile_value(tmp_path):
    """AdaLoRA's budget may take every rank of a layer (its A is d_in x 0): the file loads, that layer adds nothing.
    (The mini study's AdaLoRA runs stopped here with a ZeroDivisionError in kohya.check_update.)"""
    sd = tiny_sd15(0)
    method = method_table.build("adalora", init_r=2, target_r=1)
    named = inject(sd.adaptable(), method.make_adapter, ["unet.*attn2.to_*"])
    pruned, kept = sorted(named)[:2]
    named[pruned].select(torch.zeros(0, dtype=torch.long))
    save_adapters(named, tmp_path / "adalora.safetensors", method.controller(named, None, 10, None).metadata())
    loaded = method_table.load_adapter(tiny_sd15(0), tmp_path / "adalora.safetensors")
    assert loaded[pruned].rank == 0 and loaded[kept].rank == 2
    x = torch.randn(3, loaded[pruned].base.in_features)
    assert torch.equal(loaded[pruned](x), loaded[pruned].base(x))

"""The split (data/splits.py): fractions, groups on one side, the seed, and reloading exactly the held-out images."""
import json

import pytest

from data import datasets, splits
from test_data import iu_root  # noqa: F401 (a fixture)


def test_parse_split():
    assert splits.parse_split("80,16,4") == pytest.approx((0.8, 0.16, 0.04))
    assert splits.parse_split("70,10,20") == pytest.approx((0.7, 0.1, 0.2))
    assert splits.parse_split("80,20") == pytest.approx((0.8, 0.0, 0.2))
    for bad in ("80,10", "a,b,c", "100", "0,50,50", "50,-10,60"):
        with pytest.raises(ValueError, match="split"):
            splits.parse_split(bad)


def test_split_fractions_groups_seed_and_round_trip(tmp_path):
    examples = [datasets.Example(tmp_path / f"{i}.png", "c", f"{i:04d}.png", f"g{i // 2 if i < 200 else i}")
                for i in range(1000)]
    split = splits.make_split(examples, (0.8, 0.16, 0.04), seed=0)
    sizes = {k: len(v) for k, v in split.items()}
    assert abs(sizes["train"] - 800) <= 2 and abs(sizes["validation"] - 160) <= 2 and abs(sizes["test"] - 40) <= 2
    assert sorted(sum(split.values(), [])) == sorted(e.name for e in examples)       # a partition
    where = {n: k for k, names in split.items() for n in names}
    for i in range(0, 200, 2):                                                         # pairs stay together
        assert where[f"{i:04d}.png"] == where[f"{i + 1:04d}.png"]
    assert splits.make_split(examples[::-1], (0.8, 0.16, 0.04), seed=0) == split         # order does not matter
    assert splits.make_split(examples, (0.8, 0.16, 0.04), seed=1) != split
    no_val = splits.make_split(examples, (0.8, 0.0, 0.2), seed=0)
    assert no_val["validation"] == [] and abs(len(no_val["test"]) - 200) <= 2

    splits.write_split(tmp_path / "run" / "split.json", split, {"dataset": "folder", "seed": 0})
    assert splits.read_split(tmp_path / "run" / "split.json") == split
    assert json.loads((tmp_path / "run" / "split.json").read_text())["seed"] == 0


def test_split_select_reloads_exactly_the_held_out_images(iu_root, tmp_path):
    ds = datasets.load_dataset("iu-xray", iu_root)
    split = splits.make_split(ds.examples, splits.parse_split("50,25,25"), seed=3)
    splits.write_split(tmp_path / "split.json", split)
    test = splits.select(datasets.load_dataset("iu-xray", iu_root), splits.read_split(tmp_path / "split.json")["test"])
    assert [e.name for e in test] == split["test"] and test
    (iu_root / "images" / "images_normalized" / split["test"][0].split("/")[-1]).unlink()
    with pytest.raises(ValueError, match="not usable"):
        splits.select(datasets.load_dataset("iu-xray", iu_root), split["test"], tmp_path / "split.json")


def test_read_split_rejects_bad_files(tmp_path):
    (tmp_path / "a.json").write_text("{not json")
    (tmp_path / "b.json").write_text(json.dumps({"splits": {"train": ["x"]}}))
    for name in ("a.json", "b.json", "missing.json"):
        with pytest.raises(ValueError, match=name):
            splits.read_split(tmp_path / name)

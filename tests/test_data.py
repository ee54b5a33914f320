"""data/datasets.py: each layout on fixtures that copy the real files' names and columns, preprocessing, split, bad input."""
import csv
import json

import numpy as np
import pytest
import torch
from PIL import Image

from data import datasets, phantoms
from training import diffusion


def gray_png(path, size=(40, 30), value=None, mode="L"):
    path.parent.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(abs(hash(path.name)) % 2**32)
    a = rng.integers(0, 256, size[::-1]) if value is None else np.full(size[::-1], value)
    Image.fromarray(a.astype(np.uint8), "L").convert(mode).save(path)
    return path


def write_csv(path, header, rows):
    with open(path, "w", newline="", encoding="utf-8") as f:
        w = csv.writer(f)
        w.writerow(header)
        w.writerows(rows)


# ---------------------------------------------------------------- fixtures in the real layouts

REPORT_COLUMNS = ["uid", "MeSH", "Problems", "image", "indication", "comparison", "findings", "impression"]


@pytest.fixture
def iu_root(tmp_path):
    """Kaggle's IU X-Ray copy: the projection CSV names files like 1_IM-0001-4001.dcm.png."""
    root = tmp_path / "iu"
    images = root / "images" / "images_normalized"
    reports, projections = [], []
    for uid in range(1, 11):
        findings = "" if uid in (3, 7) else f"The heart size is normal. Case {uid}."
        impression = "No acute disease." if uid != 7 else ""
        reports.append([uid, "normal", "normal", "Xray Chest PA and Lateral", "XXXX-year-old male", "None.",
                        findings, impression])
        frontal = f"{uid}_IM-{uid:04d}-4001.dcm.png"
        lateral = f"{uid}_IM-{uid:04d}-3001.dcm.png"
        gray_png(images / frontal)
        gray_png(images / lateral)
        projections += [[uid, frontal, "Frontal"], [uid, lateral, "Lateral"]]
    # uid 2 has a second frontal image, as some studies do
    gray_png(images / "2_IM-0002-1001.dcm.png")
    projections.append([2, "2_IM-0002-1001.dcm.png", "Frontal"])
    write_csv(root / "indiana_reports.csv", REPORT_COLUMNS, reports)
    write_csv(root / "indiana_projections.csv", ["uid", "filename", "projection"], projections)
    return root


def montgomery_reading(sex="F ", age="027Y", findings=("normal",)):
    return "\n".join([f"Patient's Sex: {sex}", f"Patient's Age: {age}", *findings]) + "\n"


@pytest.fixture
def montgomery_root(tmp_path):
    root = tmp_path / "MontgomerySet"
    readings = root / "ClinicalReadings"
    readings.mkdir(parents=True)
    cases = [("0001_0", "F ", "027Y", ["normal"]),
             ("0002_0", "M", "044Y", ["normal"]),
             ("0003_1", "M", "032Y", ["extensive infiltrates bilaterally with large cavity in RUL",
                                      "Active TB, cavitary."]),
             ("0004_1", "O  ", "061Y", ["NO REPORT (same pt as MCUCXR_0003_1)"]),
             ("0005_0", "F", "008Y", ["", "normal", ""])]
    for stem, sex, age, findings in cases:
        gray_png(root / "CXR_png" / f"MCUCXR_{stem}.png", (48, 40))
        (readings / f"MCUCXR_{stem}.txt").write_bytes(montgomery_reading(sex, age, findings).replace("\n", "\r\n").encode())
    return root


@pytest.fixture
def gastric_root(tmp_path):
    """captions.csv with subtypes as spelled in the release; patches in the doubly nested zip folder."""
    root = tmp_path / "PatchGastricADC22"
    patches = root / "patches_captions" / "patches_captions"
    rows = []
    subtypes = list(datasets.GASTRIC_SUBTYPES) + ["Papillary adenocarcinoma"]
    for k, subtype in enumerate(subtypes):
        for slide in range(2):
            sid = f"{k:02d}{slide:02d}a619f6ccc449f915b44bdc0d6d8f0"
            rows.append([sid, subtype, f"Tumor tissue of kind {k}, slide {slide}. {subtype}."])
            for j in range(3):
                img = Image.fromarray(np.full((30, 30, 3), 40 * k + j, np.uint8), "RGB")
                patches.mkdir(parents=True, exist_ok=True)
                img.save(patches / f"{sid}_{j:08x}c1d2e3f4.jpg")
    write_csv(root / "captions.csv", ["id", "subtype", "text"], rows)
    return root


# ---------------------------------------------------------------- layouts

def test_folder_metadata_jsonl_csv_and_txt(tmp_path):
    jsonl = tmp_path / "jsonl"
    gray_png(jsonl / "a.png")
    gray_png(jsonl / "sub" / "b.png")
    (jsonl / "metadata.jsonl").write_text(
        json.dumps({"file_name": "a.png", "text": "  first\ncaption "}) + "\n\n"
        + json.dumps({"file_name": "sub/b.png", "text": "second"}) + "\n")
    ds = datasets.load_dataset("folder", jsonl)
    assert [(e.name, e.caption) for e in ds.examples] == [("a.png", "first caption"), ("sub/b.png", "second")]

    csv_root = tmp_path / "csv"
    gray_png(csv_root / "x.jpg")
    write_csv(csv_root / "metadata.csv", ["file_name", "text", "extra"],
              [["x.jpg", "a, quoted caption", "1"], ["x.jpg", "again", "2"]])
    ds = datasets.load_dataset("folder", csv_root)
    assert [e.caption for e in ds.examples] == ["a, quoted caption"]
    assert ds.skipped == [(str(csv_root / "x.jpg"), "listed twice (kept the first)")]

    kohya = tmp_path / "kohya"
    gray_png(kohya / "10_xray" / "img1.png")
    (kohya / "10_xray" / "img1.txt").write_text("opacity\n")
    gray_png(kohya / "10_xray" / "img2.png")  # no caption beside it
    ds = datasets.load_dataset("folder", kohya)
    assert [(e.name, e.caption) for e in ds.examples] == [("10_xray/img1.png", "opacity")]
    assert ds.skipped == [(str(kohya / "10_xray" / "img2.png"), "no caption file (img2.txt)")]


def test_iu_xray_frontal_findings_and_empty_findings_policy(iu_root):
    ds = datasets.load_dataset("iu-xray", iu_root)
    names = [e.name for e in ds.examples]
    assert all("-4001" in n or n.endswith("1001.dcm.png") for n in names)          # frontal only
    assert len(names) == 9                                                            # 10 + 1 frontal, minus 2 empty
    assert not any(n.startswith(("images/images_normalized/3_", "images/images_normalized/7_")) for n in names)
    assert ds.skipped_counts() == {"empty findings": 2}
    one = next(e for e in ds.examples if e.name == "images/images_normalized/1_IM-0001-4001.dcm.png")
    assert one.caption == "The heart size is normal. Case 1."
    assert {e.group for e in ds.examples if e.name.startswith("images/images_normalized/2_")} == {"uid2"}

    ds = datasets.load_dataset("iu-xray", iu_root, empty_findings="impression")
    captions = {e.name.split("/")[-1]: e.caption for e in ds.examples}
    assert captions["3_IM-0003-4001.dcm.png"] == "No acute disease."
    assert "7_IM-0007-4001.dcm.png" not in captions                                  # both empty
    assert ds.skipped_counts() == {"empty findings and impression": 1}


def test_iu_xray_authors_image_path(iu_root):
    (iu_root / "images" / "images_normalized").rename(iu_root / "images" / "images")
    ds = datasets.load_dataset("iu-xray", iu_root)
    assert len(ds.examples) == 9 and ds.examples[0].name.startswith("images/images/")


def test_iu_xray_openi_names_and_unknown_uid(iu_root):
    """The filename column is used as it is: OpenI's CXR1_1_IM-0001-4001.png names work as well."""
    images = iu_root / "images" / "images_normalized"
    (images / "1_IM-0001-4001.dcm.png").rename(images / "CXR1_1_IM-0001-4001.png")
    text = (iu_root / "indiana_projections.csv").read_text().replace("1_IM-0001-4001.dcm.png", "CXR1_1_IM-0001-4001.png")
    gray_png(images / "99_IM-0099-4001.dcm.png")
    (iu_root / "indiana_projections.csv").write_text(text + "99,99_IM-0099-4001.dcm.png,Frontal\n")
    ds = datasets.load_dataset("iu-xray", iu_root)
    assert "images/images_normalized/CXR1_1_IM-0001-4001.png" in [e.name for e in ds.examples]
    assert ds.skipped_counts() == {"empty findings": 2, "uid not in indiana_reports.csv": 1}


def test_exif_orientation_is_applied(tmp_path):
    a = np.zeros((20, 40), np.uint8)
    a[:, :20] = 255                                   # stored wide, bright on the left
    exif = Image.Exif()
    exif[0x0112] = 6                                  # "rotate 90 degrees clockwise to display"
    Image.fromarray(a).save(tmp_path / "photo.jpg", exif=exif, quality=100)
    x = datasets.load_image(tmp_path / "photo.jpg", 20)
    assert x[0, :5].mean() > 0.8 and x[0, -5:].mean() < -0.8  # displayed tall: bright on top


def test_montgomery_prompt_as_in_figure_7(montgomery_root):
    ds = datasets.load_dataset("montgomery", montgomery_root)
    captions = {e.name: e.caption for e in ds.examples}
    assert captions == {
        "CXR_png/MCUCXR_0001_0.png": "age:27, gender:Female, findings:normal",
        "CXR_png/MCUCXR_0002_0.png": "age:44, gender:Male, findings:normal",
        "CXR_png/MCUCXR_0003_1.png": "age:32, gender:Male, findings:extensive infiltrates bilaterally with large "
                                     "cavity in RUL Active TB, cavitary.",
        "CXR_png/MCUCXR_0004_1.png": "age:61, gender:Other, findings:NO REPORT (same pt as MCUCXR_0003_1)",
        "CXR_png/MCUCXR_0005_0.png": "age:8, gender:Female, findings:normal",
    }
    groups = {e.name: e.group for e in ds.examples}
    assert groups["CXR_png/MCUCXR_0004_1.png"] == groups["CXR_png/MCUCXR_0003_1.png"] == "CXR_png/MCUCXR_0003_1.png"
    assert len(set(groups.values())) == 4


def test_montgomery_bad_reading_is_skipped_with_its_name(montgomery_root):
    (montgomery_root / "ClinicalReadings" / "MCUCXR_0002_0.txt").write_text("normal\n")
    (montgomery_root / "ClinicalReadings" / "MCUCXR_0005_0.txt").unlink()
    ds = datasets.load_dataset("montgomery", montgomery_root)
    assert len(ds.examples) == 3
    reasons = dict(ds.skipped)
    assert reasons[str(montgomery_root / "CXR_png" / "MCUCXR_0002_0.png")].startswith(
        f"bad clinical reading ({montgomery_root / 'ClinicalReadings' / 'MCUCXR_0002_0.txt'}: expected lines")
    assert reasons[str(montgomery_root / "CXR_png" / "MCUCXR_0005_0.png")] == "no clinical reading (MCUCXR_0005_0.txt)"
    assert ds.skipped_counts() == {"bad clinical reading": 1, "no clinical reading": 1}


def test_patchgastric_all_and_appendix_c2_sampling(gastric_root):
    ds = datasets.load_dataset("patchgastric", gastric_root)
    assert len(ds.examples) == 6 * 2 * 3
    assert all(e.caption.startswith("Tumor tissue") for e in ds.examples)
    first = ds.examples[0]
    assert first.group == first.path.stem.rsplit("_", 1)[0]

    sample = datasets.load_dataset("patchgastric", gastric_root, per_subtype=4, seed=1)
    assert len(sample.examples) == 5 * 4
    kinds = [int(e.caption.split("kind ")[1][0]) for e in sample.examples]
    assert sorted(set(kinds)) == [0, 1, 2, 3, 4] and all(kinds.count(k) == 4 for k in range(5))  # papillary left out
    again = datasets.load_dataset("patchgastric", gastric_root, per_subtype=4, seed=1)
    other = datasets.load_dataset("patchgastric", gastric_root, per_subtype=4, seed=2)
    assert [e.name for e in again.examples] == [e.name for e in sample.examples]
    assert [e.name for e in other.examples] != [e.name for e in sample.examples]
    with pytest.raises(ValueError, match="has 6 usable patches, 7 requested"):
        datasets.load_dataset("patchgastric", gastric_root, per_subtype=7)


def test_patchgastric_flat_folder(gastric_root):
    nested = gastric_root / "patches_captions" / "patches_captions"
    for p in nested.iterdir():
        p.rename(gastric_root / "patches_captions" / p.name)
    assert len(datasets.load_dataset("patchgastric", gastric_root).examples) == 36


# ---------------------------------------------------------------- preprocessing

def test_preprocess_matches_torchvision_resize_and_centre_crop():
    from torchvision import transforms

    rng = np.random.default_rng(0)
    for shape in ((50, 80), (81, 47), (20, 20)):
        im = Image.fromarray(rng.integers(0, 256, shape).astype(np.uint8), "L")
        ours = datasets.preprocess(im, 32)
        ref = transforms.Compose([transforms.Grayscale(3), transforms.ToTensor(), transforms.Resize(32),
                                  transforms.CenterCrop(32), transforms.Normalize([0.5] * 3, [0.5] * 3)])(im)
        assert ours.shape == (3, 32, 32) and ours.dtype == torch.float32
        assert torch.equal(ours[0], ours[2])
        assert (ours - ref.clamp(-1, 1)).abs().max() < 1e-5


def test_preprocess_range_rgb_and_16_bit(tmp_path):
    black_white = np.zeros((40, 60), np.uint8)
    black_white[:, 30:] = 255
    x = datasets.preprocess(Image.fromarray(black_white), 20)
    assert x.min() == -1 and x.max() == 1

    rgb = np.zeros((24, 24, 3), np.uint8)
    rgb[..., 0] = 255
    x = datasets.preprocess(Image.fromarray(rgb), 24)
    assert torch.allclose(x[0], torch.ones(24, 24)) and torch.allclose(x[1], -torch.ones(24, 24))

    # a 16-bit ramp: values above 255 must be scaled by 65535, not clipped at 255
    ramp = np.tile(np.linspace(0, 65535, 32).astype(np.uint16), (32, 1))
    Image.fromarray(ramp).save(tmp_path / "ramp16.png")
    assert Image.open(tmp_path / "ramp16.png").mode.startswith("I")
    x = datasets.load_image(tmp_path / "ramp16.png", 32)
    expected = torch.from_numpy(ramp.astype(np.float32) / 65535 * 2 - 1)
    assert (x[0] - expected).abs().max() < 1e-6
    assert len(torch.unique(x[0, 0])) == 32


# ---------------------------------------------------------------- bad input

def test_unreadable_and_missing_images_are_skipped_and_counted(tmp_path):
    root = tmp_path / "f"
    gray_png(root / "good.png")
    (root / "truncated.png").write_bytes(gray_png(tmp_path / "t.png", (64, 64)).read_bytes()[:100])
    (root / "text.png").write_text("not an image")
    Image.fromarray(np.ones((8, 8), np.float32)).save(root / "float.tif")
    (root / "metadata.jsonl").write_text("".join(json.dumps({"file_name": n, "text": "c"}) + "\n"
                                                 for n in ("good.png", "truncated.png", "text.png", "gone.png", "float.tif")))
    ds = datasets.load_dataset("folder", root)
    assert [e.name for e in ds.examples] == ["good.png"]
    reasons = dict(ds.skipped)
    assert reasons[str(root / "gone.png")] == "image missing"
    assert reasons[str(root / "truncated.png")].startswith("unreadable image")
    assert reasons[str(root / "text.png")].startswith("unreadable image")
    assert "mode F" in reasons[str(root / "float.tif")]
    with pytest.raises(ValueError, match=r"truncated\.png: cannot read the image"):
        datasets.load_image(root / "truncated.png", 32)

    (root / "good.png").unlink()
    with pytest.raises(ValueError, match=r"no usable.*3 x unreadable image; 2 x image missing"):
        datasets.load_dataset("folder", root)


def test_empty_caption_is_skipped_with_the_file_name(tmp_path):
    gray_png(tmp_path / "a.png")
    gray_png(tmp_path / "b.png")
    write_csv(tmp_path / "metadata.csv", ["file_name", "text"], [["a.png", "   "], ["b.png", "ok"]])
    ds = datasets.load_dataset("folder", tmp_path)
    assert ds.skipped == [(str(tmp_path / "a.png"), "empty caption")] and len(ds.examples) == 1


@pytest.mark.parametrize("name", ["/etc/passwd", "../outside.png", "sub/../../x.png", "C:\\x.png"])
def test_file_name_outside_the_folder_is_rejected(tmp_path, name):
    root = tmp_path / "d"
    gray_png(root / "a.png")
    (root / "metadata.jsonl").write_text(json.dumps({"file_name": name, "text": "c"}) + "\n")
    with pytest.raises(ValueError, match=r"metadata\.jsonl.*must be a relative path inside"):
        datasets.load_dataset("folder", root)


def test_symlink_out_of_the_folder_is_rejected(tmp_path):
    root = tmp_path / "d"
    root.mkdir()
    gray_png(tmp_path / "secret.png")
    (root / "link.png").symlink_to(tmp_path / "secret.png")
    write_csv(root / "metadata.csv", ["file_name", "text"], [["link.png", "c"]])
    with pytest.raises(ValueError, match="resolves outside"):
        datasets.load_dataset("folder", root)


def test_csv_without_expected_columns(tmp_path, iu_root, gastric_root):
    write_csv(tmp_path / "metadata.csv", ["image", "caption"], [["a.png", "c"]])
    with pytest.raises(ValueError, match=r"metadata\.csv: missing column\(s\) file_name, text.*found image, caption"):
        datasets.load_dataset("folder", tmp_path)
    write_csv(iu_root / "indiana_reports.csv", ["uid", "impression"], [[1, "x"]])
    with pytest.raises(ValueError, match=r"indiana_reports\.csv: missing column\(s\) findings"):
        datasets.load_dataset("iu-xray", iu_root)
    write_csv(gastric_root / "captions.csv", ["id", "text"], [])
    with pytest.raises(ValueError, match=r"captions\.csv: missing column\(s\) subtype"):
        datasets.load_dataset("patchgastric", gastric_root)


def test_empty_or_missing_data_sets(tmp_path, iu_root, montgomery_root):
    write_csv(tmp_path / "metadata.csv", ["file_name", "text"], [])
    with pytest.raises(ValueError, match=r"no usable image-caption pairs.*\(no entries\)"):
        datasets.load_dataset("folder", tmp_path)
    with pytest.raises(ValueError, match="data folder not found"):
        datasets.load_dataset("folder", tmp_path / "nope")
    with pytest.raises(ValueError, match="no metadata.jsonl, metadata.csv or .txt"):
        datasets.load_dataset("folder", gray_png(tmp_path / "only" / "a.png").parent)
    (iu_root / "indiana_projections.csv").unlink()
    with pytest.raises(ValueError, match=r"indiana_projections\.csv: file not found"):
        datasets.load_dataset("iu-xray", iu_root)
    for p in (montgomery_root / "CXR_png").iterdir():
        p.unlink()
    with pytest.raises(ValueError, match="MontgomerySet: no usable"):
        datasets.load_dataset("montgomery", montgomery_root)
    with pytest.raises(ValueError, match="unknown data set kind 'mimic'"):
        datasets.load_dataset("mimic", tmp_path)


# ---------------------------------------------------------------- embedded phantoms

def test_phantoms_are_seeded_and_show_the_stated_opacity(tmp_path):
    root = phantoms.make_phantom_folder(tmp_path / "a", n=128, size=64, seed=5)
    phantoms.make_phantom_folder(tmp_path / "b", n=128, size=64, seed=5)
    assert (root / "metadata.jsonl").read_text() == (tmp_path / "b" / "metadata.jsonl").read_text()
    assert (root / "phantom_0007.png").read_bytes() == (tmp_path / "b" / "phantom_0007.png").read_bytes()

    ds = datasets.load_dataset("folder", root)
    captions = [e.caption for e in ds.examples]
    assert len(ds.examples) == 128 and len(set(captions)) >= 8
    # the stated lobe is the brightest of the four lobe regions in the image
    for e in ds.examples:
        img = np.asarray(Image.open(e.path), dtype=np.float64)
        means = {lobe: img[int(y * 64) - 3:int(y * 64) + 3, int(x * 64) - 3:int(x * 64) + 3].mean()
                 for lobe, (x, y) in phantoms.PHANTOM_LOBES.items()}
        stated = [lobe for lobe in means if phantoms.parse(e.caption)["finding"] == lobe]
        assert all(means[lobe] > 140 for lobe in stated), (e.caption, means)
        assert all(means[lobe] < 100 for lobe in means if lobe not in stated), (e.caption, means)


# ---------------------------------------------------------------- latent cache

def test_latent_cache_encodes_once_and_is_keyed_by_file_size_and_model(tmp_path):
    root = phantoms.make_phantom_folder(tmp_path / "ph", n=5, size=48)
    examples = datasets.load_dataset("folder", root).examples
    calls = []

    def encode(images):
        calls.append(len(images))
        pooled = torch.nn.functional.avg_pool2d(images, 8)
        return pooled.repeat(1, 2, 1, 1)[:, :4] * 0.5, pooled.repeat(1, 2, 1, 1)[:, :4] - 3

    cache = tmp_path / "cache"
    first = diffusion.cached_latents(examples, 32, encode, cache, "vae-a", batch_size=2)
    assert calls == [2, 2, 1] and len(list(cache.glob("*.safetensors"))) == 5
    mean, logvar = first[examples[3].name]
    expected = encode(datasets.load_image(examples[3].path, 32)[None])
    assert torch.equal(mean, expected[0][0]) and torch.equal(logvar, expected[1][0]) and mean.shape == (4, 4, 4)

    calls.clear()
    again = diffusion.cached_latents(examples, 32, encode, cache, "vae-a")
    assert calls == [] and all(torch.equal(again[n][0], first[n][0]) for n in first)
    diffusion.cached_latents(examples, 40, encode, cache, "vae-a")                 # another size
    diffusion.cached_latents(examples[:2], 32, encode, cache, "vae-b")             # another VAE
    assert calls == [5, 2]
    calls.clear()
    phantoms.make_phantom_folder(root, n=5, size=48, seed=9)                      # the files change
    diffusion.cached_latents(examples, 32, encode, cache, "vae-a")
    assert calls == [5]


def test_txt_caption_that_is_not_utf8_is_skipped_and_counted(tmp_path):
    gray_png(tmp_path / "a.png")
    gray_png(tmp_path / "b.png")
    (tmp_path / "a.txt").write_bytes("opacit\xe9 in the right lobe".encode("latin-1"))
    (tmp_path / "b.txt").write_text("opacité in the left lobe", encoding="utf-8")
    ds = datasets.load_dataset("folder", tmp_path)
    assert [e.caption for e in ds.examples] == ["opacité in the left lobe"]
    assert ds.skipped_counts() == {"caption not UTF-8": 1} and ds.skipped[0][0] == str(tmp_path / "a.png")


def test_invalid_utf8_in_metadata_names_the_file_and_line(tmp_path, iu_root):
    gray_png(tmp_path / "a.png")
    lines = [json.dumps({"file_name": "a.png", "text": "ok"}).encode(), b'{"file_name": "a.png", "text": "caf\xe9"}']
    (tmp_path / "metadata.jsonl").write_bytes(b"\n".join(lines) + b"\n")
    with pytest.raises(ValueError, match=r"metadata\.jsonl: line 2 is not valid UTF-8"):
        datasets.load_dataset("folder", tmp_path)
    reports = (iu_root / "indiana_reports.csv").read_text(encoding="utf-8").replace("Case 4.", "Caf\xe9 4.")
    (iu_root / "indiana_reports.csv").write_bytes(reports.encode("latin-1"))  # a latin-1 export of the CSV
    with pytest.raises(ValueError, match=r"indiana_reports\.csv: line 5 is not valid UTF-8"):
        datasets.load_dataset("iu-xray", iu_root)


def test_txt_layout_symlink_out_of_the_folder_is_rejected(tmp_path):
    root = tmp_path / "d"
    gray_png(root / "a.png")
    (root / "a.txt").write_text("inside")
    gray_png(tmp_path / "secret.png")
    (root / "link.png").symlink_to(tmp_path / "secret.png")
    (root / "link.txt").write_text("points out")
    with pytest.raises(ValueError, match=r"link\.png: resolves outside"):
        datasets.load_dataset("folder", root)
    (root / "link.png").unlink()
    (tmp_path / "secret.txt").write_text("a caption from elsewhere")
    gray_png(root / "b.png")
    (root / "b.txt").symlink_to(tmp_path / "secret.txt")
    with pytest.raises(ValueError, match=r"b\.txt: resolves outside"):
        datasets.load_dataset("folder", root)

"""CLIP image tower and CLIP score against transformers' CLIPModel and torchmetrics' CLIPScore."""
import numpy as np
import pytest
import torch
import transformers
from PIL import Image

from metrics import clip_image
import eval_fid
from fid_clip import TINY, VIT_L14, random_clip, save_clip, torchmetrics_clip_score
from fid_reference import inception_file, inception_state, write_images  # noqa: F401 (fixtures)

PROMPTS = ["the heart is normal in size", "small left pleural effusion", "no acute cardiopulmonary abnormality",
           "Mild cardiomegaly; the lungs are clear."]


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).abs().max() / b.abs().max()).item()


def write_pngs(folder, sizes, seed=0):
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    for i, (w, h) in enumerate(sizes):
        low = rng.random((h // 16 + 1, w // 16 + 1, 3))
        arr = np.asarray(Image.fromarray((low * 255).astype(np.uint8)).resize((w, h), Image.BICUBIC), dtype=float)
        Image.fromarray(np.clip(arr + rng.normal(0, 20, arr.shape), 0, 255).astype(np.uint8)).save(folder / f"{i:03d}.png")
    return eval_fid.list_images(folder)


def as_tensors(files):
    return [torch.from_numpy(np.array(Image.open(f).convert("RGB"))).permute(2, 0, 1) for f in files]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    folder = tmp_path_factory.mktemp("clip")
    model = random_clip(TINY)
    return model, save_clip(model, folder)


def test_preprocess_equals_transformers_pil_image_processor(tmp_path):
    processor = transformers.CLIPImageProcessorPil()
    for w, h in ((300, 260), (224, 400), (500, 224), (224, 224), (97, 131)):
        img = Image.fromarray(np.random.default_rng(w).integers(0, 256, (h, w, 3), dtype=np.uint8))
        ref = processor(images=img, return_tensors="pt")["pixel_values"][0]
        got = clip_image.preprocess(img)
        assert got.shape == (3, 224, 224)
        assert (got - ref).abs().max() < 1e-5, (w, h)


def test_tiny_image_tower_equals_transformers(tiny, tmp_path):
    model, folder = tiny
    ours = clip_image.load_image_encoder(folder)
    assert ours.config.num_attention_heads == 2 and ours.config.projection_dim == 24
    x = torch.randn(3, 3, 224, 224)
    with torch.no_grad():
        assert rel_err(ours(x), model.get_image_features(pixel_values=x).pooler_output) < 1e-5


def test_clip_score_equals_torchmetrics(tiny, tmp_path):
    model, folder = tiny
    files = write_pngs(tmp_path / "fake", [(256, 300), (300, 256), (224, 224), (260, 260)])
    got = eval_fid.clip_score(*eval_fid.load_clip(folder), files, PROMPTS, batch_size=3)
    reference = torchmetrics_clip_score(model, folder, as_tensors(files), PROMPTS, pil_processor=True)
    print(f"CLIP score ours {got['clip_score']!r}, torchmetrics {reference!r}")
    assert got["pairs"] == 4 and got["truncated_prompts"] == 0 and got["clip_score"] > 10
    assert got["clip_score"] == pytest.approx(reference, rel=1e-5, abs=1e-4)
    assert got["clip_score_pair_clamped"] >= got["clip_score"]


def test_clip_score_at_224_equals_torchmetrics_default_processor(tiny, tmp_path):
    """transformers' default (torchvision) image processor resizes differently; at 224 x 224 nothing is resized."""
    model, folder = tiny
    files = write_pngs(tmp_path / "fake", [(224, 224)] * 4, seed=1)
    got = eval_fid.clip_score(*eval_fid.load_clip(folder), files, PROMPTS)
    reference = torchmetrics_clip_score(model, folder, as_tensors(files), PROMPTS, pil_processor=False)
    assert got["clip_score"] == pytest.approx(reference, rel=1e-5, abs=1e-4)


def test_long_prompts_are_truncated_and_counted(tiny, tmp_path):
    files = write_pngs(tmp_path / "fake", [(224, 224)] * 2)
    long = " ".join(["the lungs are clear and there is no effusion"] * 12)
    encoders = eval_fid.load_clip(tiny[1] / "model.safetensors")  # the file works as well as its folder
    got = eval_fid.clip_score(*encoders, files, [long, PROMPTS[0]])
    assert got["truncated_prompts"] == 1
    cut = encoders[2].decode(encoders[2].encode(long)[0][0])  # the 75 tokens that were kept
    assert eval_fid.clip_score(*encoders, files, [cut, PROMPTS[0]])["clip_score"] == pytest.approx(got["clip_score"], abs=1e-4)


def test_mismatched_prompt_count_and_wrong_weights(tiny, tmp_path):
    files = write_pngs(tmp_path / "fake", [(224, 224)] * 3)
    with pytest.raises(ValueError, match="3 images but 4 prompts"):
        eval_fid.clip_score(*eval_fid.load_clip(tiny[1]), files, PROMPTS)
    text_only = tmp_path / "text_only"
    transformers.CLIPTextModel(transformers.CLIPTextConfig(**TINY["text_config"])).save_pretrained(text_only)
    with pytest.raises(ValueError, match=r"text_only/model.safetensors: no CLIP image tower in it"):
        clip_image.load_image_encoder(text_only)


def test_command_line_with_clip(tiny, inception_file, tmp_path, capsys):
    real, fake = write_images(tmp_path / "real", 4), write_images(tmp_path / "fake", 4, shift=0.1, seed=3)
    (tmp_path / "prompts.txt").write_text("\n".join(PROMPTS) + "\n")
    args = ["--real", str(real), "--fake", str(fake), "--inception", str(inception_file), "--dims", "64",
            "--clip", str(tiny[1]), "--kid-subsets", "2"]
    with pytest.warns(UserWarning, match="singular"):
        report = eval_fid.main(args + ["--prompts", str(tmp_path / "prompts.txt")])
    expected = eval_fid.clip_score(*eval_fid.load_clip(tiny[1]), eval_fid.list_images(fake), PROMPTS)
    assert report["clip"] == pytest.approx(expected)
    (tmp_path / "three.txt").write_text("\n".join(PROMPTS[:3]))
    with pytest.raises(SystemExit) as stop:
        eval_fid.main(args + ["--prompts", str(tmp_path / "three.txt")])
    assert stop.value.code == 2 and "4 images but 3 prompts" in capsys.readouterr().err


@pytest.mark.full
def test_full_vit_l14_clip_score_equals_torchmetrics(tmp_path):
    model = random_clip(VIT_L14)
    folder = save_clip(model, tmp_path / "clip-vit-large-patch14")
    files = write_pngs(tmp_path / "fake", [(256, 240), (224, 224)])
    encoders = eval_fid.load_clip(folder)
    assert encoders[0].config == clip_image.CLIPVisionConfig()
    pixels = torch.stack([clip_image.preprocess(eval_fid.read_image(f)) for f in files])
    with torch.no_grad():
        err = rel_err(encoders[0](pixels), model.get_image_features(pixel_values=pixels).pooler_output)
    got = eval_fid.clip_score(*encoders, files, PROMPTS[:2])
    del encoders
    reference = torchmetrics_clip_score(model, folder, as_tensors(files), PROMPTS[:2], pil_processor=True)
    print(f"ViT-L/14 image embedding rel err {err:.2e}; CLIP score ours {got['clip_score']!r}, torchmetrics {reference!r}")
    assert err < 1e-5
    assert got["clip_score"] == pytest.approx(reference, rel=1e-5, abs=1e-4)


def test_runs_take_their_prompts_from_the_samples_folder(tiny, inception_file, tmp_path, capsys):
    real = write_images(tmp_path / "real", 4)
    run = tmp_path / "lora-seed0"
    write_images(run / "samples", 4, shift=0.1, seed=5)
    (run / "samples" / "prompts.txt").write_text("\n".join(PROMPTS) + "\n")
    args = ["--real", str(real), "--inception", str(inception_file), "--dims", "64", "--clip", str(tiny[1]),
            "--kid-subsets", "2", "--runs", str(run)]
    with pytest.warns(UserWarning, match="singular"):
        result = eval_fid.main(args)
    expected = eval_fid.clip_score(*eval_fid.load_clip(tiny[1]), eval_fid.list_images(run / "samples"), PROMPTS)
    assert result["runs"][0]["clip"] == pytest.approx(expected)
    assert result["table"][0]["method"] == "lora-seed0"  # no run.json: the folder name
    assert result["table"][0]["CLIP score"] == {"mean": pytest.approx(expected["clip_score"]), "std": None,
                                                 "low": None, "high": None}  # one run, no interval of its own
    (run / "samples" / "prompts.txt").unlink()
    with pytest.raises(SystemExit) as stop:
        eval_fid.main(args)
    assert stop.value.code == 2 and "prompts.txt: cannot read the prompts file" in capsys.readouterr().err

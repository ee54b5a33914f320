"""clip_text.py and model/clip_tokenizer.py against the references: transformers' CLIPTextModel / CLIPModel with random
weights saved in every key layout we read, and, on CLIP's real 49,408-token vocabulary, OpenAI's reference tokenizer
and transformers' CLIPTokenizer."""
import gzip
import importlib.util
import json
from pathlib import Path

import pytest
import torch
import transformers
from safetensors.torch import save_file
from torch import nn

import clip_corpus
from model.clip_tokenizer import Tokenizer, load_tokenizer, split
from clip_text import CLIPTextConfig, CLIPTextModel, load_text_encoder

transformers.logging.set_verbosity_error()

# SD 1.5's text_encoder/config.json as published (transformers 4.22, so the legacy eos_token_id 2).
SD15_CONFIG = {
    "_name_or_path": "openai/clip-vit-large-patch14", "architectures": ["CLIPTextModel"], "attention_dropout": 0.0,
    "bos_token_id": 0, "dropout": 0.0, "eos_token_id": 2, "hidden_act": "quick_gelu", "hidden_size": 768,
    "initializer_factor": 1.0, "initializer_range": 0.02, "intermediate_size": 3072, "layer_norm_eps": 1e-05,
    "max_position_embeddings": 77, "model_type": "clip_text_model", "num_attention_heads": 12,
    "num_hidden_layers": 12, "pad_token_id": 1, "projection_dim": 768, "torch_dtype": "float32",
    "transformers_version": "4.22.0.dev0", "vocab_size": 49408,
}
TINY_CONFIG = dict(vocab_size=1000, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                   max_position_embeddings=77, hidden_act="quick_gelu", layer_norm_eps=1e-5, eos_token_id=999,
                   bos_token_id=998, pad_token_id=1)
TOL = 1e-5


def rel_err(ours: torch.Tensor, ref: torch.Tensor) -> float:
    return ((ours - ref).abs().max() / ref.abs().max()).item()


def randomize(model: nn.Module) -> nn.Module:
    """Random weights everywhere, LayerNorm scales and all biases included, so a swapped or unloaded tensor shows."""
    with torch.no_grad():
        for name, p in model.named_parameters():
            is_norm_scale = "norm" in name and name.endswith("weight")
            p.normal_(1.0 if is_norm_scale else 0.0, 0.1 if is_norm_scale or name.endswith("bias") else 0.05)
    return model.eval()


def prompt_ids(vocab_size: int, lengths: list[int], eos: int, bos: int) -> torch.Tensor:
    """Rows framed as SD 1.5's tokenizer frames them: start, text ids, end, end as padding."""
    rows = []
    for n in lengths:
        row = [bos, *torch.randint(0, vocab_size - 3, (n,)).tolist(), eos]
        rows.append(row + [eos] * (77 - len(row)))
    return torch.tensor(rows)


def reference_text_model(config: dict) -> transformers.CLIPTextModel:
    return randomize(transformers.CLIPTextModel(transformers.CLIPTextConfig(**config)))


def save_layout(ref: transformers.CLIPTextModel, layout: str, root: Path, config: dict) -> Path:
    """Save the reference's weights as a real file of that layout would hold them; return the path to load."""
    state = {k: v.contiguous() for k, v in ref.state_dict().items()}
    positions = torch.arange(ref.config.max_position_embeddings)[None]
    if layout == "diffusers":  # transformers 4 wrote text_model.* and, before 4.31, the int64 position_ids
        folder = root / "text_encoder"
        folder.mkdir(parents=True)
        save_file({**{"text_model." + k: v for k, v in state.items()}, "text_model.embeddings.position_ids": positions},
                  folder / "model.safetensors")
        (folder / "config.json").write_text(json.dumps(config))
        return root
    if layout == "single_file":  # CompVis checkpoint: text encoder beside the UNet and VAE, position_ids as floats
        prefix = "cond_stage_model.transformer.text_model."
        file = root / "sd15.safetensors"
        save_file({**{prefix + k: v for k, v in state.items()}, prefix + "embeddings.position_ids": positions.float(),
                   "model.diffusion_model.input_blocks.0.0.weight": torch.randn(4, 4, 3, 3),
                   "first_stage_model.encoder.conv_in.weight": torch.randn(8, 3, 3, 3)}, file)
        return file
    if layout == "transformers5":  # transformers >= 5 saves CLIPTextModel without the text_model. prefix
        ref.save_pretrained(root)
        return root / "model.safetensors"
    raise AssertionError(layout)


def check_parity(ours: CLIPTextModel, ref: transformers.CLIPTextModel, ids: torch.Tensor) -> None:
    with torch.no_grad():
        hidden, pooled = ours.encode(ids)
        out = ref(input_ids=ids)
    assert hidden.shape == out.last_hidden_state.shape
    assert rel_err(hidden, out.last_hidden_state) < TOL
    assert rel_err(pooled, out.pooler_output) < TOL
    assert torch.equal(ours(ids), hidden)


# ----------------------------------------------------------------------------------------------- text encoder


@pytest.mark.parametrize("layout", ["diffusers", "single_file", "transformers5"])
def test_tiny_encoder_equals_transformers(tmp_path, layout):
    ref = reference_text_model(TINY_CONFIG)
    path = save_layout(ref, layout, tmp_path, {**TINY_CONFIG, "architectures": ["CLIPTextModel"]})
    ours = load_text_encoder(path, config=CLIPTextConfig.tiny() if layout == "single_file" else None)
    assert ours.config == CLIPTextConfig.tiny()
    check_parity(ours, ref, prompt_ids(1000, [0, 5, 30, 75], eos=999, bos=998))


def test_fp16_file_loads_into_fp32_or_requested_dtype(tmp_path):
    ref = reference_text_model(TINY_CONFIG).half().float()  # weights an fp16 file holds exactly
    folder = tmp_path / "text_encoder"
    folder.mkdir()
    save_file({"text_model." + k: v.half() for k, v in ref.state_dict().items()}, folder / "model.fp16.safetensors")
    (folder / "config.json").write_text(json.dumps(TINY_CONFIG))
    ours = load_text_encoder(tmp_path)
    assert ours.final_layer_norm.weight.dtype == torch.float32
    check_parity(ours, ref, prompt_ids(1000, [7, 40], eos=999, bos=998))
    assert load_text_encoder(folder, dtype=torch.bfloat16).final_layer_norm.weight.dtype == torch.bfloat16


def test_clip_model_file_gives_text_side_and_projection(tmp_path):
    """A transformers CLIPModel file (as eval_fid.py loads ViT-L/14 for CLIP score): text side and text
    projection load, the image side and logit_scale are ignored."""
    vision = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=4, image_size=32,
                  patch_size=16)
    ref = transformers.CLIPModel(transformers.CLIPConfig(text_config=TINY_CONFIG, vision_config=vision,
                                                         projection_dim=16))
    randomize(ref).save_pretrained(tmp_path)
    ours = load_text_encoder(tmp_path / "model.safetensors")
    assert ours.config.projection_dim == 16
    ids = prompt_ids(1000, [3, 75], eos=999, bos=998)
    with torch.no_grad():
        _, pooled = ours.encode(ids)
        ref_pooled = ref.text_model(input_ids=ids).pooler_output
        ref_embeds = ref.get_text_features(input_ids=ids).pooler_output
        assert rel_err(pooled, ref_pooled) < TOL
        assert rel_err(ours.project(pooled), ref_embeds) < TOL


@pytest.mark.full
def test_full_sd15_encoder_equals_transformers_both_layouts(tmp_path):
    """SD 1.5's real configuration (legacy eos_token_id 2: transformers pools at the highest id, we at the first
    end token), loaded from a diffusers folder and from an original single-file checkpoint."""
    ref = reference_text_model(SD15_CONFIG)
    ids = prompt_ids(49408, [0, 12, 75], eos=49407, bos=49406)
    with torch.no_grad():
        out = ref(input_ids=ids)
    for layout in ("diffusers", "single_file"):
        folder = tmp_path / layout
        folder.mkdir()
        ours = load_text_encoder(save_layout(ref, layout, folder, SD15_CONFIG))
        assert ours.config == CLIPTextConfig()
        with torch.no_grad():
            hidden, pooled = ours.encode(ids)
        assert hidden.shape == (3, 77, 768)
        assert rel_err(hidden, out.last_hidden_state) < TOL
        assert rel_err(pooled, out.pooler_output) < TOL
        del ours, hidden, pooled
        for f in folder.rglob("*.safetensors"):
            f.unlink()


class Recorder(nn.Module):
    """Stands in for an nn.Linear as SeLoRA's wrapper does, and notes that it was called."""

    def __init__(self, linear: nn.Linear, name: str, calls: list):
        super().__init__()
        self.linear, self.name, self.calls = linear, name, calls

    def forward(self, x):
        self.calls.append(self.name)
        return self.linear(x)


def test_every_linear_is_a_module_called_once():
    """SeLoRA replaces every nn.Linear attribute of the text encoder; each must then be used, exactly once."""
    model = randomize(CLIPTextModel(CLIPTextConfig(**{**vars(CLIPTextConfig.tiny()), "projection_dim": 16})))
    ids = prompt_ids(1000, [4, 9], eos=999, bos=998)
    with torch.no_grad():
        before = model.project(model.encode(ids)[1])
    calls, names = [], []
    for parent_name, parent in list(model.named_modules()):
        for child_name, child in list(parent.named_children()):
            if isinstance(child, nn.Linear):
                names.append(f"{parent_name}.{child_name}".lstrip("."))
                setattr(parent, child_name, Recorder(child, names[-1], calls))
    assert len(names) == 6 * 2 + 1
    with torch.no_grad():
        after = model.project(model.encode(ids)[1])
    assert sorted(calls) == sorted(names)
    assert torch.equal(before, after)


def test_encoder_errors(tmp_path):
    ref = reference_text_model(TINY_CONFIG)
    path = save_layout(ref, "diffusers", tmp_path, TINY_CONFIG)
    file = path / "text_encoder" / "model.safetensors"
    state = {"text_model." + k: v.contiguous() for k, v in ref.state_dict().items()}
    del state["text_model.encoder.layers.1.mlp.fc2.bias"]
    save_file(state, file)
    with pytest.raises(ValueError, match=r"missing keys \(1\):\s+encoder\.layers\.1\.mlp\.fc2\.bias"):
        load_text_encoder(path)
    other = CLIPTextConfig(**{**vars(CLIPTextConfig.tiny()), "intermediate_size": 48})
    with pytest.raises(ValueError, match=r"text_encoder/config\.json: describes .*, but .*intermediate_size=48.* was given"):
        load_text_encoder(file, config=other)  # one rule for every part (weights.part_config)
    config_json = (path / "text_encoder" / "config.json").read_text()
    (path / "text_encoder" / "config.json").unlink()
    with pytest.raises(ValueError, match="shape mismatches"):
        load_text_encoder(file, config=other)
    (path / "text_encoder" / "config.json").write_text(config_json)
    save_file({"model.diffusion_model.out.0.weight": torch.zeros(4)}, file)
    with pytest.raises(ValueError, match=r"(?s)missing keys \(36\).*unexpected keys \(1\):\s+model\.diffusion_model"):
        load_text_encoder(file)
    (path / "text_encoder" / "config.json").write_text("{not json")
    with pytest.raises(ValueError, match="config.json: not valid JSON"):
        load_text_encoder(path)
    with pytest.raises(ValueError, match="hidden_act 'relu' is not supported"):
        CLIPTextConfig(hidden_act="relu")

    model = CLIPTextModel(CLIPTextConfig.tiny())
    ids = prompt_ids(1000, [3, 4], eos=999, bos=998)
    ids[1] = 5
    with pytest.raises(ValueError, match=r"rows \[1\] have none"):
        model.encode(ids)
    with pytest.raises(ValueError, match="78 tokens per prompt, more than the 77 positions"):
        model(torch.zeros(1, 78, dtype=torch.long))
    with pytest.raises(ValueError, match="no text_projection"):
        model.project(torch.zeros(1, 32))


def test_config_from_transformers():
    assert CLIPTextConfig.from_transformers(SD15_CONFIG) == CLIPTextConfig()  # no projection, eos 2 -> 49407
    with_projection = {**SD15_CONFIG, "architectures": ["CLIPTextModelWithProjection"]}
    assert CLIPTextConfig.from_transformers(with_projection).projection_dim == 768
    clip_model = transformers.CLIPConfig(text_config=TINY_CONFIG, projection_dim=24).to_dict()
    assert CLIPTextConfig.from_transformers(clip_model) == CLIPTextConfig(**{**vars(CLIPTextConfig.tiny()),
                                                                            "projection_dim": 24})
    # Keys a config leaves out take transformers' defaults (ViT-B's text tower), not SD 1.5's.
    assert CLIPTextConfig.from_transformers({"vocab_size": 49408}).hidden_size == 512


# ----------------------------------------------------------------------------------------------- tokenizer

CLIP_DIR = Path(__file__).resolve().parent.parent / ".cache" / "clip"
GZ = CLIP_DIR / "bpe_simple_vocab_16e6.txt.gz"


@pytest.fixture(scope="module")
def openai_tokenizer():
    """OpenAI's reference tokenizer, the simple_tokenizer module of the clip-anytorch wheel."""
    source = CLIP_DIR / "simple_tokenizer.py"
    if not (GZ.is_file() and source.is_file()):
        pytest.fail(f"CLIP's vocabulary or reference tokenizer is missing from {CLIP_DIR}: "
                    "run `bash tools/setup.sh --test` to fetch them from the clip-anytorch wheel")
    spec = importlib.util.spec_from_file_location("clip_simple_tokenizer", source)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.SimpleTokenizer(str(GZ))


@pytest.fixture(scope="module")
def hf_folder(openai_tokenizer, tmp_path_factory) -> Path:
    """A diffusers pipeline folder whose tokenizer/ holds vocab.json and merges.txt converted from the .gz.

    The conversion, as the files on the Hub were made: vocab.json is OpenAI's symbol -> id table (byte symbols,
    byte symbols + </w>, the first 48,894 merges joined, <|startoftext|>, <|endoftext|>); merges.txt is the
    '#version: 0.2' line then those merges, one 'a b' pair a line.
    """
    root = tmp_path_factory.mktemp("sd15")
    folder = root / "tokenizer"
    folder.mkdir()
    merges = gzip.open(GZ).read().decode("utf-8").split("\n")[1:49152 - 256 - 2 + 1]
    (folder / "vocab.json").write_text(json.dumps(openai_tokenizer.encoder), encoding="utf-8")
    (folder / "merges.txt").write_text("#version: 0.2\n" + "\n".join(merges) + "\n", encoding="utf-8")
    return root


@pytest.fixture(scope="module")
def hf_tokenizer(hf_folder):
    return transformers.CLIPTokenizer.from_pretrained(hf_folder / "tokenizer")


@pytest.fixture(scope="module")
def ours(hf_folder) -> Tokenizer:
    return load_tokenizer(hf_folder)


def test_vocabularies_agree(ours, openai_tokenizer, hf_tokenizer, hf_folder):
    from_gz = load_tokenizer(GZ)
    assert len(ours.encoder) == 49408
    assert from_gz.encoder == ours.encoder == openai_tokenizer.encoder == hf_tokenizer.get_vocab()
    assert from_gz.ranks == ours.ranks
    assert (ours.start_id, ours.end_id) == (49406, 49407)
    assert load_tokenizer(hf_folder / "tokenizer").encoder == ours.encoder


def test_split_where_punctuation_and_digits_touch_words():
    assert split("4k,") == ["4", "k", ","]
    assert split("highly-detailed") == ["highly", "-", "detailed"]
    assert split("xxxx.") == ["xxxx", "."]
    assert split("t12-l1") == ["t", "1", "2", "-", "l", "1"]
    assert split("it's they'll we'd") == ["it", "'s", "they", "'ll", "we", "'d"]
    assert split("a.'s 5%!") == ["a", ".'", "s", "5", "%!"]
    assert split("größe ½µm\u00a0x\x1cy") == ["größe", "½", "µm", "x", "\x1c", "y"]


def test_corpus_ids_equal_both_references(ours, openai_tokenizer, hf_tokenizer):
    corpus = clip_corpus.corpus()
    assert len(corpus) >= 200
    ids, n_truncated = ours.encode(corpus)
    ref = hf_tokenizer(corpus, padding="max_length", max_length=77, truncation=True, return_tensors="pt").input_ids
    assert ids.dtype == torch.long and ids.shape == (len(corpus), 77)
    mismatched = [text for text, a, b in zip(corpus, ids, ref) if not torch.equal(a, b)]
    assert not mismatched
    for text in corpus:
        assert ours.tokenize(text) == openai_tokenizer.encode(text), text
    full_lengths = [len(hf_tokenizer(text, add_special_tokens=False).input_ids) for text in corpus]
    assert n_truncated == sum(n > 75 for n in full_lengths) >= 10


def test_where_references_disagree_we_follow_transformers(ours, openai_tokenizer, hf_tokenizer):
    """The sentences of clip_corpus.DISAGREE are exactly where ftfy, HTML unescaping or str.lower() make
    OpenAI's ids differ from transformers'; SD 1.5 uses transformers' CLIPTokenizer, so we match it."""
    for text in clip_corpus.DISAGREE:
        hf = hf_tokenizer(text, add_special_tokens=False).input_ids
        assert openai_tokenizer.encode(text) != hf, f"the references now agree on {text!r}"
        assert ours.tokenize(text) == hf, text


def test_framing_padding_and_truncation(ours):
    fits, over = " ".join(["lung"] * 75), " ".join(["lung"] * 76)
    lung = ours.tokenize("lung")
    assert len(lung) == 1
    ids, n_truncated = ours.encode([fits, over, ""])
    assert n_truncated == 1
    assert ids[0].tolist() == [49406] + lung * 75 + [49407]
    assert ids[1].tolist() == ids[0].tolist()  # the 76th word is dropped, the end token kept
    assert ids[2].tolist() == [49406] + [49407] * 76
    assert torch.equal(ours("lung"), ours(["lung"]))


def test_decode(ours, hf_tokenizer):
    for text in ["No acute cardiopulmonary process.", "T12-L1 4k, highly-detailed XXXX.", "größe 5 µm"]:
        ids = ours(text)[0]
        assert ours.decode(ids) == hf_tokenizer.decode(ids.tolist(), skip_special_tokens=True)


def test_tokenizer_file_errors(tmp_path, hf_folder):
    with pytest.raises(FileNotFoundError, match="expected a folder with vocab.json and merges.txt"):
        load_tokenizer(tmp_path / "nowhere")
    folder = tmp_path / "tokenizer"
    folder.mkdir()
    (folder / "merges.txt").write_text((hf_folder / "tokenizer" / "merges.txt").read_text(encoding="utf-8"))
    with pytest.raises(FileNotFoundError, match=r"vocab\.json: missing"):
        load_tokenizer(tmp_path)
    vocab = json.loads((hf_folder / "tokenizer" / "vocab.json").read_text(encoding="utf-8"))
    for content, message in [("{broken", "not valid JSON"), ("[1, 2]", "mapping BPE symbols to integer ids"),
                             (json.dumps({"a": 1, "b": 1}), "two symbols share an id"),
                             (json.dumps({k: v for k, v in vocab.items() if k != "lung</w>"}),
                              r"lacks 1 symbols .*'lung</w>'")]:
        (folder / "vocab.json").write_text(content, encoding="utf-8")
        with pytest.raises(ValueError, match=message):
            load_tokenizer(folder)
    (folder / "vocab.json").write_text(json.dumps(vocab), encoding="utf-8")
    (folder / "merges.txt").write_text("#version: 0.2\ni n\nt h e\n", encoding="utf-8")
    with pytest.raises(ValueError, match=r"merges\.txt: line 3: a merge must be two symbols.*'t h e'"):
        load_tokenizer(folder)

    not_gzip = tmp_path / "bpe_simple_vocab_16e6.txt.gz"
    not_gzip.write_bytes(b"plain text, not gzip")
    with pytest.raises(ValueError, match="not a readable gzip"):
        load_tokenizer(not_gzip)
    short = tmp_path / "short.txt.gz"
    short.write_bytes(gzip.compress(b"version line\ni n\nt h\n"))
    with pytest.raises(ValueError, match="has 2 merges, CLIP's vocabulary needs 48894"):
        load_tokenizer(short)

"""CLIP's text side as Stable Diffusion 1.5 uses it: the text encoder and its byte-level BPE tokenizer.

SD 1.5 conditions its UNet on the last hidden state [B, 77, 768] of OpenAI CLIP ViT-L/14's text tower
(Radford et al. 2021): a 12-layer pre-LayerNorm transformer with a causal mask, quick-GELU MLPs and a final
LayerNorm. The pooled state (at the end token) and the text projection are what CLIP score uses.

Both halves are proven equal to transformers' `CLIPTextModel` and `CLIPTokenizer` in tests/test_clip_text.py.
"""
from __future__ import annotations

import gzip
import json
import os
import re
import unicodedata
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from weights import atomic_write, load_file, load_strict, part_config, read_json, resolve_component

# ---------------------------------------------------------------------------------------------------------------
# Text encoder
# ---------------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class CLIPTextConfig:
    """Shape of the text tower; the defaults are ViT-L/14's, as in SD 1.5's `text_encoder/config.json`."""
    vocab_size: int = 49408
    hidden_size: int = 768
    intermediate_size: int = 3072
    num_hidden_layers: int = 12
    num_attention_heads: int = 12
    max_position_embeddings: int = 77
    hidden_act: str = "quick_gelu"
    layer_norm_eps: float = 1e-5
    eos_token_id: int = 49407
    projection_dim: int | None = None  # set for CLIPModel / CLIPTextModelWithProjection: adds `text_projection`

    def __post_init__(self):
        if self.hidden_act not in ACTIVATIONS:
            raise ValueError(f"hidden_act {self.hidden_act!r} is not supported (known: {', '.join(ACTIVATIONS)})")
        if self.hidden_size % self.num_attention_heads:
            raise ValueError(f"hidden_size {self.hidden_size} is not divisible by "
                             f"num_attention_heads {self.num_attention_heads}")

    @classmethod
    def tiny(cls) -> CLIPTextConfig:
        """A tower of about 50k parameters for fast tests; 77 positions, so tokenizer output fits."""
        return cls(vocab_size=1000, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                   num_attention_heads=4, eos_token_id=999)

    @classmethod
    def from_transformers(cls, cfg: dict, source: str | os.PathLike = "text encoder config") -> CLIPTextConfig:
        """Read a transformers config.json: a CLIPTextConfig one, or a CLIPModel one (its `text_config`).

        `projection_dim` is kept only where the model has a text projection (CLIPModel,
        CLIPTextModelWithProjection): SD 1.5's CLIPTextModel config lists one it does not use.
        transformers configs written before its PR #24773 give `eos_token_id` 2 and pool at the highest id
        instead, which in CLIP's vocabulary is the end token, vocab_size - 1; such configs get that here.
        """
        text = cfg.get("text_config", cfg)
        if not isinstance(text, dict):
            raise ValueError(f"{source}: text_config must be a JSON object, got {type(text).__name__}")
        fields = {**TRANSFORMERS_DEFAULTS, **{name: text[name] for name in TRANSFORMERS_DEFAULTS if name in text}}
        if fields["eos_token_id"] == 2:
            fields["eos_token_id"] = fields["vocab_size"] - 1
        if "text_config" in cfg or "CLIPTextModelWithProjection" in (cfg.get("architectures") or []):
            fields["projection_dim"] = cfg.get("projection_dim", text.get("projection_dim", 512))
        return cls(**fields)


    def to_transformers(self) -> dict:
        """This shape as a transformers `text_encoder/config.json` (CLIPTextModel; the inverse of
        `from_transformers`)."""
        fields = {name: getattr(self, name) for name in TRANSFORMERS_DEFAULTS}
        return {"architectures": ["CLIPTextModel"], "model_type": "clip_text_model", **fields,
                "bos_token_id": self.eos_token_id - 1, "pad_token_id": self.eos_token_id}

# transformers' CLIPTextConfig defaults (CLIP ViT-B's text tower), for keys a config.json leaves out.
TRANSFORMERS_DEFAULTS = dict(vocab_size=49408, hidden_size=512, intermediate_size=2048, num_hidden_layers=12,
                             num_attention_heads=8, max_position_embeddings=77, hidden_act="quick_gelu",
                             layer_norm_eps=1e-5, eos_token_id=49407)


def quick_gelu(x: torch.Tensor) -> torch.Tensor:
    """CLIP's GELU approximation x * sigmoid(1.702 x), which OpenAI trained with."""
    return x * torch.sigmoid(1.702 * x)


ACTIVATIONS = {"quick_gelu": quick_gelu, "gelu": F.gelu}


class CLIPAttention(nn.Module):
    """Multi-head self-attention; causal for text (each token sees itself and the tokens before it),
    unmasked for CLIP's image tower (clip_image.py), where every patch sees every patch."""

    def __init__(self, cfg: CLIPTextConfig, causal: bool = True):
        super().__init__()
        width = cfg.hidden_size
        self.num_heads, self.causal = cfg.num_attention_heads, causal
        self.q_proj = nn.Linear(width, width)
        self.k_proj = nn.Linear(width, width)
        self.v_proj = nn.Linear(width, width)
        self.out_proj = nn.Linear(width, width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, T, C = x.shape
        q, k, v = (proj(x).view(B, T, self.num_heads, -1).transpose(1, 2)
                   for proj in (self.q_proj, self.k_proj, self.v_proj))
        y = F.scaled_dot_product_attention(q, k, v, is_causal=self.causal)  # softmax(q k^T / sqrt(d) [+ mask]) v
        return self.out_proj(y.transpose(1, 2).reshape(B, T, C))


class CLIPMLP(nn.Module):
    def __init__(self, cfg: CLIPTextConfig):
        super().__init__()
        self.fc1 = nn.Linear(cfg.hidden_size, cfg.intermediate_size)
        self.fc2 = nn.Linear(cfg.intermediate_size, cfg.hidden_size)
        self.act = ACTIVATIONS[cfg.hidden_act]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(x)))


class CLIPEncoderLayer(nn.Module):
    """Pre-LayerNorm residual block: x + attn(ln1(x)), then x + mlp(ln2(x))."""

    def __init__(self, cfg: CLIPTextConfig, causal: bool = True):
        super().__init__()
        self.layer_norm1 = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)
        self.self_attn = CLIPAttention(cfg, causal)
        self.layer_norm2 = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)
        self.mlp = CLIPMLP(cfg)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.self_attn(self.layer_norm1(x))
        return x + self.mlp(self.layer_norm2(x))


class CLIPTextModel(nn.Module):
    """CLIP's text transformer. Parameter names are transformers' `text_model.*` keys without that prefix.

    With `gradient_checkpointing` set, each layer's activations are recomputed in backward (as sd_unet.UNet's).
    """

    def __init__(self, config: CLIPTextConfig | None = None):
        super().__init__()
        cfg = self.config = config or CLIPTextConfig()
        self.gradient_checkpointing = False
        self.embeddings = nn.ModuleDict({
            "token_embedding": nn.Embedding(cfg.vocab_size, cfg.hidden_size),
            "position_embedding": nn.Embedding(cfg.max_position_embeddings, cfg.hidden_size),
        })
        self.encoder = nn.ModuleDict({
            "layers": nn.ModuleList(CLIPEncoderLayer(cfg) for _ in range(cfg.num_hidden_layers)),
        })
        self.final_layer_norm = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)
        if cfg.projection_dim is not None:
            self.text_projection = nn.Linear(cfg.hidden_size, cfg.projection_dim, bias=False)

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        """Token ids [B, T] -> final-normed hidden states [B, T, width]: SD 1.5's cross-attention context."""
        T = input_ids.shape[1]
        if T > self.config.max_position_embeddings:
            raise ValueError(f"input_ids has {T} tokens per prompt, more than the "
                             f"{self.config.max_position_embeddings} positions of this text encoder")
        x = self.embeddings.token_embedding(input_ids) + self.embeddings.position_embedding.weight[:T]
        for layer in self.encoder.layers:
            if self.gradient_checkpointing and torch.is_grad_enabled():
                x = checkpoint(layer, x, use_reentrant=False)
            else:
                x = layer(x)
        return self.final_layer_norm(x)

    def encode(self, input_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Return (last hidden state [B, T, width], pooled [B, width]).

        The pooled state is the last hidden state at the first occurrence of `config.eos_token_id` in each
        row (the end token; SD 1.5's padding repeats it, so the first one marks the end of the text), which
        is transformers' rule for an up-to-date config, and equals its legacy highest-id rule on CLIP ids.
        """
        hidden = self(input_ids)
        is_eos = input_ids == self.config.eos_token_id
        if not is_eos.any(dim=1).all():
            raise ValueError(f"every row of input_ids needs the end token {self.config.eos_token_id} to pool at; "
                             f"rows {torch.nonzero(~is_eos.any(dim=1)).flatten().tolist()} have none")
        first_eos = is_eos.int().argmax(dim=1)
        return hidden, hidden[torch.arange(len(input_ids), device=hidden.device), first_eos]

    def project(self, pooled: torch.Tensor) -> torch.Tensor:
        """Pooled state -> CLIP's joint text-image embedding space (unnormalised), as CLIP score uses it."""
        if self.config.projection_dim is None:
            raise ValueError("this text encoder has no text_projection (config.projection_dim is None); "
                             "load a CLIPModel checkpoint with its config.json to get one")
        return self.text_projection(pooled)


# An original SD single-file checkpoint holds transformers' layout under this prefix, beside the UNet and VAE.
# transformers < 5 prefixes the keys with `text_model.` (CLIPModel files too), transformers >= 5 does not.
SINGLE_FILE_PREFIX = "cond_stage_model.transformer."
# Keys a text encoder file may hold that are not ours: the position_ids buffer, and a CLIPModel's image side.
IGNORED = re.compile(r"(text_model\.)?embeddings\.position_ids|vision_model\..*|visual_projection\.weight|logit_scale")


def text_encoder_state(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Map a checkpoint's keys to CLIPTextModel's: strip the layout's prefixes, drop the keys we do not use."""
    if any(k.startswith(SINGLE_FILE_PREFIX) for k in state):
        state = {k[len(SINGLE_FILE_PREFIX):]: v for k, v in state.items() if k.startswith(SINGLE_FILE_PREFIX)}
    return {key.removeprefix("text_model."): value for key, value in state.items() if not IGNORED.fullmatch(key)}


def load_text_encoder(path: str | os.PathLike, config: CLIPTextConfig | None = None,
                      dtype: torch.dtype | None = None) -> CLIPTextModel:
    """Load a text encoder from a diffusers folder, its `text_encoder/` folder or weights file, an original SD
    single-file checkpoint (`cond_stage_model.transformer.text_model.*`) or a transformers CLIPModel file.

    The configuration follows weights.part_config: the config.json beside a transformers weights file (`config`,
    if also given, must agree), else `config`, else SD 1.5's.
    """
    file = resolve_component(path, "text_encoder", ("model.safetensors", "model.fp16.safetensors"))
    state = load_file(file)
    single_file = any(k.startswith(SINGLE_FILE_PREFIX) for k in state)
    config, hint = part_config(config, file, CLIPTextConfig.from_transformers, "text encoder", beside=not single_file)
    model = CLIPTextModel(config)
    return load_strict(model, text_encoder_state(state), file, dtype, hint).eval()


# ---------------------------------------------------------------------------------------------------------------
# Tokenizer
# ---------------------------------------------------------------------------------------------------------------

START, END = "<|startoftext|>", "<|endoftext|>"
END_OF_WORD = "</w>"
N_MERGES = 49152 - 256 - 2  # merges used from CLIP's bpe_simple_vocab_16e6.txt.gz: vocab 49408 = 512 + merges + 2
# Unicode's White_Space property, what the reference split pattern's \s means (Python's str.isspace() also
# counts the separators U+001C..U+001F, which CLIP treats as punctuation).
WHITESPACE = frozenset("\t\n\x0b\x0c\r \x85\xa0\u1680\u2000\u2001\u2002\u2003\u2004\u2005\u2006\u2007\u2008"
                       "\u2009\u200a\u2028\u2029\u202f\u205f\u3000")
SPECIALS = re.compile(f"({re.escape(START)}|{re.escape(END)})")


@lru_cache(maxsize=1)
def bytes_to_unicode() -> dict[int, str]:
    """GPT-2's reversible byte -> printable character map, so BPE works on strings without whitespace or
    control characters: printable Latin-1 bytes map to themselves, the other 68 to U+0100 onwards in order."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    others = [b for b in range(256) if b not in printable]
    return {**{b: chr(b) for b in printable}, **{b: chr(256 + i) for i, b in enumerate(others)}}


def clean(text: str) -> str:
    """Canonical composition (NFC) and per-character lowercasing, as transformers' CLIPTokenizer does.

    OpenAI's tokenizer runs ftfy instead (a dependency we do not take), then unescapes HTML twice. That differs
    on mojibake, curly quotes, ligatures, full-width letters, control characters and HTML entities, which we
    keep as they are, and str.lower()'s final sigma. Whitespace needs no collapsing: `split` drops it.
    """
    return "".join(c.lower() for c in unicodedata.normalize("NFC", text))


def split(text: str) -> list[str]:
    """CLIP's pre-tokenization of cleaned text, the regex `'s|'t|'re|'ve|'m|'ll|'d|[\\p{L}]+|[\\p{N}]|[^\\s\\p{L}\\p{N}]+`
    tried left to right, written with Unicode categories (`re` has no \\p{..}): contractions, runs of letters,
    single digits, runs of anything else but whitespace, which is dropped. So "t12-l1 4k," gives
    t 1 2 - l 1 4 k , and "highly-detailed" gives highly - detailed.

    CLIP's pattern starts with the alternatives <|startoftext|> and <|endoftext|>; transformers' ByteLevel step
    splits those words again, so the only special tokens it honours are the exact strings in the raw text,
    which `Tokenizer.tokenize` takes out before cleaning. We do the same, so no alternatives for them here.
    """
    def kind(c: str) -> str:  # " " whitespace, "L" letter, "N" number, "P" anything else
        if c in WHITESPACE:
            return " "
        major = unicodedata.category(c)[0]
        return major if major in "LN" else "P"

    words, i = [], 0
    while i < len(text):
        c, start = text[i], i
        k = kind(c)
        if k == " ":
            i += 1
            continue
        if c == "'" and (m := re.match(r"'(s|t|re|ve|m|ll|d)", text[i:i + 3])):
            i += len(m.group())
        elif k == "N":
            i += 1
        else:
            while i < len(text) and kind(text[i]) == k:
                i += 1
        words.append(text[start:i])
    return words


def merge_pair(symbols: list[str], pair: tuple[str, str]) -> list[str]:
    """`symbols` with every occurrence of the adjacent `pair` joined into one symbol, left to right."""
    merged, i = [], 0
    while i < len(symbols):
        if i + 1 < len(symbols) and (symbols[i], symbols[i + 1]) == pair:
            merged.append(symbols[i] + symbols[i + 1])
            i += 2
        else:
            merged.append(symbols[i])
            i += 1
    return merged


class Tokenizer:
    """CLIP's byte-level BPE tokenizer with SD 1.5's framing: [start, <= 75 text tokens, end, end padding...].

    `vocab` maps BPE symbols to ids; `merges` are the symbol pairs in priority order (first merges first).
    """

    def __init__(self, vocab: dict[str, int], merges: list[tuple[str, str]], context_length: int = 77,
                 source: str = "vocabulary"):
        byte_symbols = list(bytes_to_unicode().values())
        needed = [START, END, *byte_symbols, *(s + END_OF_WORD for s in byte_symbols)]
        needed += ["".join(pair) for pair in merges]
        missing = [s for s in needed if s not in vocab]
        if missing:
            raise ValueError(f"{source}: the vocabulary lacks {len(missing)} symbols that CLIP's BPE needs, "
                             f"e.g. {missing[:5]} (start/end tokens, the 512 byte symbols, every merge's result)")
        self.encoder = vocab
        self.decoder = {i: s for s, i in vocab.items()}
        self.ranks = {pair: rank for rank, pair in enumerate(merges)}
        self.start_id, self.end_id = vocab[START], vocab[END]
        self.context_length = context_length
        self.byte_encoder = bytes_to_unicode()
        self.byte_decoder = {c: b for b, c in self.byte_encoder.items()}
        self.cache: dict[str, list[int]] = {}

    def bpe(self, word: str) -> list[int]:
        """Ids of one pre-token: its UTF-8 bytes as symbols (the last one marked end-of-word), then the
        lowest-ranked adjacent pair merged everywhere, again and again, until no pair is in the merge list."""
        if word in self.cache:
            return self.cache[word]
        symbols = [self.byte_encoder[b] for b in word.encode("utf-8")]
        symbols[-1] += END_OF_WORD
        while len(symbols) > 1:
            pairs = set(zip(symbols, symbols[1:]))
            best = min(pairs, key=lambda p: self.ranks.get(p, len(self.ranks)))
            if best not in self.ranks:
                break
            symbols = merge_pair(symbols, best)
        ids = self.cache[word] = [self.encoder[s] for s in symbols]
        return ids

    def tokenize(self, text: str) -> list[int]:
        """Text -> BPE ids, without start and end tokens. Literal `<|startoftext|>`/`<|endoftext|>` in the raw
        text become their ids, as in transformers; everything between is cleaned, split and BPE-encoded."""
        ids = []
        for n, piece in enumerate(SPECIALS.split(text)):
            if n % 2:
                ids.append(self.encoder[piece])
            else:
                ids += [i for word in split(clean(piece)) for i in self.bpe(word)]
        return ids

    def encode(self, texts: list[str] | str) -> tuple[torch.Tensor, int]:
        """Return (ids LongTensor [B, context_length], number of prompts truncated).

        Each row is start, the text's first context_length - 2 ids, end, then end again as padding (SD 1.5's
        tokenizer pads with its end token, not 0). A prompt with more text ids than fit is truncated, keeping
        the end token; the count tells how many were (the paper truncates findings longer than 76 tokens).
        """
        texts = [texts] if isinstance(texts, str) else texts
        room = self.context_length - 2
        rows, truncated = [], 0
        for text in texts:
            ids = self.tokenize(text)
            truncated += len(ids) > room
            ids = [self.start_id, *ids[:room], self.end_id]
            rows.append(ids + [self.end_id] * (self.context_length - len(ids)))
        return torch.tensor(rows, dtype=torch.long).reshape(len(rows), self.context_length), truncated

    def __call__(self, texts: list[str] | str) -> torch.Tensor:
        return self.encode(texts)[0]

    def decode(self, ids: list[int] | torch.Tensor) -> str:
        """Ids -> text (cleaned: lowercased, one space between words), skipping start and end tokens."""
        ids = ids.tolist() if isinstance(ids, torch.Tensor) else ids
        symbols = "".join(self.decoder[i] for i in ids if i not in (self.start_id, self.end_id))
        raw = bytes(self.byte_decoder[c] for c in symbols).decode("utf-8", errors="replace")
        return " ".join(raw.replace(END_OF_WORD, " ").split())


def read_bpe_gz(path: str | os.PathLike) -> tuple[dict[str, int], list[tuple[str, str]]]:
    """Vocabulary and merges from OpenAI's `bpe_simple_vocab_16e6.txt.gz`: a version line, then merges.

    CLIP uses the first 48,894 merges; its ids are the 256 byte symbols, the same with `</w>`, the merges'
    results in order, then <|startoftext|> and <|endoftext|>: 49,408 in all.
    """
    if not Path(path).is_file():
        raise FileNotFoundError(f"{path}: no such file (CLIP's BPE merges, bpe_simple_vocab_16e6.txt.gz)")
    try:
        with gzip.open(path, "rt", encoding="utf-8") as f:
            lines = f.read().split("\n")[1:N_MERGES + 1]
    except (OSError, EOFError, UnicodeDecodeError) as err:
        raise ValueError(f"{path}: not a readable gzip text file of BPE merges ({err})") from None
    merges = parse_merges(lines, path, first_line=2)
    if len(merges) != N_MERGES:
        raise ValueError(f"{path}: has {len(merges)} merges, CLIP's vocabulary needs {N_MERGES}")
    symbols = list(bytes_to_unicode().values())
    symbols += [s + END_OF_WORD for s in symbols] + ["".join(m) for m in merges] + [START, END]
    return {s: i for i, s in enumerate(symbols)}, merges


def parse_merges(lines: list[str], source, first_line: int) -> list[tuple[str, str]]:
    merges = []
    for n, line in enumerate(lines, first_line):
        if not line.strip():
            continue
        parts = line.split()
        if len(parts) != 2:
            raise ValueError(f"{source}: line {n}: a merge must be two symbols separated by a space, got {line!r}")
        merges.append((parts[0], parts[1]))
    return merges


def read_vocab_files(vocab_path: Path, merges_path: Path) -> tuple[dict[str, int], list[tuple[str, str]]]:
    """Vocabulary and merges from a diffusers/transformers `vocab.json` and `merges.txt`."""
    for p in (vocab_path, merges_path):
        if not p.is_file():
            raise FileNotFoundError(f"{p}: missing (a CLIP tokenizer needs vocab.json and merges.txt)")
    vocab = read_json(vocab_path)
    if not (isinstance(vocab, dict) and all(isinstance(i, int) and not isinstance(i, bool) for i in vocab.values())):
        raise ValueError(f"{vocab_path}: must be a JSON object mapping BPE symbols to integer ids")
    if len(set(vocab.values())) != len(vocab):
        raise ValueError(f"{vocab_path}: two symbols share an id")
    lines = merges_path.read_text(encoding="utf-8").split("\n")
    skip = 1 if lines and lines[0].startswith("#version") else 0
    return vocab, parse_merges(lines[skip:], merges_path, first_line=1 + skip)


def save_tokenizer(tokenizer: Tokenizer, folder: str | os.PathLike, merges: list[tuple[str, str]]) -> None:
    """Write `vocab.json` and `merges.txt` (with its `#version` line) as diffusers' `tokenizer/` folder holds them,
    plus the `tokenizer_config.json` transformers' CLIPTokenizer reads."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    files = {"vocab.json": json.dumps(tokenizer.encoder, ensure_ascii=False),
             "merges.txt": "#version: 0.2\n" + "".join(f"{a} {b}\n" for a, b in merges),
             "tokenizer_config.json": json.dumps({"tokenizer_class": "CLIPTokenizer", "model_max_length": 77,
                                                  "bos_token": START, "eos_token": END, "pad_token": END,
                                                  "unk_token": END, "do_lower_case": True})}
    for name, text in files.items():
        with atomic_write(folder / name, "w") as f:
            f.write(text)


def load_tokenizer(path: str | os.PathLike) -> Tokenizer:
    """Load CLIP's tokenizer from a diffusers folder, its `tokenizer/` folder (vocab.json + merges.txt) or
    OpenAI's `bpe_simple_vocab_16e6.txt.gz`."""
    path = Path(path)
    if path.is_file() and path.name.endswith(".gz"):
        return Tokenizer(*read_bpe_gz(path), source=str(path))
    if not path.is_dir():
        raise FileNotFoundError(f"{path}: expected a folder with vocab.json and merges.txt (or its 'tokenizer/' "
                                "folder) or a bpe_simple_vocab_16e6.txt.gz file")
    folder = path / "tokenizer" if (path / "tokenizer").is_dir() else path
    return Tokenizer(*read_vocab_files(folder / "vocab.json", folder / "merges.txt"), source=str(folder))

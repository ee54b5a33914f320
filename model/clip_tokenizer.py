"""CLIP's byte-level BPE tokenizer, as Stable Diffusion 1.5 uses it (its text encoder is clip_text.py).

Text is cleaned and lower-cased, split into words (`split`), each word's UTF-8 bytes mapped to printable
characters (`bytes_to_unicode`) and merged pair by pair in the order of CLIP's merges (`merge_pair`); the ids
are framed by the start and end tokens and padded to 77. Proven equal to transformers' `CLIPTokenizer` in
tests/test_clip_text.py.
"""
from __future__ import annotations

import gzip
import json
import os
import re
import unicodedata
from functools import lru_cache
from pathlib import Path

import torch

from model.weights import atomic_write, read_json

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

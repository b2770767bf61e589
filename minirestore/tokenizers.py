"""Tokenizers for the text encoders, from the Hub repos' own files.

T5 / umT5: the repo's sentencepiece model (`spiece.model`), EOS appended, padded with id 0.
CLIP: byte-level BPE from `vocab.json` + `merges.txt`, written here; <|startoftext|> ... <|endoftext|>, padded
with <|endoftext|> to 77 tokens. Both return what the pipelines feed the encoders: padding="max_length",
truncation=True (architectures.md 2.8, 3.7).
"""
import functools
import html
import json
import re
import sys
import unicodedata
from pathlib import Path

import torch

from . import UserError


def _need(path, what):
    path = Path(path)
    if not path.is_file():
        raise UserError(f"{path}: no such file; pass the tokenizer folder of the model repo ({what})")
    return path


def _pad(rows, length, pad_id):
    """Lists of ids -> input_ids [B, length] long (right-padded with pad_id), attention_mask [B, length]."""
    ids = torch.full((len(rows), length), pad_id, dtype=torch.long)
    mask = torch.zeros((len(rows), length), dtype=torch.long)
    for i, row in enumerate(rows):
        ids[i, :len(row)] = torch.tensor(row, dtype=torch.long)
        mask[i, :len(row)] = 1
    return ids, mask


# ---------------------------------------------------------------------------------------------
# T5 / umT5 (sentencepiece)
# ---------------------------------------------------------------------------------------------

class T5Tokenizer:
    """tokenizer(texts) -> (input_ids [B, max_length], attention_mask [B, max_length]).

    sentencepiece applies the model's own normaliser (NFKC, whitespace cleanup), as the Hub's
    T5TokenizerFast does. Special-token strings typed in a prompt ("</s>", "<extra_id_0>") are encoded as
    plain text here, unlike transformers.
    """

    def __init__(self, model_file, max_length=512):
        import sentencepiece

        self.sp = sentencepiece.SentencePieceProcessor(model_file=str(_need(model_file, "spiece.model")))
        self.max_length = max_length
        self.eos_id = self.sp.eos_id()   # 1 (</s>)
        self.pad_id = max(self.sp.pad_id(), 0)  # 0 (<pad>)

    def encode(self, text, max_length=None):
        """Text -> ids ending in EOS, truncated so that EOS stays within max_length."""
        return self.sp.encode(text)[: (max_length or self.max_length) - 1] + [self.eos_id]

    def __call__(self, texts, max_length=None):
        texts = [texts] if isinstance(texts, str) else list(texts)
        length = max_length or self.max_length
        return _pad([self.encode(t, length) for t in texts], length, self.pad_id)


def wan_clean(text):
    """Wan's prompt cleanup before umT5: ftfy (if installed), double HTML unescape, collapse whitespace."""
    try:
        import ftfy

        text = ftfy.fix_text(text)
    except ImportError:
        pass
    text = html.unescape(html.unescape(text)).strip()
    return re.sub(r"\s+", " ", text).strip()


# ---------------------------------------------------------------------------------------------
# CLIP (byte-level BPE)
# ---------------------------------------------------------------------------------------------

@functools.cache
def bytes_to_unicode():
    """GPT-2 / CLIP byte -> printable character table, so BPE works on text without whitespace or control bytes."""
    keep = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    chars, n = keep[:], 0
    for b in range(256):
        if b not in keep:
            keep.append(b)
            chars.append(256 + n)
            n += 1
    return {b: chr(c) for b, c in zip(keep, chars)}


@functools.cache
def _unicode_class(major):
    """A regex character class body for a Unicode major category ("L" letters, "N" numbers): Python's `re`
    has no \\p{L}; built once (about 0.4 s) from unicodedata."""
    parts, start = [], None
    for cp in range(sys.maxunicode + 2):
        inside = cp <= sys.maxunicode and unicodedata.category(chr(cp))[0] == major
        if inside and start is None:
            start = cp
        elif not inside and start is not None:
            a, b = re.escape(chr(start)), re.escape(chr(cp - 1))
            parts.append(a if cp - 1 == start else f"{a}-{b}")
            start = None
    return "".join(parts)


class CLIPTokenizer:
    """tokenizer(texts) -> (input_ids [B, 77], attention_mask [B, 77]): BOS, BPE tokens, EOS, EOS padding."""

    SPECIAL = ("<|startoftext|>", "<|endoftext|>")

    def __init__(self, vocab_file, merges_file, max_length=77):
        self.vocab = json.loads(_need(vocab_file, "vocab.json").read_text(encoding="utf-8"))
        lines = _need(merges_file, "merges.txt").read_text(encoding="utf-8").splitlines()
        merges = [tuple(line.split()) for line in lines if line.strip() and not line.startswith("#version")]
        self.ranks = {pair: i for i, pair in enumerate(merges)}  # lower rank merges first
        missing = [t for t in self.SPECIAL if t not in self.vocab]
        if missing:
            raise UserError(f"{vocab_file} has no {', '.join(missing)}: not a CLIP vocabulary")
        self.bos_id, self.eos_id = (self.vocab[t] for t in self.SPECIAL)  # 49406, 49407 for CLIP-L
        self.pad_id = self.unk_id = self.eos_id  # <|endoftext|> pads and stands in for unknown symbols
        self.max_length = max_length
        L, N = _unicode_class("L"), _unicode_class("N")
        # The CLIP pre-tokenizer: specials, English contractions, letter runs, single digits, other symbol runs.
        self.pattern = re.compile(
            rf"<\|startoftext\|>|<\|endoftext\|>|'s|'t|'re|'ve|'m|'ll|'d|[{L}]+|[{N}]|[^\s{L}{N}]+", re.IGNORECASE)
        self._cache = {}

    def bpe(self, word):
        """A pre-token (already byte-mapped) -> BPE symbols; the last character carries the </w> end of word."""
        if word in self._cache:
            return self._cache[word]
        symbols = list(word[:-1]) + [word[-1] + "</w>"]
        while len(symbols) > 1:
            pair = min(zip(symbols, symbols[1:]), key=lambda p: self.ranks.get(p, float("inf")))
            if pair not in self.ranks:
                break
            merged, i = [], 0
            while i < len(symbols):  # merge every occurrence of the best pair, left to right
                if i + 1 < len(symbols) and (symbols[i], symbols[i + 1]) == pair:
                    merged.append(symbols[i] + symbols[i + 1])
                    i += 2
                else:
                    merged.append(symbols[i])
                    i += 1
            symbols = merged
        self._cache[word] = symbols
        return symbols

    def encode(self, text):
        """Text -> ids without BOS/EOS, normalised as transformers does: NFC, whitespace runs -> " ", lower case."""
        text = re.sub(r"\s+", " ", unicodedata.normalize("NFC", text)).lower()
        byte_map = bytes_to_unicode()
        ids = []
        for word in self.pattern.findall(text):
            if word in self.SPECIAL:
                ids.append(self.vocab[word])
                continue
            mapped = "".join(byte_map[b] for b in word.encode("utf-8"))
            ids.extend(self.vocab.get(s, self.unk_id) for s in self.bpe(mapped))
        return ids

    def __call__(self, texts, max_length=None):
        texts = [texts] if isinstance(texts, str) else list(texts)
        length = max_length or self.max_length
        return _pad([[self.bos_id] + self.encode(t)[: length - 2] + [self.eos_id] for t in texts],
                    length, self.pad_id)

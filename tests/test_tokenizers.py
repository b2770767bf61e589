"""Tokenizer parity with transformers' T5TokenizerFast and CLIPTokenizer on tiny tokenizer files made here.

The T5 side trains a tiny sentencepiece model (pad 0, eos 1, unk 2 like T5); the CLIP side learns a tiny
byte-level BPE (vocab.json + merges.txt with the `</w>` end-of-word convention and the two specials last).
"""
import collections
import io
import json

import pytest
import torch

from minirestore import hub
from minirestore.tokenizers import CLIPTokenizer, T5Tokenizer, bytes_to_unicode, wan_clean

transformers = pytest.importorskip("transformers", reason="the parity reference is transformers")

CORPUS = """A photo of a cat sitting on a red chair in the garden.
The quick brown fox jumps over the lazy dog near the river bank.
High quality image, sharp details, natural colours, no noise at all.
An astronaut riding a horse on the moon, cinematic lighting, 4k resolution.
Rain falls on the old city streets while people walk with umbrellas.
Snow covers the mountains and the small wooden house at dawn.
A blurry picture of a busy market with fruit, vegetables and fresh bread.
Low light photograph of a dark room with a single candle burning slowly.
Hazy morning over the lake; the boats are barely visible in the fog!
She said: "It's 12 o'clock, let's go," and they'd all left by 3pm.
Beautiful is better than ugly, and explicit is better than implicit.
Simple is better than complex; complex is better than complicated.
Readability counts, although practicality beats purity every time.
Errors should never pass silently unless explicitly silenced.
A portrait of an old fisherman with a grey beard, oil painting.
Children playing football in a sunny park during the summer holidays.
A bowl of soup with noodles, carrots, onions and green herbs.
The train arrived late because of the heavy storm last night.
Two dogs running on the beach, waves crashing, golden hour light.
A futuristic city skyline at night with neon signs and flying cars.""".splitlines()

PROMPTS = [
    "",
    "A photo of a cat",
    "an astronaut riding a horse on the moon, cinematic lighting, 4k",
    "  Leading and trailing   spaces\tand\ttabs \n newlines  ",
    "It's 12 o'clock; they'd said \"we'll go\" at 3pm!!",
    "UPPER case Words and MiXeD CaSe",
    "zebra xylophone quiz jigsaw",  # letters the corpus barely has
    "café naïve ünïcödé 日本語 ½ ² — “quotes”",
    "a blurry, hazy, rainy, snowy photograph taken in low light " * 12,  # longer than the max length
]


def make_spm(folder):
    """Train a tiny sentencepiece unigram model with T5's special ids; write folder/spiece.model."""
    spm = pytest.importorskip("sentencepiece")
    folder.mkdir(parents=True, exist_ok=True)
    model = io.BytesIO()
    spm.SentencePieceTrainer.train(sentence_iterator=iter(CORPUS), model_writer=model, vocab_size=200,
                                   model_type="unigram", pad_id=0, eos_id=1, unk_id=2, bos_id=-1,
                                   character_coverage=1.0, num_threads=1, minloglevel=2)
    (folder / "spiece.model").write_bytes(model.getvalue())
    return folder


def make_clip_bpe(folder, num_merges=150):
    """Learn a tiny byte-level BPE the way CLIP's vocabulary is laid out: 256 byte symbols, the same with
    `</w>`, the merged symbols in merge order, then <|startoftext|> and <|endoftext|>."""
    folder.mkdir(parents=True, exist_ok=True)
    byte_map = bytes_to_unicode()
    words = collections.Counter()
    for line in CORPUS:
        for w in line.lower().split():
            mapped = "".join(byte_map[b] for b in w.encode())
            words[tuple(mapped[:-1]) + (mapped[-1] + "</w>",)] += 1
    merges = []
    for _ in range(num_merges):
        pairs = collections.Counter()
        for word, n in words.items():
            for pair in zip(word, word[1:]):
                pairs[pair] += n
        if not pairs:
            break
        best = max(pairs, key=lambda p: (pairs[p], p))
        merges.append(best)
        new = collections.Counter()
        for word, n in words.items():
            out, i = [], 0
            while i < len(word):
                if i + 1 < len(word) and (word[i], word[i + 1]) == best:
                    out.append(word[i] + word[i + 1])
                    i += 2
                else:
                    out.append(word[i])
                    i += 1
            new[tuple(out)] += n
        words = new
    symbols = list(byte_map.values())
    vocab = symbols + [s + "</w>" for s in symbols] + ["".join(m) for m in merges]
    vocab += ["<|startoftext|>", "<|endoftext|>"]
    (folder / "vocab.json").write_text(json.dumps({s: i for i, s in enumerate(vocab)}, ensure_ascii=False))
    (folder / "merges.txt").write_text("#version: 0.2\n" + "\n".join(" ".join(m) for m in merges) + "\n")
    return folder


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    root = tmp_path_factory.mktemp("tokenizers")
    return make_spm(root / "tokenizer_2"), make_clip_bpe(root / "tokenizer")


@pytest.mark.parametrize("max_length", [16, 512])
def test_t5_tokenizer_parity(files, max_length):
    ref = transformers.T5TokenizerFast.from_pretrained(files[0])
    ours = T5Tokenizer(files[0] / "spiece.model", max_length=max_length)
    expected = ref(PROMPTS, padding="max_length", max_length=max_length, truncation=True, return_tensors="pt")
    ids, mask = ours(PROMPTS)
    assert ids.shape == (len(PROMPTS), max_length)
    assert torch.equal(ids, expected.input_ids)
    assert torch.equal(mask, expected.attention_mask)
    assert ids[0, 0] == 1 and ids[0, 1:].eq(0).all()  # "" -> EOS, then pad 0


def test_clip_tokenizer_parity(files):
    ref = transformers.CLIPTokenizer.from_pretrained(files[1])
    ours = CLIPTokenizer(files[1] / "vocab.json", files[1] / "merges.txt")
    expected = ref(PROMPTS, padding="max_length", max_length=77, truncation=True, return_tensors="pt")
    ids, mask = ours(PROMPTS)
    assert ids.shape == (len(PROMPTS), 77)
    assert torch.equal(ids, expected.input_ids)
    assert torch.equal(mask, expected.attention_mask)
    vocab_size = len(json.loads((files[1] / "vocab.json").read_text()))
    assert ours.bos_id == vocab_size - 2 and ours.eos_id == vocab_size - 1  # like 49406, 49407
    assert ids[0, 0] == ours.bos_id and ids[0, 1:].eq(ours.eos_id).all()  # "" -> BOS, EOS, EOS padding
    # merges are used: a frequent word becomes fewer tokens than its letters
    assert len(ours.encode("the")) == 1 and len(ours.encode("photograph")) < len("photograph")


def test_loaders_find_the_repo_folders(files):
    root = files[0].parent  # laid out like the FLUX repo: tokenizer_2/ (T5) and tokenizer/ (CLIP)
    t5 = hub.load_t5_tokenizer(root, max_length=20)
    clip = hub.load_clip_tokenizer(root)
    assert t5("a cat")[0].shape == (1, 20) and clip("a cat")[0].shape == (1, 77)


def test_wan_clean():
    assert wan_clean("  a &amp;amp; b \n\t c  ") == "a & b c"
    assert wan_clean("") == ""

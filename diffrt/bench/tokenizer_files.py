"""A CLIP-format BPE tokenizer written locally (vocab.json + merges.txt), for checkpoints built without the Hub.

The real CLIP BPE files cannot be downloaded here, so presets and test fixtures train a small byte-level BPE on a
fixed corpus with CLIP's conventions (`</w>` end-of-word marker, `<|startoftext|>` / `<|endoftext|>` specials).
Tokenization cost is negligible next to the models, so a small vocabulary does not bias a benchmark.
"""
from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

from diffrt.package.files import write_text

CORPUS = (
    "a photo of a cat sitting on a red chair , high quality , a painting of an astronaut riding a horse on the moon "
    "the digit seven a handwritten number blurry low quality worst ugly deformed dog in the snow landscape mountain "
    "portrait of a woman with a hat city at night neon lights anthropomorphic capybara wearing a suit and working "
    "with a computer ! ? . 0 1 2 3 4 5 6 7 8 9"
)


def bytes_to_unicode() -> dict[int, str]:
    """CLIP's reversible byte -> printable-unicode table (the same one GPT-2 uses)."""
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1))
    printable += list(range(ord("®"), ord("ÿ") + 1))
    chars = printable[:]
    extra = 0
    for b in range(256):
        if b not in printable:
            printable.append(b)
            chars.append(256 + extra)
            extra += 1
    return dict(zip(printable, map(chr, chars)))


def _merge_pair(word: tuple[str, ...], best: tuple[str, str]) -> tuple[str, ...]:
    out, i = [], 0
    while i < len(word):
        if i + 1 < len(word) and (word[i], word[i + 1]) == best:
            out.append(word[i] + word[i + 1])
            i += 2
        else:
            out.append(word[i])
            i += 1
    return tuple(out)


def train_merges(words: list[str], num_merges: int) -> list[tuple[str, str]]:
    """Greedy BPE over the corpus words, with CLIP's end-of-word marker on the last symbol."""
    vocab = Counter(tuple(w[:-1]) + (w[-1] + "</w>",) for w in words)
    merges: list[tuple[str, str]] = []
    for _ in range(num_merges):
        pairs: Counter = Counter()
        for word, count in vocab.items():
            for pair in zip(word, word[1:]):
                pairs[pair] += count
        if not pairs:
            break
        best = max(pairs, key=lambda p: (pairs[p], p))
        merges.append(best)
        merged: Counter = Counter()
        for word, count in vocab.items():
            merged[_merge_pair(word, best)] += count
        vocab = merged
    return merges


def write_clip_tokenizer_files(folder: Path, num_merges: int = 200) -> tuple[Path, Path]:
    """Write a real CLIP-format vocab.json + merges.txt (byte-level BPE, `</w>` suffix, CLIP special tokens)."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    base = list(bytes_to_unicode().values())
    merges = train_merges(CORPUS.split(), num_merges)
    tokens = base + [c + "</w>" for c in base] + ["".join(m) for m in merges]
    tokens += ["<|startoftext|>", "<|endoftext|>"]
    vocab = {tok: i for i, tok in enumerate(dict.fromkeys(tokens))}
    vocab_file, merges_file = folder / "vocab.json", folder / "merges.txt"
    write_text(vocab_file, json.dumps(vocab, ensure_ascii=False))
    write_text(merges_file, "#version: 0.2\n" + "\n".join(f"{a} {b}" for a, b in merges) + "\n")
    return vocab_file, merges_file

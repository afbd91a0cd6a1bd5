"""A small CLIP tokenizer for the toy world: CLIP's own BPE restricted to the merges its captions use.

The toy transformer reads CLIP-style text encoders (SD3's layout), but a 49,408-row embedding
table per encoder would be most of the bundled model's size while the world's captions use a
few hundred words. BPE picks, at every step, the lowest-ranked applicable merge; keeping the
real merges that the world's words use, in their real order, therefore tokenises those words
exactly as CLIP does (a merge left out never won for any of them), and every other text still
tokenises, byte by byte, since all 512 base symbols are kept. Ids differ from CLIP's (the table
is renumbered); the folder is a plain ``CLIPTokenizer`` (``vocab.json``, ``merges.txt``).
"""

from __future__ import annotations

import gzip
import itertools
import re
from collections.abc import Iterable
from importlib import resources

from maskdiffusion.prompts import CLIP_CONTEXT, clip_text
from maskdiffusion.toyworld.world import CLASS_NAMES, COLOURS, PATTERNS, make_caption, make_scene, train_seed

EXTRA_WORDS = ("a", "an", "the", "and", "of", "on", "in", "with", "front", "photo", "picture", "scene", "background")
WORD = re.compile(r"[^\W\d_]+|\d|[^\s\w]+")  # CLIP's pre-tokenisation for letters, digits and punctuation


def _byte_alphabet() -> list[str]:
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    others = [b for b in range(256) if b not in set(printable)]
    return [chr(b) for b in printable] + [chr(256 + i) for i in range(len(others))]


def clip_merges() -> list[tuple[str, str]]:
    """CLIP's 48,894 merges in rank order (the package's bundled file)."""
    raw = resources.files("maskdiffusion").joinpath("assets", "bpe_simple_vocab_16e6.txt.gz").read_bytes()
    lines = gzip.decompress(raw).decode("utf-8").split("\n")[1 : 49152 - 256 - 2 + 1]
    return [tuple(line.split()) for line in lines]


def used_merges(word: str, ranks: dict[tuple[str, str], int]) -> list[tuple[str, str]]:
    """The merges BPE applies to one word (``</w>`` on its last symbol), in the order it applies them."""
    symbols = [*word[:-1], word[-1] + "</w>"]
    used = []
    while len(symbols) > 1:
        pairs = set(itertools.pairwise(symbols))
        best = min(pairs, key=lambda pair: ranks.get(pair, float("inf")))
        if best not in ranks:
            break
        used.append(best)
        merged, index = [], 0
        while index < len(symbols):
            if index + 1 < len(symbols) and (symbols[index], symbols[index + 1]) == best:
                merged.append(symbols[index] + symbols[index + 1])
                index += 2
            else:
                merged.append(symbols[index])
                index += 1
        symbols = merged
    return used


def caption_words(count: int = 5000) -> set[str]:
    """The words of ``count`` training captions, the class names and a few common words, lower-cased."""
    words = set(EXTRA_WORDS) | set(PATTERNS) | set(COLOURS)
    texts = [*CLASS_NAMES]
    for index in range(count):
        scene = make_scene(train_seed(index))
        texts.append(make_caption(scene.background, scene.objects, index, scene.background_colour, 1.0))
    for text in texts:
        words.update(WORD.findall(clip_text(text).lower()))
    return words


def toy_clip_tokenizer(words: Iterable[str] | None = None):
    """A ``CLIPTokenizer`` with the 512 base symbols, the merges ``words`` use and CLIP's two specials."""
    from transformers import CLIPTokenizer

    merges = clip_merges()
    ranks = {pair: rank for rank, pair in enumerate(merges)}
    needed = set()
    for word in words if words is not None else caption_words():
        needed.update(used_merges(word, ranks))
    kept = [pair for pair in merges if pair in needed]
    alphabet = _byte_alphabet()
    vocab = alphabet + [a + "</w>" for a in alphabet] + ["".join(pair) for pair in kept]
    vocab += ["<|startoftext|>", "<|endoftext|>"]
    return CLIPTokenizer(
        vocab={token: i for i, token in enumerate(dict.fromkeys(vocab))},
        merges=kept,
        model_max_length=CLIP_CONTEXT,
    )

"""Class vocabularies -> prompts, with the exact token span of every class name.

The reference code joins the names with " and " and assumes every name is one CLIP
token (``maps[1:-1:2]``), which breaks on "traffic light" and silently overflows the
77-token context past ~37 classes. Here every name is tokenised on its own and the
prompt's ids are the concatenation of the pieces, so each class knows exactly which
positions are its own, and vocabularies that do not fit one context are packed into
several prompts.
"""

from __future__ import annotations

import gzip
from collections.abc import Sequence
from dataclasses import dataclass
from functools import lru_cache
from importlib import resources

import torch

CLIP_CONTEXT = 77
_BPE_FILE = "bpe_simple_vocab_16e6.txt.gz"  # CLIP's BPE merges, as shipped by OpenAI's CLIP


class VocabularyError(ValueError):
    """A class list that cannot be segmented (empty, blank or duplicate names, too long)."""


@dataclass(frozen=True)
class ClassName:
    """One class: a display name and the words that describe it (synonyms, averaged)."""

    name: str
    synonyms: tuple[str, ...]


@dataclass(frozen=True)
class TokenSpan:
    """Positions ``start:stop`` of one class word in prompt ``prompt``."""

    prompt: int
    start: int
    stop: int


@dataclass(frozen=True)
class PromptBatch:
    """Token ids of the prompts of a vocabulary and, per class, the spans of its words.

    ``input_ids`` is ``(P, context)`` int64; ``spans[c]`` lists one span per synonym of
    class ``c``.
    """

    input_ids: torch.Tensor
    spans: tuple[tuple[TokenSpan, ...], ...]
    texts: tuple[str, ...]

    @property
    def num_prompts(self) -> int:
        return self.input_ids.shape[0]

    def token_weights(self) -> torch.Tensor:
        """``(C, P, context)`` float32 weights that average each class's tokens.

        A class map is the weighted sum of its token maps: synonyms count equally and
        the tokens of one word share that word's weight equally.
        """
        weights = torch.zeros(len(self.spans), *self.input_ids.shape)
        for c, spans in enumerate(self.spans):
            for span in spans:
                weights[c, span.prompt, span.start : span.stop] += 1.0 / (len(spans) * (span.stop - span.start))
        return weights


def parse_classes(classes: str | Sequence[str | Sequence[str] | ClassName]) -> list[ClassName]:
    """Normalise a user's class list; raise :class:`VocabularyError` on bad input.

    Accepts ``"road, traffic light, person|pedestrian"`` (comma-separated, ``|`` between
    synonyms), a list of names, a list whose items are lists of synonyms, or a list of
    :class:`ClassName`.
    """
    if isinstance(classes, str):
        items: list[str | Sequence[str]] = classes.split(",")
    else:
        items = list(classes)
    parsed: list[ClassName] = []
    for position, item in enumerate(items, start=1):
        if isinstance(item, ClassName):
            item = item.synonyms
        words = item.split("|") if isinstance(item, str) else list(item)
        words = [" ".join(str(word).split()) for word in words]
        if not words or any(not word for word in words):
            raise VocabularyError(
                f"class #{position} ({item!r}) is blank or has a blank synonym: "
                "give every class at least one word, e.g. 'road, sky, person|pedestrian'"
            )
        parsed.append(ClassName(name=words[0], synonyms=tuple(words)))
    if not parsed:
        raise VocabularyError("the class list is empty: give at least one class name, e.g. 'road, sky'")
    seen: dict[str, str] = {}
    for cls in parsed:
        for word in cls.synonyms:
            key = word.casefold()
            if key in seen:
                raise VocabularyError(
                    f"class word {word!r} appears twice (also in {seen[key]!r}): each word may "
                    "name one class only; merge them with '|' if they are synonyms"
                )
            seen[key] = cls.name
    return parsed


def read_class_file(path: str) -> list[ClassName]:
    """One class per line, ``a|b`` for synonyms; blank lines and ``#`` comments skipped."""
    try:
        with open(path, encoding="utf-8") as handle:
            lines = [line.split("#", 1)[0].strip() for line in handle]
    except OSError as error:
        raise VocabularyError(f"cannot read class file {path!r}: {error.strerror}") from None
    return parse_classes([line for line in lines if line])


def _byte_alphabet() -> list[str]:
    """The printable stand-ins CLIP's BPE uses for the 256 byte values, in vocab order."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    others = [b for b in range(256) if b not in set(printable)]
    return [chr(b) for b in printable] + [chr(256 + i) for i in range(len(others))]


@lru_cache(maxsize=1)
def clip_tokenizer():
    """The real CLIP BPE tokenizer (49,408 tokens, context 77), built from the bundled merges.

    Used by the offline models the project builds; real Stable Diffusion folders bring
    their own tokenizer.
    """
    from transformers import CLIPTokenizer

    raw = resources.files("maskdiffusion").joinpath("assets").joinpath(_BPE_FILE).read_bytes()
    merges = gzip.decompress(raw).decode("utf-8").split("\n")[1 : 49152 - 256 - 2 + 1]
    alphabet = _byte_alphabet()
    vocab = alphabet + [a + "</w>" for a in alphabet] + ["".join(m.split()) for m in merges]
    vocab += ["<|startoftext|>", "<|endoftext|>"]
    return CLIPTokenizer(
        vocab={token: i for i, token in enumerate(vocab)},
        merges=[tuple(m.split()) for m in merges],
        model_max_length=CLIP_CONTEXT,
    )


def _word_ids(tokenizer, text: str) -> list[int]:
    return list(tokenizer(text, add_special_tokens=False).input_ids)


def build_prompts(tokenizer, classes: Sequence[ClassName], separator: str = " and ") -> PromptBatch:
    """Pack class words into as few prompts as the context allows.

    Each prompt is ``BOS w1 sep w2 sep ... EOS pad...``; a class's synonyms stay in one
    prompt. Raises :class:`VocabularyError` if one class alone does not fit.
    """
    context = min(int(tokenizer.model_max_length), 10_000)
    capacity = context - 2
    sep_ids = _word_ids(tokenizer, separator) if separator.strip() else []
    bos, eos = tokenizer.bos_token_id, tokenizer.eos_token_id
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else eos

    prompts: list[list[int]] = [[]]
    words_of_prompt: list[list[str]] = [[]]
    spans: list[tuple[TokenSpan, ...]] = []
    for cls in classes:
        pieces = [_word_ids(tokenizer, word) for word in cls.synonyms]
        if any(not piece for piece in pieces):
            raise VocabularyError(f"class {cls.name!r} has a word that the tokenizer turns into no tokens")
        need = sum(len(p) for p in pieces) + len(sep_ids) * (len(pieces) - 1)
        if need > capacity:
            raise VocabularyError(
                f"class {cls.name!r} needs {need} tokens but a prompt holds {capacity}: shorten it "
                "or drop some of its synonyms"
            )
        current = prompts[-1]
        if current and len(current) + len(sep_ids) + need > capacity:
            prompts.append([])
            words_of_prompt.append([])
            current = prompts[-1]
        class_spans = []
        for piece, word in zip(pieces, cls.synonyms, strict=True):
            if current:
                current.extend(sep_ids)
            start = 1 + len(current)  # +1 for BOS
            current.extend(piece)
            class_spans.append(TokenSpan(len(prompts) - 1, start, start + len(piece)))
            words_of_prompt[-1].append(word)
        spans.append(tuple(class_spans))

    ids = torch.full((len(prompts), context), pad, dtype=torch.long)
    for row, body in enumerate(prompts):
        tokens = [bos, *body, eos]
        ids[row, : len(tokens)] = torch.tensor(tokens)
    texts = tuple(separator.join(words) for words in words_of_prompt)
    return PromptBatch(input_ids=ids, spans=tuple(spans), texts=texts)

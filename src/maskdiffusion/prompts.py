"""Class vocabularies -> prompts, with the exact token span of every class name.

The reference code joins the names with " and " and assumes every name is one CLIP
token (``maps[1:-1:2]``), which breaks on "traffic light" and silently overflows the
77-token context past ~37 classes. Here every name is tokenised on its own and the
prompt's ids are the concatenation of the pieces, so each class knows exactly which
positions are its own, and vocabularies that do not fit one context are packed into
several prompts.

Class words are tokenised as CLIP's training tokenizer saw its captions (see
:func:`clip_text`); the names shown to the user stay as typed.
"""

from __future__ import annotations

import contextlib
import gzip
import html
import os
from collections.abc import Sequence
from dataclasses import dataclass
from functools import lru_cache
from importlib import resources

import ftfy
import torch

CLIP_CONTEXT = 77
_BPE_FILE = "bpe_simple_vocab_16e6.txt.gz"  # CLIP's BPE merges, as shipped by OpenAI's CLIP
MAX_CLASSES = 4096  # more than any benchmark vocabulary (ADE20K-full: 3,688); bounds memory and work
MAX_WORD_CHARS = 1000  # far past what fits the 75 tokens of a prompt
MAX_CLASS_FILE_BYTES = 1 << 20  # 1 MiB: thousands of names, not a file read by mistake
QUOTE_CHARS = 60  # user text quoted in a message is cut after this many characters


class VocabularyError(ValueError):
    """A class list that cannot be segmented (empty, blank or duplicate names, too long)."""


def shorten(value: object, limit: int = QUOTE_CHARS) -> str:
    """User text (or any value's ``repr``) for a message, cut after ``limit`` characters.

    A 10,000-character class name stays readable: ``'xxxx…'… (10,000 characters)``.
    """
    if not isinstance(value, str):
        shown = repr(value)
        return shown if len(shown) <= limit else f"{shown[:limit]}… ({len(shown):,} characters)"
    if len(value) <= limit:
        return repr(value)
    return f"{value[:limit]!r}… ({len(value):,} characters)"


def clip_text(text: str) -> str:
    """``text`` as CLIP's tokenizer prepared captions before BPE during training.

    ftfy repairs mojibake, ligatures (ﬁ), full-width letters and curly quotes; HTML
    entities are unescaped twice ("AT&amp;amp;T" -> "AT&T"); whitespace runs become one
    space. Lower-casing is left to the tokenizer. transformers' CLIPTokenizer (v5, and
    the fast one of v4) does only NFC, whitespace and lower-casing, so without this
    "AT&amp;T" or "ﬁsh" get ids CLIP never saw; v4's slow tokenizer runs ftfy itself,
    which is harmless after this (fixed text stays fixed).
    """
    text = html.unescape(html.unescape(ftfy.fix_text(text)))
    return " ".join(text.split())


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

    def token_weights(self, words: str = "mean") -> torch.Tensor:
        """``(C, P, context)`` float32 weights of each class's tokens.

        A class map is the weighted sum of its token maps; synonyms count equally. A
        word's map is the mean of its tokens' maps (``words="mean"``, the shape of the
        word's attention) or their sum (``"sum"``: the probability mass the word gets, so
        a two-token word is not halved against one-token words).
        """
        if words not in ("mean", "sum"):
            raise ValueError(f"words must be 'mean' or 'sum', got {words!r}")
        weights = torch.zeros(len(self.spans), *self.input_ids.shape)
        for c, spans in enumerate(self.spans):
            for span in spans:
                tokens = span.stop - span.start if words == "mean" else 1
                weights[c, span.prompt, span.start : span.stop] += 1.0 / (len(spans) * tokens)
        return weights


def _class_words(item: object, position: int) -> list[str]:
    """The words of one class item (a name, ``"a|b"``, a list of synonyms or a :class:`ClassName`)."""
    if isinstance(item, ClassName):
        item = item.synonyms
    if isinstance(item, str):
        words: list[object] = item.split("|")
    elif isinstance(item, Sequence) and not isinstance(item, (bytes, bytearray)):
        words = list(item)
    else:
        raise VocabularyError(
            f"class #{position} is a {type(item).__name__}, not a name: give names as text, e.g. 'road, sky'"
        )
    cleaned = []
    for word in words:
        if not isinstance(word, str):
            raise VocabularyError(
                f"class #{position} has a synonym that is a {type(word).__name__}, not text: give words as text"
            )
        if len(word) > MAX_WORD_CHARS:
            raise VocabularyError(
                f"class #{position} ({shorten(word)}) is longer than {MAX_WORD_CHARS:,} characters: "
                "a class is named by a few words"
            )
        try:
            word.encode("utf-8")
        except UnicodeEncodeError:
            raise VocabularyError(
                f"class #{position} ({shorten(word)}) is not valid Unicode text (it holds a lone surrogate): "
                "decode the text properly before passing it"
            ) from None
        cleaned.append(" ".join(word.split()))
    if not cleaned or any(not word for word in cleaned):
        raise VocabularyError(
            f"class #{position} ({shorten(item if isinstance(item, str) else '|'.join(cleaned))}) is blank or has "
            "a blank synonym: give every class at least one word, e.g. 'road, sky, person|pedestrian'"
        )
    return cleaned


def parse_classes(classes: str | Sequence[str | Sequence[str] | ClassName]) -> list[ClassName]:
    """Normalise a user's class list; raise :class:`VocabularyError` on bad input.

    Accepts ``"road, traffic light, person|pedestrian"`` (comma-separated, ``|`` between
    synonyms), a list of names, a list whose items are lists of synonyms, or a list of
    :class:`ClassName`. At most :data:`MAX_CLASSES` classes. Words that CLIP would read
    as the same text (:func:`clip_text`, any case) may name one class only.
    """
    if isinstance(classes, str):
        items: list[object] = classes.split(",")
    elif isinstance(classes, Sequence) and not isinstance(classes, (bytes, bytearray)):
        items = list(classes)
    else:
        raise VocabularyError(
            f"classes must be text like 'road, sky' or a list of names, not a {type(classes).__name__}"
        )
    if len(items) > MAX_CLASSES:
        raise VocabularyError(f"{len(items):,} classes given; at most {MAX_CLASSES:,} can be segmented at once")
    parsed: list[ClassName] = []
    for position, item in enumerate(items, start=1):
        words = _class_words(item, position)
        parsed.append(ClassName(name=words[0], synonyms=tuple(words)))
    if not parsed:
        raise VocabularyError("the class list is empty: give at least one class name, e.g. 'road, sky'")
    seen: dict[str, str] = {}
    for cls in parsed:
        for word in cls.synonyms:
            key = clip_text(word).casefold()
            if key in seen:
                raise VocabularyError(
                    f"class word {shorten(word)} appears twice (also in {shorten(seen[key])}): each word may "
                    "name one class only; merge them with '|' if they are synonyms"
                )
            seen[key] = cls.name
    return parsed


def background_classes(classes: Sequence[ClassName], words: Sequence[str]) -> list[ClassName]:
    """A preset's background ``words`` as one-word classes, leaving out any word that already names one
    of ``classes`` (or repeats, as CLIP reads text, any case): a class asked for is never background."""
    taken = {clip_text(word).casefold() for cls in classes for word in cls.synonyms}
    extra = []
    for word in words:
        key = clip_text(word).casefold()
        if key not in taken:
            taken.add(key)
            extra.append(ClassName(name=word.strip(), synonyms=(word.strip(),)))
    return extra


def read_small_text(path: str | os.PathLike, *, what: str, limit: int, hint: str, error: type[ValueError]) -> str:
    """The UTF-8 text of a file that must be small, read no further than ``limit`` bytes.

    A missing or unreadable file, one larger than ``limit``, or one that is not UTF-8 text
    (binary, UTF-16, Latin-1) raises ``error`` naming ``what``, the whole path, and ``hint``
    (what the file must be). A byte-order mark is allowed.
    """
    name = f"{what} {str(path)!r}"  # the whole path: the file's name is at its end
    try:
        with open(path, "rb") as handle:
            data = handle.read(limit + 1)
    except OSError as failure:
        raise error(f"cannot read {name}: {failure.strerror or failure}") from None
    if len(data) > limit:
        raise error(f"{name} is larger than {limit / 2**20:g} MiB: {hint}")
    if b"\0" not in data:  # NUL bytes: a binary file or UTF-16, never text we read
        with contextlib.suppress(UnicodeDecodeError):
            return data.decode("utf-8-sig")
    raise error(f"{name} is not UTF-8 text (is it a binary file?): {hint}")


def read_class_file(path: str) -> list[ClassName]:
    """One class per line, ``a|b`` for synonyms; blank lines and ``#`` comments skipped.

    The file must be UTF-8 text (a byte-order mark is allowed) of at most
    :data:`MAX_CLASS_FILE_BYTES`; anything else is refused naming the file.
    """
    text = read_small_text(
        path,
        what="class file",
        limit=MAX_CLASS_FILE_BYTES,
        hint=f"it must be a UTF-8 text file with one class per line (at most {MAX_CLASSES:,} classes)",
        error=VocabularyError,
    )
    lines = [line.split("#", 1)[0].strip() for line in text.splitlines()]
    try:
        return parse_classes([line for line in lines if line])
    except VocabularyError as error:
        raise VocabularyError(f"class file {str(path)!r}: {error}") from None


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


def _special_literals(tokenizer) -> list[str]:
    """Special tokens of ``tokenizer`` that a text could spell out (``<|endoftext|>``, ...).

    Single characters are left out: SD 2.x pads with ``"!"``, an ordinary character.
    """
    tokens = set(getattr(tokenizer, "all_special_tokens", []))
    for added in getattr(tokenizer, "added_tokens_decoder", {}).values():
        if getattr(added, "special", False):
            tokens.add(str(getattr(added, "content", added)))
    return sorted(token for token in tokens if len(token) > 1)


def _tokenised(tokenizer, text: str, what: str, specials: Sequence[str]) -> tuple[str, list[int]]:
    """``text`` as CLIP saw it (:func:`clip_text`) and its ids; ``what`` names it in errors."""
    text = clip_text(text)
    for token in specials:
        if token in text:
            raise VocabularyError(
                f"{what} contains the special token {token!r}, which the tokenizer would turn into a control "
                "token: remove it"
            )
    return text, list(tokenizer(text, add_special_tokens=False).input_ids) if text else []


def build_prompts(
    tokenizer, classes: Sequence[ClassName], separator: str = " and ", length: int | None = None
) -> PromptBatch:
    """Pack class words into as few prompts as the context allows (one tokenizer; see :func:`pack_prompts`)."""
    return pack_prompts([tokenizer], classes, separator, [length])[0]


def pack_prompts(
    tokenizers: Sequence[object],
    classes: Sequence[ClassName],
    separator: str = " and ",
    lengths: Sequence[int | None] | None = None,
) -> list[PromptBatch]:
    """Pack class words into as few prompts as every tokenizer's context allows, the same classes in
    the same prompts for all of them: one :class:`PromptBatch` per tokenizer.

    Each prompt is ``[BOS] w1 sep w2 sep ... EOS pad...`` in each tokenizer's own ids (CLIP has a
    BOS, T5 none); a class's synonyms stay in one prompt. ``lengths``: ids per prompt for each
    tokenizer (``None``: its ``model_max_length``, e.g. CLIP's 77; T5 models read a
    ``max_sequence_length`` of their pipeline's). Words and separator are tokenised as
    :func:`clip_text` prepares them, each on its own, and a prompt's ids are their
    concatenation, so every class knows its exact span; ``texts`` holds the prepared text.
    Raises :class:`VocabularyError` if one class alone does not fit, or a word spells out a
    special token.
    """
    lengths = list(lengths) if lengths is not None else [None] * len(tokenizers)
    shapes = [
        _PromptShape.of(tokenizer, length, separator) for tokenizer, length in zip(tokenizers, lengths, strict=True)
    ]
    bodies: list[list[list[int]]] = [[[]] for _ in tokenizers]  # tokenizer -> prompt -> ids between BOS and EOS
    words_of_prompt: list[list[str]] = [[]]
    spans: list[list[tuple[TokenSpan, ...]]] = [[] for _ in tokenizers]
    for cls in classes:
        name = shorten(cls.name)
        pieces_of = []  # per tokenizer: (prepared words, their ids)
        for shape in shapes:
            words, pieces = zip(
                *(_tokenised(shape.tokenizer, word, f"class {name}", shape.specials) for word in cls.synonyms),
                strict=True,
            )
            if any(not piece for piece in pieces):
                raise VocabularyError(f"class {name} has a word that the tokenizer turns into no tokens")
            need = sum(len(p) for p in pieces) + len(shape.separator) * (len(pieces) - 1)
            if need > shape.capacity:
                raise VocabularyError(
                    f"class {name} needs {need} tokens but a prompt holds {shape.capacity}: shorten it "
                    "or drop some of its synonyms"
                )
            pieces_of.append((words, pieces, need))
        fits = all(
            not body[-1] or len(body[-1]) + len(shape.separator) + need <= shape.capacity
            for body, shape, (_, _, need) in zip(bodies, shapes, pieces_of, strict=True)
        )
        if not fits:
            for body in bodies:
                body.append([])
            words_of_prompt.append([])
        for body, shape, (_words, pieces, _), class_spans in zip(bodies, shapes, pieces_of, spans, strict=True):
            current, found = body[-1], []
            for piece in pieces:
                if current:
                    current.extend(shape.separator)
                start = len(shape.prefix) + len(current)
                current.extend(piece)
                found.append(TokenSpan(len(body) - 1, start, start + len(piece)))
            class_spans.append(tuple(found))
        words_of_prompt[-1].extend(pieces_of[0][0])
    texts = tuple(separator.join(words) for words in words_of_prompt)
    return [
        PromptBatch(input_ids=shape.ids(body), spans=tuple(class_spans), texts=texts)
        for shape, body, class_spans in zip(shapes, bodies, spans, strict=True)
    ]


@dataclass(frozen=True)
class _PromptShape:
    """How one tokenizer frames a prompt: its special tokens, separator ids and room for words."""

    tokenizer: object
    length: int
    prefix: tuple[int, ...]  # (BOS,) for CLIP, () for T5
    eos: int
    pad: int
    separator: tuple[int, ...]
    specials: tuple[str, ...]

    @classmethod
    def of(cls, tokenizer, length: int | None, separator: str) -> _PromptShape:
        length = min(int(length or tokenizer.model_max_length), 10_000)
        specials = tuple(_special_literals(tokenizer))
        _, sep_ids = _tokenised(tokenizer, separator, f"the separator {shorten(separator)}", specials)
        bos, eos = tokenizer.bos_token_id, tokenizer.eos_token_id
        pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else eos
        prefix = () if bos is None else (bos,)
        return cls(tokenizer, length, prefix, eos, pad, tuple(sep_ids), specials)

    @property
    def capacity(self) -> int:
        """Word and separator tokens a prompt holds (the context less BOS and EOS)."""
        return self.length - len(self.prefix) - 1

    def ids(self, bodies: list[list[int]]) -> torch.Tensor:
        """``(P, length)`` int64 prompts: ``[BOS] body EOS pad...``."""
        ids = torch.full((len(bodies), self.length), self.pad, dtype=torch.long)
        for row, body in enumerate(bodies):
            tokens = [*self.prefix, *body, self.eos]
            ids[row, : len(tokens)] = torch.tensor(tokens)
        return ids

"""A T5-style tokenizer trained here: a locally made stand-in for T5's sentencepiece vocabulary.

T5's real vocabulary (``spiece.model``, 32,000 pieces) cannot be downloaded here, and the
tiny SD3, FLUX and PixArt test models (:mod:`maskdiffusion.tiny`) need a tokenizer for their
T5 text encoder. This one is a Unigram model trained with the ``tokenizers`` library on the
benchmark class names, the toy world's words and some English filler, wrapped as
``transformers.T5TokenizerFast``. It is for the tiny random-weight models only: real SD3,
FLUX and PixArt folders bring their own T5 tokenizer.

What it shares with T5's, so that code written against it holds for the real one:

- the special tokens and their ids: ``<pad>`` 0, ``</s>`` 1 (appended to every text),
  ``<unk>`` 2, no BOS, sentinels ``<extra_id_N>`` at the end of the vocabulary (the last id
  is ``<extra_id_0>``), ``model_max_length`` 512;
- the pre-tokenisation: words split at whitespace, each prefixed with ``"▁"`` (Metaspace),
  so a text's ids are its words' ids one after the other (``"road"``, ``" and "`` and
  ``"traffic light"`` tokenised alone and concatenated give ``"road and traffic light"``);
- whole common words are single pieces (``"▁road"``) and unseen words fall back to smaller
  pieces, down to single characters (every training character, printable ASCII and the
  Latin-1 letters are in the vocabulary), rather than ``<unk>``.

It has no normalizer: T5's (sentencepiece's compiled NFKC table) comes with the real
vocabulary file.
"""

from __future__ import annotations

import functools
import json
import string
from importlib import resources
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from transformers import T5TokenizerFast

PAD, EOS, UNK = "<pad>", "</s>", "<unk>"
SPECIALS = (PAD, EOS, UNK)  # ids 0, 1, 2, as in T5
EXTRA_IDS = 8  # T5 has 100 sentinels; a few keep the layout
MODEL_MAX_LENGTH = 512
SUBWORD_PIECES = 2000  # the trainer's target; it keeps fewer on a word list this small
# The toy world's classes, colours and patterns (maskdiffusion.toyworld.world sits in a layer above this module's).
TOY_WORLD = (
    "grass brick wall water sand circle square triangle star red orange yellow green blue purple white black "
    "striped dotted checkered plain"
)
# English that joins class names in prompts and captions.
FILLER = (
    "a an the of and or with without in on at to by for from near behind under over next front top bottom left right "
    "photo picture image view scene background foreground object thing stuff other part some this that these those "
    "is are there here one two three many small large big little old new dark light bright colour color brown grey "
    "gray pink"
)
# Characters a prompt may have that no training word has: printable ASCII and the Latin-1 letters.
EXTRA_CHARACTERS = (
    string.ascii_letters
    + string.digits
    + string.punctuation
    + "".join(chr(code) for code in range(0xC0, 0x100) if chr(code).isalpha())
)


def training_words() -> list[str]:
    """The words the vocabulary is trained on, sorted and unique: every benchmark class word (synonyms included),
    the toy world's and the filler words that join them in prompts and captions."""
    from .prompts import read_class_file

    phrases = [TOY_WORLD, FILLER]
    for resource in sorted(resources.files("maskdiffusion").joinpath("classnames").iterdir(), key=str):
        if resource.name.endswith(".txt"):
            with resources.as_file(resource) as path:
                phrases += [word for cls in read_class_file(str(path)) for word in cls.synonyms]
    return sorted({word for phrase in phrases for word in phrase.split()})


def _pre_tokenizer():
    """T5's: split at whitespace, then ``"▁"`` before every word (sentencepiece's dummy prefix)."""
    from tokenizers import pre_tokenizers

    return pre_tokenizers.Sequence(
        [pre_tokenizers.WhitespaceSplit(), pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="always")]
    )


def _subword_pieces(words: list[str]) -> dict[str, float]:
    """Unigram pieces and scores (log probabilities) trained on ``words``, specials left out.

    Scores are rounded: the trainer sums in parallel, so their last bits differ from run to run.
    """
    from tokenizers import Tokenizer, models, trainers

    tokenizer = Tokenizer(models.Unigram())
    tokenizer.pre_tokenizer = _pre_tokenizer()
    trainer = trainers.UnigramTrainer(
        vocab_size=SUBWORD_PIECES, show_progress=False, special_tokens=list(SPECIALS), unk_token=UNK
    )
    tokenizer.train_from_iterator(words, trainer)
    vocab = json.loads(tokenizer.to_str())["model"]["vocab"]
    return {piece: round(score, 6) for piece, score in vocab if piece not in SPECIALS}


def vocabulary() -> list[tuple[str, float]]:
    """The (piece, score) list in T5's order: pad, eos, unk, pieces by falling score, sentinels last to first.

    Two kinds of piece are added to the trained ones (or rescored), with fixed scores:

    - every training word whole (``"▁road"``), scored as the best trained piece, so that one
      piece always beats a split into two or more (scores are negative), as T5 keeps common
      words whole. The trainer seldom finds these: it takes as candidates only strings that
      two different words share.
    - the characters of :data:`EXTRA_CHARACTERS` that no training word has, scored below every
      trained piece, so that unseen words still tokenise. (The trainer would add them itself,
      given them as its alphabet, but in an order that changes from run to run.)
    """
    words = training_words()
    pieces = _subword_pieces(words)
    best, worst = max(pieces.values()), min(pieces.values())
    pieces.update(dict.fromkeys((f"▁{word}" for word in words), best))
    pieces.update(dict.fromkeys((char for char in EXTRA_CHARACTERS if char not in pieces), round(worst - 1, 6)))
    ordered = sorted(pieces.items(), key=lambda item: (-item[1], item[0]))
    sentinels = [(f"<extra_id_{i}>", 0.0) for i in reversed(range(EXTRA_IDS))]
    return [*((token, 0.0) for token in SPECIALS), *ordered, *sentinels]


@functools.lru_cache(maxsize=1)
def t5_style_tokenizer() -> T5TokenizerFast:
    """The T5-style tokenizer (a ``T5TokenizerFast``), trained on first use (well under a second, no network).

    The same object is returned each time: callers that change it must copy it first.
    """
    from tokenizers import Tokenizer, decoders, models, processors
    from transformers import T5TokenizerFast

    backend = Tokenizer(models.Unigram(vocabulary(), unk_id=SPECIALS.index(UNK)))
    backend.pre_tokenizer = _pre_tokenizer()
    backend.decoder = decoders.Metaspace(replacement="▁", prepend_scheme="always")
    backend.post_processor = processors.TemplateProcessing(
        single=f"$A {EOS}", pair=f"$A {EOS} $B {EOS}", special_tokens=[(EOS, SPECIALS.index(EOS))]
    )
    return T5TokenizerFast(
        tokenizer_object=backend,
        eos_token=EOS,
        unk_token=UNK,
        pad_token=PAD,
        extra_ids=EXTRA_IDS,
        model_max_length=MODEL_MAX_LENGTH,
    )

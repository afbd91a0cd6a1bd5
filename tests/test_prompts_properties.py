"""Property-based tests: class parsing and prompt building on arbitrary text never fail in another way.

Any input either gives a vocabulary whose spans hold exactly the tokens of each word (as CLIP
reads it), or a :class:`VocabularyError` with a message; never another exception.
"""

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from maskdiffusion.prompts import ClassName, VocabularyError, build_prompts, clip_text, clip_tokenizer, parse_classes

FAST = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])

# Any code point (surrogates included) mixed with the characters that matter to the parser and the tokenizer.
tricky = st.sampled_from([",", "|", " ", "\t", "\n", "\u00a0", "&amp;", "&#", "<|endoftext|>", "<|startoftext|>",
                          "ﬁ", "ｒ", "’", "Ã©", "#", "\x00", "\u200b", "\ud800", "a", "é", "東"])  # fmt: skip
garbage = st.lists(st.one_of(st.characters(exclude_categories=()), tricky), max_size=30).map("".join)
item = st.one_of(
    garbage,
    st.lists(garbage, max_size=3),
    st.builds(lambda words: ClassName(words[0] if words else "", tuple(words)), st.lists(garbage, max_size=3)),
    st.integers(),
    st.none(),
    st.lists(st.one_of(st.integers(), st.none(), garbage), max_size=3),
)
class_lists = st.one_of(garbage, st.lists(item, max_size=8), st.tuples(item, item), st.integers(), st.none())


@pytest.fixture(scope="module")
def tokenizer():
    return clip_tokenizer()


def check_vocabulary(tokenizer, classes, separator=" and "):
    """Parse and build; if both succeed, every span holds exactly its word's tokens."""
    try:
        vocabulary = parse_classes(classes)
        batch = build_prompts(tokenizer, vocabulary, separator)
    except VocabularyError as error:
        assert str(error) and len(str(error)) < 600
        return
    assert len(batch.spans) == len(vocabulary)
    ids = batch.input_ids
    assert (ids[:, 0] == tokenizer.bos_token_id).all()
    for cls, spans in zip(vocabulary, batch.spans, strict=True):
        assert len(spans) == len(cls.synonyms)
        for word, span in zip(cls.synonyms, spans, strict=True):
            expected = tokenizer(clip_text(word), add_special_tokens=False).input_ids
            assert 0 < span.start < span.stop < ids.shape[1]
            assert ids[span.prompt, span.start : span.stop].tolist() == expected
    for row in range(batch.num_prompts):
        last = max(s.stop for spans in batch.spans for s in spans if s.prompt == row)
        assert ids[row, last] == tokenizer.eos_token_id
    special = {tokenizer.bos_token_id, tokenizer.eos_token_id}
    inside = [t for spans in batch.spans for s in spans for t in ids[s.prompt, s.start : s.stop].tolist()]
    assert not special & set(inside)


@FAST
@given(class_lists)
def test_any_class_list_is_a_vocabulary_or_a_vocabulary_error(tokenizer, classes):
    check_vocabulary(tokenizer, classes)


@FAST
@given(st.lists(st.text(min_size=1, max_size=12), min_size=1, max_size=60))
def test_printable_names_pack_into_prompts_with_exact_spans(tokenizer, names):
    check_vocabulary(tokenizer, names)


@FAST
@given(st.lists(garbage, min_size=1, max_size=4), garbage)
def test_any_separator_keeps_spans_exact_or_is_refused(tokenizer, names, separator):
    check_vocabulary(tokenizer, names, separator)

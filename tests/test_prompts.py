import pytest
import torch

from maskdiffusion.prompts import (
    VocabularyError,
    build_prompts,
    clip_tokenizer,
    parse_classes,
    read_class_file,
)


@pytest.fixture(scope="module")
def tokenizer():
    return clip_tokenizer()


def span_tokens(tokenizer, batch, cls):
    return [
        tokenizer.convert_ids_to_tokens(batch.input_ids[s.prompt, s.start : s.stop].tolist()) for s in batch.spans[cls]
    ]


def test_bundled_tokenizer_is_the_real_clip_bpe(tokenizer):
    # Reference ids of openai/clip-vit-large-patch14 for "a photo of a traffic light,".
    assert tokenizer("a photo of a traffic light,").input_ids == [49406, 320, 1125, 539, 320, 3399, 1395, 267, 49407]
    assert len(tokenizer) == 49408 and tokenizer.model_max_length == 77


def test_multi_token_class_gets_its_whole_span(tokenizer):
    names = ["road", "traffic light", "potted plant", "low vegetation", "Eiffel Tower"]
    batch = build_prompts(tokenizer, parse_classes(names))
    assert span_tokens(tokenizer, batch, 1) == [["traffic</w>", "light</w>"]]
    assert span_tokens(tokenizer, batch, 2) == [["potted</w>", "plant</w>"]]
    assert span_tokens(tokenizer, batch, 3) == [["low</w>", "vegetation</w>"]]
    assert span_tokens(tokenizer, batch, 4) == [["eiffel</w>", "tower</w>"]]
    assert span_tokens(tokenizer, batch, 0) == [["road</w>"]]


def test_prompt_ids_equal_tokenizing_the_joined_text(tokenizer):
    batch = build_prompts(tokenizer, parse_classes("road, traffic light, café, Eiffel Tower|tour Eiffel"))
    direct = tokenizer(batch.texts[0], padding="max_length", max_length=77).input_ids
    assert batch.input_ids[0].tolist() == direct


def test_separator_tokens_belong_to_no_class(tokenizer):
    batch = build_prompts(tokenizer, parse_classes("road, sky, car"), separator=", ")
    weights = batch.token_weights()
    comma = tokenizer.convert_tokens_to_ids(",</w>")
    assert (batch.input_ids[0] == comma).sum() == 2
    assert weights[:, 0, batch.input_ids[0] == comma].sum() == 0


def test_synonyms_and_word_pieces_are_averaged(tokenizer):
    batch = build_prompts(tokenizer, parse_classes(["person|pedestrian", "traffic light"]))
    weights = batch.token_weights()
    assert torch.allclose(weights.sum(dim=(1, 2)), torch.ones(2))
    person, pedestrian = batch.spans[0]
    assert weights[0, 0, person.start] == pytest.approx(0.5)
    assert weights[0, 0, pedestrian.start : pedestrian.stop].sum() == pytest.approx(0.5)
    (light,) = batch.spans[1]
    assert light.stop - light.start == 2
    assert torch.allclose(weights[1, 0, light.start : light.stop], torch.tensor([0.5, 0.5]))


def test_long_vocabulary_is_split_over_prompts_and_every_class_keeps_its_span(tokenizer):
    colours = ["red", "green", "blue", "yellow", "purple", "orange", "black", "white", "grey", "pink"]
    things = ["chair", "table", "lamp", "door", "window", "bottle", "cup", "plate", "shelf", "sofa", "rug", "vase"]
    names = [f"{c} {t}" for c in colours for t in things]  # 120 classes, 3 tokens each with the separator
    batch = build_prompts(tokenizer, parse_classes(names))
    assert batch.num_prompts > 1
    assert batch.input_ids.shape[1] == 77
    for i, spans in enumerate(batch.spans):
        (span,) = spans
        tokens = tokenizer.decode(batch.input_ids[span.prompt, span.start : span.stop])
        assert tokens.strip() == names[i]
    # every prompt ends with EOS inside the context
    assert (batch.input_ids == tokenizer.eos_token_id).any(dim=1).all()


def test_non_ascii_class_names_work(tokenizer):
    batch = build_prompts(tokenizer, parse_classes("café, 東京タワー, Ölfass"))
    assert all(span.stop > span.start for spans in batch.spans for span in spans)
    assert tokenizer.decode(batch.input_ids[0, batch.spans[0][0].start : batch.spans[0][0].stop]).strip() == "café"


@pytest.mark.parametrize(
    "classes, fragment",
    [
        ("", "blank"),
        ([], "empty"),
        ("road, , sky", "blank"),
        ("road, sky, Road", "twice"),
        ("road|street, street", "twice"),
        ("road|, sky", "blank"),
    ],
)
def test_bad_class_lists_are_usage_errors(classes, fragment):
    with pytest.raises(VocabularyError, match=fragment):
        parse_classes(classes)


def test_class_longer_than_a_prompt_is_rejected(tokenizer):
    with pytest.raises(VocabularyError, match=r"needs .* tokens"):
        build_prompts(tokenizer, parse_classes(["word " * 80]))


def test_class_file_reads_one_class_per_line_with_synonyms(tmp_path):
    path = tmp_path / "classes.txt"
    path.write_text("road\n\n# comment\nperson|pedestrian\ntraffic light  # trailing comment\n", encoding="utf-8")
    classes = read_class_file(str(path))
    assert [c.name for c in classes] == ["road", "person", "traffic light"]
    assert classes[1].synonyms == ("person", "pedestrian")

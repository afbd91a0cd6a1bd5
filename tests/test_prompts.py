import pytest
import torch

from maskdiffusion.prompts import (
    ClassName,
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


# -- tokenisation as CLIP was trained (ftfy, HTML entities, whitespace) -----------------------------------------------


@pytest.mark.parametrize(
    "typed, clean",
    [
        ("AT&amp;T", "at&t"),
        ("AT&amp;amp;T", "at&t"),  # unescaped twice, as CLIP did
        ("ﬁsh", "fish"),  # Latin ligature
        ("ｒｏａｄ", "road"),  # full-width letters
        ("McDonald’s", "mcdonald's"),  # curly apostrophe
    ],
)
def test_class_words_are_tokenised_as_clip_saw_them(tokenizer, typed, clean):
    assert tokenizer(typed, add_special_tokens=False).input_ids != tokenizer(clean, add_special_tokens=False).input_ids
    batch = build_prompts(tokenizer, parse_classes([typed, "sky"]))
    (span,) = batch.spans[0]
    assert batch.input_ids[0, span.start : span.stop].tolist() == tokenizer(clean, add_special_tokens=False).input_ids
    assert parse_classes([typed])[0].name == typed  # shown as typed
    direct = tokenizer(batch.texts[0], padding="max_length", max_length=77).input_ids
    assert batch.input_ids[0].tolist() == direct  # the prompt text is the normalised text


def test_words_that_clip_reads_alike_are_one_class():
    with pytest.raises(VocabularyError, match="twice"):
        parse_classes("road, ｒｏａｄ")
    with pytest.raises(VocabularyError, match="twice"):
        parse_classes("AT&T, AT&amp;T")


# -- special tokens -----------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "classes",
    [
        ["road", ["car<|endoftext|>"]],  # "|" splits synonyms in text: lists and ClassName carry it whole
        ["road", ["<|startoftext|> car"]],
        ["road", ["car", "auto <|endoftext|>mobile"]],
        ["road", ClassName("car", ("car", "<|endoftext|>"))],
        ["road", "car＜｜endoftext｜＞"],  # full-width: becomes the literal once normalised
    ],
)
def test_special_token_literals_in_class_names_are_refused(tokenizer, classes):
    with pytest.raises(VocabularyError, match=r"class '(car|<).*special token '<\|(end|start)oftext\|>'.*remove it"):
        build_prompts(tokenizer, parse_classes(classes))


def test_every_special_token_of_the_tokenizer_is_refused_but_single_characters_are_text(tokenizer, tmp_path):
    from transformers import CLIPTokenizer

    tokenizer.save_pretrained(tmp_path)
    custom = CLIPTokenizer.from_pretrained(tmp_path, pad_token="!", extra_special_tokens=["[MASK]"])  # SD 2.x pads "!"
    with pytest.raises(VocabularyError, match=r"'\[MASK\]'"):
        build_prompts(custom, parse_classes("road, car [MASK]"))
    assert build_prompts(custom, parse_classes("road, car!")).num_prompts == 1
    with pytest.raises(VocabularyError, match="separator"):
        build_prompts(tokenizer, parse_classes("road, sky"), separator=" <|endoftext|> ")
    assert build_prompts(tokenizer, parse_classes("road, car｜auto")).num_prompts == 1  # full-width bar: text


# -- messages quote user text briefly; class files ----------------------------------------------------------------


def test_long_class_names_are_shortened_in_messages(tokenizer):
    long = "x" * 10_000
    for call in (lambda: parse_classes([long]), lambda: parse_classes(["a" * 900, "a" * 900])):
        with pytest.raises(VocabularyError) as error:
            call()
        assert len(str(error.value)) < 300 and "characters" in str(error.value)
    with pytest.raises(VocabularyError, match=r"needs .* tokens") as error:
        build_prompts(tokenizer, parse_classes(["word " * 150]))
    assert len(str(error.value)) < 300 and "749 characters" in str(error.value)


@pytest.mark.parametrize(
    "content",
    [bytes(range(256)) * 4, "café\nroad\n".encode("latin-1"), "road\nsky\n".encode("utf-16")],
    ids=["binary", "latin-1", "utf-16"],
)
def test_class_file_that_is_not_utf8_text_is_named(tmp_path, content):
    path = tmp_path / "my-classes.bin"
    path.write_bytes(content)
    with pytest.raises(VocabularyError, match=r"my-classes\.bin.* UTF-8 text .*one class per line"):
        read_class_file(str(path))


def test_class_file_with_a_byte_order_mark_reads(tmp_path):
    path = tmp_path / "classes.txt"
    path.write_bytes("road\nsky\n".encode("utf-8-sig"))
    assert [c.name for c in read_class_file(str(path))] == ["road", "sky"]


def test_huge_class_file_is_refused_without_reading_it(tmp_path):
    path = tmp_path / "huge.txt"
    with open(path, "wb") as handle:  # 1 GiB, sparse: costs no disk
        handle.truncate(1 << 30)
    with pytest.raises(VocabularyError, match=r"huge\.txt.*larger than 1 MiB"):
        read_class_file(str(path))


def test_class_file_errors_name_the_file(tmp_path):
    path = tmp_path / "dups.txt"
    path.write_text("road\nsky\nroad\n", encoding="utf-8")
    with pytest.raises(VocabularyError, match=r"dups\.txt.*twice"):
        read_class_file(str(path))
    with pytest.raises(VocabularyError, match=r"cannot read class file .*absent\.txt"):
        read_class_file(str(tmp_path / "absent.txt"))


def test_too_many_classes_and_non_text_items_are_vocabulary_errors():
    with pytest.raises(VocabularyError, match="at most 4,096"):
        parse_classes([f"class {i}" for i in range(5000)])
    with pytest.raises(VocabularyError, match="class #2 is a int"):
        parse_classes(["road", 3])
    with pytest.raises(VocabularyError, match="synonym that is a NoneType"):
        parse_classes([["road", None]])
    with pytest.raises(VocabularyError, match="not a NoneType"):
        parse_classes(None)
    with pytest.raises(VocabularyError, match="not a bytes"):
        parse_classes(b"road, sky")
    assert [c.synonyms for c in parse_classes(("road", ("sky", "heaven")))] == [("road",), ("sky", "heaven")]
    with pytest.raises(VocabularyError, match="lone surrogate"):
        parse_classes(["road", "sky\ud800"])

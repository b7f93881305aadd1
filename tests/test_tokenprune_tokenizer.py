def test_offline_clip_tokenizer_matches_openai_ids(clip_tokenizer):
    assert clip_tokenizer("a cat wearing a red hat").input_ids == [49406, 320, 2368, 3309, 320, 736, 3801, 49407]
    assert len(clip_tokenizer) == 49408
    assert clip_tokenizer.model_max_length == 77


def test_padding_to_77_uses_end_of_text_as_in_sd15(clip_tokenizer):
    ids = clip_tokenizer("a cat", padding="max_length", max_length=77).input_ids
    assert len(ids) == 77 and ids[:4] == [49406, 320, 2368, 49407] and set(ids[3:]) == {49407}

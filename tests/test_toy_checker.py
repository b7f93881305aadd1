"""The analytic adherence checker: validated on the data set's own ground-truth renders."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest

from tokenprune_diffusers.toy.checker import check_image, detect_regions, parse_caption, score_images
from tokenprune_diffusers.toy.data import ToyObject, ToyShapesDataset, render


@pytest.mark.parametrize("num_objects", [1, 2])
def test_ground_truth_renders_score_at_least_98_percent(num_objects):
    data = ToyShapesDataset(seed=123, num_objects=num_objects)
    samples = [data[i] for i in range(150)]
    scores = score_images([s.image for s in samples], [s.caption for s in samples])
    assert scores["n"] == 150
    assert scores["all"] >= 0.98, scores


def test_wrong_attributes_are_caught():
    data = ToyShapesDataset(seed=9, num_objects=1)
    other = {"circle": "square", "square": "triangle", "triangle": "circle"}
    flip = {"small": "large", "large": "small"}
    away = {"left": "right", "right": "left", "top": "bottom", "bottom": "top", "center": "left"}
    for i in range(30):
        s = data[i]
        (obj,) = s.objects
        for attr, wrong in (("shape", other[obj.shape]), ("size", flip[obj.size]), ("position", away[obj.position])):
            r = check_image(s.image, (dataclasses.replace(obj, **{attr: wrong}),))
            assert r[attr] == [False] and not r["all"]
        r = check_image(s.image, (dataclasses.replace(obj, color="green" if obj.color != "green" else "red"),))
        assert r["color"] == [False] and not r["all"]


def test_extra_or_missing_objects_fail_count():
    two = (ToyObject("red", "circle", "large", "left"), ToyObject("blue", "square", "small", "right"))
    image = render(two)  # (32, 32, 3)
    r = check_image(image, two[:1])
    assert r["color"] == [True] and r["count"] is False and not r["all"]
    blank = np.zeros((32, 32, 3), dtype=np.float32)
    r = check_image(blank, two)
    assert r["color"] == [False, False] and not r["all"]
    assert detect_regions(blank) == []


def test_parse_caption_ignores_distractors():
    objs = parse_caption("a small red circle on the left and a large blue square on the right, 4k, studio lighting")
    assert objs == (ToyObject("red", "circle", "small", "left"), ToyObject("blue", "square", "large", "right"))
    with pytest.raises(ValueError, match="no toy object"):
        parse_caption("a cat wearing a red hat")


def test_bad_image_shape_is_refused():
    with pytest.raises(ValueError, match="32x32"):
        detect_regions(np.zeros((16, 16, 3)))


def test_per_image_verdicts_are_the_all_correct_share_in_order():
    data = ToyShapesDataset(seed=5, num_objects=1)
    samples = [data[i] for i in range(6)]
    objects = [s.objects for s in samples]
    wrong = dataclasses.replace(objects[2][0], shape="square" if objects[2][0].shape != "square" else "circle")
    objects[2] = (wrong,)
    scores = score_images([s.image for s in samples], objects, per_image=True)
    assert scores["all_per_image"] == [True, True, False, True, True, True]
    assert scores["all"] == sum(scores["all_per_image"]) / 6
    assert "all_per_image" not in score_images([s.image for s in samples], objects)  # only when asked


def test_paired_difference_and_its_standard_error():
    from tokenprune_diffusers.toy.evaluate import paired_difference

    a = [True, True, False, True]
    b = [True, False, False, False]
    d, se = paired_difference(a, b)  # per-prompt differences 0, 1, 0, 1
    assert d == 0.5 and se == pytest.approx(np.std([0, 1, 0, 1], ddof=1) / 2)
    assert paired_difference(a, a) == (0.0, 0.0) and paired_difference([True], [False]) == (1.0, 0.0)
    with pytest.raises(ValueError, match="same .non-zero. length, got 4 and 3"):
        paired_difference(a, b[:3])
    with pytest.raises(ValueError, match="got 0 and 0"):
        paired_difference([], [])

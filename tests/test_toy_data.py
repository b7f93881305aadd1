"""The procedural toy data set: determinism, content, and errors at the boundary."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from tokenprune_diffusers.toy.data import (
    COLORS,
    DISTRACTORS,
    SIZES,
    ToyObject,
    ToyShapesDataset,
    caption_for,
    collate,
    render,
)


def test_same_seed_same_samples_in_any_order():
    a, b = ToyShapesDataset(seed=3), ToyShapesDataset(seed=3)
    forward = [a[i] for i in range(20)]
    backward = [b[i] for i in reversed(range(20))][::-1]
    for x, y in zip(forward, backward):
        assert x.caption == y.caption and x.objects == y.objects
        assert torch.equal(x.image, y.image)


def test_different_seeds_and_indices_differ():
    a, b = ToyShapesDataset(seed=0), ToyShapesDataset(seed=1)
    assert [a[i].caption for i in range(20)] != [b[i].caption for i in range(20)]
    assert len({a[i].caption for i in range(50)}) > 40


def test_library_does_not_touch_global_rng():
    np.random.seed(0)
    torch.manual_seed(0)
    before = (np.random.get_state()[1].copy(), torch.get_rng_state().clone())
    ToyShapesDataset(seed=0)[5]
    assert np.array_equal(before[0], np.random.get_state()[1]) and torch.equal(before[1], torch.get_rng_state())


def test_content_matches_caption_and_ground_truth():
    data = ToyShapesDataset(seed=7)
    counts = {1: 0, 2: 0}
    for i in range(200):
        s = data[i]
        assert s.image.shape == (3, 32, 32) and s.image.dtype == torch.float32
        assert s.image.min() >= -1.0 and s.image.max() <= 1.0
        counts[len(s.objects)] += 1
        assert s.caption.startswith(caption_for(s.objects))
        extra = s.caption[len(caption_for(s.objects)) :].strip(", ")
        assert all(part in DISTRACTORS for part in extra.split(", ") if part)
        pixels = ((s.image.permute(1, 2, 0) + 1) / 2).reshape(-1, 3)  # (1024, 3)
        colours = {tuple(round(float(v), 3) for v in p) for p in pixels} - {(0.0, 0.0, 0.0)}
        assert colours == {tuple(round(v, 3) for v in COLORS[o.color]) for o in s.objects}
        if len(s.objects) == 2:
            assert s.objects[0].color != s.objects[1].color
            assert {s.objects[0].position, s.objects[1].position} in ({"left", "right"}, {"top", "bottom"})
    assert counts[1] > 60 and counts[2] > 60


def test_sizes_render_as_stated():
    for size, side in SIZES.items():
        img = render((ToyObject("red", "square", size, "center"),))  # (32, 32, 3), no jitter
        ys, xs = np.nonzero(img[:, :, 0])
        assert xs.max() - xs.min() + 1 == side and ys.max() - ys.min() + 1 == side


def test_num_objects_and_collate():
    data = ToyShapesDataset(seed=1, num_objects=2, max_distractors=0)
    images, captions, objects = collate([data[i] for i in range(4)])
    assert images.shape == (4, 3, 32, 32)
    assert all(len(o) == 2 for o in objects) and all("," not in c for c in captions)


@pytest.mark.parametrize("kwargs", [dict(length=0), dict(num_objects=3), dict(max_distractors=-1)])
def test_bad_arguments_are_refused(kwargs):
    with pytest.raises(ValueError, match=next(iter(kwargs))):
        ToyShapesDataset(**kwargs)


def test_index_out_of_range():
    with pytest.raises(IndexError):
        ToyShapesDataset(length=3)[3]

"""Bad input to the report, the heat maps and the token roles: refused or handled, never wrong silently."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from tokenprune_diffusers import apply_token_pruning, remove_token_pruning
from tokenprune_diffusers.scoring import PADDING, SPECIAL, WORD, token_roles

BOS, EOS = 49406, 49407


def _run(pipe, prompt, **kw):
    proc = apply_token_pruning(pipe, **kw)
    try:
        with torch.no_grad():
            image = pipe(prompt, num_inference_steps=3, height=32, width=32,
                         generator=torch.Generator().manual_seed(0)).images[0]
        return proc.report, image
    finally:
        remove_token_pruning(pipe)


# ---- token roles: a literal <|endoftext|> inside the prompt -------------------------------------
@pytest.mark.parametrize("pad", [EOS, 0])  # CLIP pads with end-of-text (SD 1.x) or with another id (SD 2.x)
def test_literal_end_of_text_inside_the_prompt_keeps_the_words_after_it(pad):
    ids = torch.tensor([[BOS, 320, 2368, EOS, 736, 3801, EOS, pad, pad, pad],
                        [BOS, EOS, pad, pad, pad, pad, pad, pad, pad, pad]])
    roles = token_roles(ids, BOS, EOS)
    S, W, P = SPECIAL, WORD, PADDING
    assert roles.tolist() == [[S, W, W, S, W, W, S, P, P, P], [S, S] + [P] * 8]


def test_token_roles_without_end_of_text_or_with_a_truncated_prompt():
    ids = torch.tensor([[BOS, 320, 321, 322], [BOS, 320, 321, EOS]])
    assert token_roles(ids, BOS, EOS).tolist() == [[SPECIAL, WORD, WORD, WORD], [SPECIAL, WORD, WORD, SPECIAL]]


def test_pipeline_prompt_with_literal_end_of_text_prunes_nothing_silently(tiny_pipe):
    report, _ = _run(tiny_pipe, "a cat <|endoftext|> wearing a red hat", threshold=0.0, padding="drop")
    kept = report.kept_words(-1)
    assert [w for w in ("wearing", "red", "hat") if w not in kept] == []
    assert report.pruned_words(-1) == []  # padding="drop" removed padding only, and there is none among the words


# ---- rows out of range -----------------------------------------------------------------------------
def test_rows_out_of_range_are_refused_not_wrapped(tiny_pipe, tmp_path):
    from tokenprune_diffusers.heatmap import render_heatmaps

    report, image = _run(tiny_pipe, "a red circle", threshold=0.1, warmup=0.5)
    assert report.batch_size == 2  # negative + positive row under classifier-free guidance
    for bad in (7, 2, -3):
        with pytest.raises(IndexError, match=rf"row must be in \[-2, 2\) .* 2 rows, got {bad}"):
            render_heatmaps(report, tmp_path / "maps.png", image=image, row=bad)
        with pytest.raises(IndexError, match="row must be in"):
            report.kept_words(bad)
        with pytest.raises(IndexError, match="row must be in"):
            report.token_maps(bad)
    with pytest.raises(TypeError, match="row must be an integer, got 1.0"):
        report.kept_words(1.0)
    assert not (tmp_path / "maps.png").exists()
    assert report.kept_words(-1) == report.kept_words(1)  # in-range negative rows still count from the end


# ---- heat maps over the image the pipeline returns ------------------------------------------------
def test_heatmaps_accept_the_pil_image_and_numpy_arrays(tiny_pipe, tmp_path):
    from PIL import Image

    from tokenprune_diffusers.heatmap import render_heatmaps

    report, image = _run(tiny_pipe, "a red circle", threshold=0.1, warmup=0.5)
    assert isinstance(image, Image.Image)  # what pipe(...).images[0] returns by default
    arr = np.asarray(image)
    for i, given in enumerate((image, arr, arr.astype(np.float32) / 255.0, torch.from_numpy(arr.copy()))):
        path = render_heatmaps(report, tmp_path / f"maps{i}.png", image=given)
        with Image.open(path) as im:
            assert im.format == "PNG"
    with pytest.raises(ValueError, match=r"a float image must be in \[0, 1\]"):
        render_heatmaps(report, tmp_path / "bad.png", image=arr.astype(np.float32) * 2.0)
    with pytest.raises(ValueError, match="got shape"):
        render_heatmaps(report, tmp_path / "bad.png", image=np.zeros((4, 4, 5)))
    nan = arr.astype(np.float32) / 255.0
    nan[0, 0, 0] = np.nan
    with pytest.raises(ValueError, match="NaN"):
        render_heatmaps(report, tmp_path / "bad.png", image=nan)


# ---- the package's atomic writes --------------------------------------------------------------------
def test_atomic_path_leaves_the_old_file_on_failure(tmp_path):
    from tokenprune_diffusers._atomic import atomic_path, atomic_write_text

    target = tmp_path / "report.json"
    atomic_write_text(target, "old")
    with pytest.raises(OSError, match="disk full"):
        with atomic_path(target) as tmp:
            tmp.write_text("partial")
            raise OSError("disk full")
    assert target.read_text() == "old" and [p.name for p in tmp_path.iterdir()] == ["report.json"]
    atomic_write_text(tmp_path / "sub" / "new.json", "new")
    assert (tmp_path / "sub" / "new.json").read_text() == "new"

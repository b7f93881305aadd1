"""The committed, trained toy model: loads offline as a standard StableDiffusionPipeline."""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("diffusers")

from tokenprune_diffusers import apply_token_pruning, remove_token_pruning  # noqa: E402
from tokenprune_diffusers.toy.model import WEIGHTS_DIR, load_toy_pipeline  # noqa: E402

needs_weights = pytest.mark.skipif(
    not (WEIGHTS_DIR / "unet.safetensors").is_file(), reason=f"toy weights not exported to {WEIGHTS_DIR}"
)


@pytest.fixture(scope="module")
def toy_pipe():
    return load_toy_pipeline()


@needs_weights
def test_loads_as_stable_diffusion_pipeline_and_generates_32px(toy_pipe):
    from diffusers import StableDiffusionPipeline

    assert isinstance(toy_pipe, StableDiffusionPipeline)
    prompt = "a large red circle in the center, studio lighting"
    run = lambda: toy_pipe(prompt, num_inference_steps=8, generator=torch.Generator().manual_seed(0), output_type="np").images  # noqa: E731
    first, second = run(), run()
    assert first.shape == (1, 32, 32, 3)
    assert (first == second).all()  # seeded: same image twice


@needs_weights
def test_token_pruning_runs_on_the_toy_pipeline(toy_pipe):
    proc = apply_token_pruning(toy_pipe, threshold=0.3, warmup=0.25, record_maps=False)
    try:
        image = toy_pipe(
            "a small blue square on the left and a large yellow triangle on the right, highly detailed",
            num_inference_steps=8,
            generator=torch.Generator().manual_seed(0),
            output_type="np",
        ).images
    finally:
        remove_token_pruning(toy_pipe)
    assert image.shape == (1, 32, 32, 3)
    assert proc.report is not None and proc.report.num_calls == 8


@needs_weights
def test_evaluation_runs_the_speed_settings_and_removes_them(toy_pipe):
    from tokenprune_diffusers import get_deep_cache, get_token_pruning
    from tokenprune_diffusers.toy.evaluate import SPEED_SETTINGS, EvalConfig, evaluate

    batches = []
    handle = toy_pipe.unet.register_forward_pre_hook(lambda m, a: batches.append(a[0].shape[0]))
    setting = SPEED_SETTINGS[-1]  # gate + collapse + DeepCache
    try:
        rows = evaluate(toy_pipe, EvalConfig(n=2, steps=5, batch_size=2), settings=[setting], progress=False)
    finally:
        handle.remove()
    assert [r["setting"] for r in rows] == [setting.label] * 2 and all(0 <= r["all"] <= 1 for r in rows)
    assert all(len(r["all_per_image"]) == 2 and r["all"] == sum(r["all_per_image"]) / 2 for r in rows)  # for paired differences
    assert batches[:1] == [4] and batches[-1] == 2  # 2 prompts: CFG's 4 rows, then collapsed to 2
    assert get_token_pruning(toy_pipe) is None and get_deep_cache(toy_pipe) is None

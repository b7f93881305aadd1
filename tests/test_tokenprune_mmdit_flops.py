"""The report's FLOP accounting on MM-DiTs (SD3, Flux): the formula against torch's FLOP counter on
the tiny transformers, and a generation's reported savings against the FLOPs torch counts in the
transformer calls of a stock and a pruned generation."""

from __future__ import annotations

import pytest
import torch
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode

pytest.importorskip("diffusers")

from mmdit_helpers import generate  # noqa: E402

from tokenprune_diffusers import apply_token_pruning, remove_token_pruning  # noqa: E402
from tokenprune_diffusers.mmdit import FAMILIES  # noqa: E402
from tokenprune_diffusers.models import tiny_flux_pipeline, tiny_sd3_pipeline  # noqa: E402
from tokenprune_diffusers.report import joint_transformer_flops  # noqa: E402

BUILD = {"StableDiffusion3Pipeline": tiny_sd3_pipeline, "FluxPipeline": tiny_flux_pipeline}


@pytest.fixture(scope="module", params=sorted(BUILD))
def pipe(request):
    p = BUILD[request.param]()
    p.set_progress_bar_config(disable=True)
    return p


@pytest.fixture(autouse=True)
def clean(pipe):
    yield
    remove_token_pruning(pipe)


def _inputs(pipe, text_len: int, batch: int = 2):
    """Transformer inputs of a 32 px call with ``text_len`` text positions."""
    c, g = pipe.transformer.config, torch.Generator().manual_seed(0)
    text = torch.randn(batch, text_len, c.joint_attention_dim, generator=g)
    pooled = torch.randn(batch, c.pooled_projection_dim, generator=g)
    if type(pipe).__name__ == "FluxPipeline":
        n = 16 * 16 // 4  # 32 px: 16 x 16 latents packed 2 x 2
        ids = torch.zeros(n, 3)
        return dict(hidden_states=torch.randn(batch, n, c.in_channels, generator=g), encoder_hidden_states=text,
                    pooled_projections=pooled, timestep=torch.full((batch,), 0.5), img_ids=ids, txt_ids=torch.zeros(text_len, 3),
                    guidance=torch.full((batch,), 3.5) if c.guidance_embeds else None), n
    x = torch.randn(batch, c.in_channels, 4, 4, generator=g)
    return dict(hidden_states=x, encoder_hidden_states=text, pooled_projections=pooled, timestep=torch.full((batch,), 500.0)), \
        (4 // c.patch_size) ** 2


def _counted(module, **inputs) -> int:
    with torch.no_grad(), FlopCounterMode(display=False) as counter, sdpa_kernel(SDPBackend.MATH):
        module(**inputs, return_dict=False)
    return counter.get_total_flops()


def test_the_formula_matches_torchs_flop_counter(pipe):
    """Totals within 3% (norms and element-wise work are left out of the formula) and, what the
    savings are made of, the difference between two text lengths within 0.5%."""
    family = FAMILIES[type(pipe).__name__]
    dims = family.dims(pipe.transformer.config)
    (long, n), (short, _) = _inputs(pipe, 40), _inputs(pipe, 7)
    counted_long, counted_short = _counted(pipe.transformer, **long), _counted(pipe.transformer, **short)
    formula_long, formula_short = joint_transformer_flops(dims, 2, n, 40), joint_transformer_flops(dims, 2, n, 7)
    assert formula_long == pytest.approx(counted_long, rel=0.03)
    assert formula_short == pytest.approx(counted_short, rel=0.03)
    assert formula_long - formula_short == pytest.approx(counted_long - counted_short, rel=0.005)


def _generation_flops(pipe, **kw) -> int:
    """FLOPs torch counts inside the transformer's calls of one generation (scoring included)."""
    counter, total = FlopCounterMode(display=False), []

    def enter(*args):
        counter.__enter__()  # (entering resets the counts)

    def leave(*args):
        counter.__exit__(None, None, None)
        total.append(counter.get_total_flops())

    pre, post = pipe.transformer.register_forward_pre_hook(enter), pipe.transformer.register_forward_hook(leave)
    try:
        with sdpa_kernel(SDPBackend.MATH):
            generate(pipe, steps=5, **kw)
    finally:
        pre.remove()
        post.remove()
    return sum(total)


def test_a_generations_reported_savings_are_what_torch_counts(pipe):
    """Stock vs pruned (merge, warm-up scoring and pruning): the report's share of transformer
    FLOPs saved equals the share torch counts, within 1.5 points; on SD3 the merge is its own cause."""
    stock = _generation_flops(pipe)
    # merge_padding's grouping (once per phase, ~L^2 x width, a tenth of a tiny model's call and nothing
    # at real widths) is not counted by the report: left out here; its saving is checked below
    proc = apply_token_pruning(pipe, top_k=2, warmup=0.4, merge_padding=None)
    pruned = _generation_flops(pipe)
    report = proc.report
    assert report.flops_scope == "transformer" and "transformer FLOPs saved" in report.summary()
    assert [s.text_positions for s in report.steps][-1] < report.keep.shape[1]
    assert report.flops_saved == pytest.approx(1 - pruned / stock, abs=0.015)
    shares = report.savings()
    assert shares["scoring"] < 0 < shares["pruning"]
    assert sum(shares.values()) == pytest.approx(report.flops_saved)
    if type(pipe).__name__ == "StableDiffusion3Pipeline":
        assert shares["merge"] > shares["pruning"]  # 333 -> 78 on every call, before the pruned ones shorten it more
    else:
        assert shares["merge"] == 0


def test_a_stock_computed_generation_saves_nothing(pipe):
    proc = apply_token_pruning(pipe, warmup=1.0, merge_zeros=False)
    generate(pipe, steps=3)
    assert proc.report.flops_saved == 0 and all(s.flops_stock > 0 for s in proc.report.steps)


def test_merge_padding_saves_as_a_merge_not_as_pruning(pipe):
    """Keeping every token with the padding merged: the report's saving is the merges' (more than
    the zero merge's alone), none of it pruning, on every call from the first; pruning on top of the
    merge never reports a negative pruning saving (the decision does not split a group)."""
    plain = apply_token_pruning(pipe, threshold=0.0, merge_padding=None)
    generate(pipe, steps=3)
    zero_merge = plain.report.savings()["merge"]
    proc = apply_token_pruning(pipe, threshold=0.0, merge_padding=0.9)
    generate(pipe, steps=3)
    report, full = proc.report, proc.report.keep.shape[1]
    shares = report.savings()
    assert shares["merge"] > zero_merge and shares["pruning"] == 0 and report.keep.all()
    assert all(s.text_positions < full for s in report.steps)
    both = apply_token_pruning(pipe, top_k=2, warmup=0.4, merge_padding=0.9)
    generate(pipe)
    assert both.report.savings()["pruning"] > 0 and all(s.saved["pruning"] >= 0 for s in both.report.steps)

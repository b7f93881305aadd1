"""The SD3-shaped toy: a tiny run resumes exactly, its training shortcut is exact, it exports, loads
offline as a standard StableDiffusion3Pipeline, generates, and token pruning runs on it."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch

pytest.importorskip("diffusers")

from diffusers import StableDiffusion3Pipeline  # noqa: E402
from diffusers.models.attention_processor import JointAttnProcessor2_0  # noqa: E402

from tokenprune_diffusers import apply_token_pruning, remove_token_pruning  # noqa: E402
from tokenprune_diffusers.toy.evaluate import SD3_SETTINGS, EvalConfig, evaluate, markdown_table  # noqa: E402
from tokenprune_diffusers.toy.model import load_toy_pipeline  # noqa: E402
from tokenprune_diffusers.toy.sd3 import SD3ToyConfig, sd3_token_ids  # noqa: E402
from tokenprune_diffusers.toy.train import CHECKPOINT  # noqa: E402
from tokenprune_diffusers.toy.train_sd3 import (  # noqa: E402
    MAX_SEQUENCE_LENGTH,
    SD3TrainConfig,
    compress_zero_tail,
    export_sd3_checkpoint,
    load_sd3_checkpoint,
    train_sd3,
)

TINY = SD3TrainConfig(steps=4, batch_size=4, lr=1e-2, warmup_steps=0, ckpt_every=0, model=SD3ToyConfig.tiny())
PROMPT = "a small red circle on the left and a large blue square on the right, studio lighting"


@pytest.fixture(scope="module")
def straight_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("sd3_straight")
    return train_sd3(TINY, out, progress=False), out


@pytest.fixture(scope="module")
def exported(straight_run, tmp_path_factory):
    folder = tmp_path_factory.mktemp("sd3_weights")
    sizes = export_sd3_checkpoint(straight_run[1], folder)
    return folder, sizes


@pytest.fixture(scope="module")
def pipe(exported):
    return load_toy_pipeline(exported[0], kind="sd3")


def _states(trainer) -> dict[str, torch.Tensor]:
    out = {}
    for name in ("transformer", "text_encoder", "text_encoder_2"):
        out.update({f"{name}.{k}": v for k, v in getattr(trainer, name).state_dict().items()})
    out.update({f"ema.{i}": e for i, e in enumerate(trainer.ema)})
    return out


def test_resume_equals_uninterrupted(tmp_path, straight_run):
    straight = straight_run[0]
    part = train_sd3(TINY, tmp_path, progress=False, stop_after=2)
    assert part.step == 2 and (tmp_path / CHECKPOINT).is_file() and not list(tmp_path.glob("*.tmp"))
    resumed = train_sd3(TINY, tmp_path, progress=False)
    assert resumed.step == straight.step == 4
    assert resumed.history == straight.history
    a, b = _states(straight), _states(resumed)
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k
    assert straight.history[-1][1] != straight.history[0][1]  # it trained


def test_resume_keeps_the_checkpoint_config(tmp_path, straight_run):
    train_sd3(dataclasses.replace(TINY, steps=1), tmp_path, progress=False)
    other = dataclasses.replace(TINY, steps=2, lr=5.0, cond_drop=0.5)  # only steps / ckpt_every are taken
    trainer = train_sd3(other, tmp_path, progress=False)
    assert trainer.config.lr == TINY.lr and trainer.config.cond_drop == TINY.cond_drop and trainer.step == 2
    assert trainer.history[0] == straight_run[0].history[0]


def test_training_shortcut_equals_the_full_zero_padded_sequence(straight_run):
    """One zero position weighted log(256) in attention == the 256 zero positions the pipeline adds."""
    trainer = load_sd3_checkpoint(straight_run[1])
    _, captions = trainer.batch(7)
    with torch.no_grad():
        embeds, _, pooled, _ = trainer.pipe.encode_prompt(captions, None, None, device=torch.device("cpu"),
                                                          do_classifier_free_guidance=False)
        assert embeds.shape[1] == 77 + MAX_SEQUENCE_LENGTH
        short, weights = compress_zero_tail(embeds, 77)
        x = torch.randn((len(captions), 4, 8, 8), generator=torch.Generator().manual_seed(0))
        t = torch.tensor([50.0, 300.0, 700.0, 990.0])
        fast = trainer.transformer(hidden_states=x, timestep=t, encoder_hidden_states=short, pooled_projections=pooled,
                                   joint_attention_kwargs={"key_log_weight": weights}).sample
        trainer.transformer.set_attn_processor(JointAttnProcessor2_0())
        full = trainer.transformer(hidden_states=x, timestep=t, encoder_hidden_states=embeds, pooled_projections=pooled).sample
    assert short.shape[1] == 78
    torch.testing.assert_close(fast, full, rtol=1e-4, atol=1e-5)
    assert full.abs().max() > 0.1


def test_compress_refuses_a_nonzero_tail():
    embeds = torch.zeros(2, 80, 8)
    embeds[1, 79, 3] = 1.0
    with pytest.raises(ValueError, match="zero positions"):
        compress_zero_tail(embeds, 77)


def test_export_is_small_and_loads_as_the_ema_weights(exported, straight_run, pipe):
    folder, sizes = exported
    assert set(sizes) == {"vae.safetensors", "transformer.safetensors", "text_encoder.safetensors",
                          "text_encoder_2.safetensors", "config.json"}
    assert isinstance(pipe, StableDiffusion3Pipeline) and pipe.text_encoder_3 is None and pipe.tokenizer_3 is None
    assert pipe.vae.config.shift_factor == 0.0 and pipe.vae.config.scaling_factor != 1.0
    assert pipe.tokenizer_2.pad_token == "!"
    _, te1, te2, transformer = load_sd3_checkpoint(straight_run[1]).ema_models()
    for a, b in zip(transformer.parameters(), pipe.transformer.parameters()):
        assert torch.equal(a, b)
    ids = torch.tensor(sd3_token_ids())
    for src, dst in ((te1, pipe.text_encoder), (te2, pipe.text_encoder_2)):
        assert torch.equal(src.get_input_embeddings().weight[ids], dst.get_input_embeddings().weight[ids])
        assert torch.equal(src.text_projection.weight, dst.text_projection.weight)
    assert all(isinstance(p, JointAttnProcessor2_0) for p in pipe.transformer.attn_processors.values())


def test_generation_smoke_is_seeded(pipe):
    def run():
        g = torch.Generator().manual_seed(3)
        return pipe(PROMPT, num_inference_steps=2, guidance_scale=3.0, generator=g, output_type="np").images

    a, b = run(), run()
    assert a.shape == (1, 32, 32, 3) and np.isfinite(a).all()
    np.testing.assert_array_equal(a, b)


def test_pruning_runs_and_shortens_the_text_stream(pipe):
    lengths = []
    hook = pipe.transformer.context_embedder.register_forward_pre_hook(lambda m, a: lengths.append(a[0].shape[1]))
    try:
        proc = apply_token_pruning(pipe, threshold=0.3, warmup=0.25, padding="drop")
        with torch.no_grad():
            pipe(PROMPT, num_inference_steps=4, guidance_scale=3.0, generator=torch.Generator().manual_seed(0),
                 output_type="np")
    finally:
        hook.remove()
        remove_token_pruning(pipe)
    rep = proc.report
    assert rep.keep.shape == (2, 77 + MAX_SEQUENCE_LENGTH)
    assert max(lengths) < 40  # padding="drop": the padding is left out from the first call, at most the prompt's tokens remain
    assert rep.steps[-1].kept_counts is not None and lengths[-1] == max(rep.steps[-1].kept_counts)


def test_evaluate_reports_the_sequence_removed(pipe):
    drop = next(s for s in SD3_SETTINGS if s[0] == "threshold 0.1, warmup 0.2, padding drop")
    score = next(s for s in SD3_SETTINGS if s[0] == "threshold 0.1, warmup 0.2")
    merge = next(s for s in SD3_SETTINGS if s[0] == "merge padding 0.9")
    rows = evaluate(pipe, EvalConfig.for_kind("sd3", n=2, steps=2, batch_size=2),
                    settings=(SD3_SETTINGS[0], drop, score, merge), progress=False)
    assert [r["setting"] for r in rows] == ["stock", "stock", drop[0], drop[0], score[0], score[0], merge[0], merge[0]]
    # merge_padding keeps every token (threshold 0) and still shortens the calls after the warm-up
    assert rows[6]["positions_pruned"] == 0.0 and rows[6]["sequence_removed"] > 1 - 78 / 333
    # padding "score": the negative prompt's row keeps its CLIP padding; what goes is the zero merge's, on every call
    assert rows[4]["sequence_removed_generation"] == pytest.approx(1 - 78 / 333)
    assert rows[0]["sequence_removed"] == 0.0
    assert rows[2]["sequence_removed"] > 0.8  # padding "drop": the 256 zero and the CLIP padding positions go
    assert rows[2]["sequence_removed"] >= rows[2]["sequence_removed_generation"] > 0.0
    table = markdown_table(rows, kind="sd3")
    assert "text sequence removed" in table and "x-attn FLOPs" not in table


def test_bad_kind_and_missing_weights_are_refused(tmp_path):
    with pytest.raises(ValueError, match="'flux'"):
        load_toy_pipeline(kind="dit")  # the message names the kinds
    with pytest.raises(FileNotFoundError, match="transformer.safetensors"):
        load_toy_pipeline(tmp_path, kind="sd3")
    with pytest.raises(ValueError, match="'dit'"):
        EvalConfig.for_kind("dit")


def test_a_fine_tuning_stage_starts_from_the_exported_weights(tmp_path, exported, pipe):
    """init_from: step 0 of the new run holds the exported transformer (and the EMA starts there)."""
    config = dataclasses.replace(TINY, steps=0, init_from=str(exported[0]))
    trainer = train_sd3(config, tmp_path / "ft", progress=False)
    for name, p in pipe.transformer.state_dict().items():
        torch.testing.assert_close(trainer.transformer.state_dict()[name], p, rtol=0, atol=0)
    torch.testing.assert_close(trainer.ema[0], trainer.params[0].detach(), rtol=0, atol=0)
    with pytest.raises(FileNotFoundError):
        train_sd3(dataclasses.replace(TINY, init_from=str(tmp_path / "nowhere")), tmp_path / "bad", progress=False)

"""The Flux-shaped toy: a tiny run resumes exactly, exports, loads offline as a standard FluxPipeline
(T5 text stream padded to max_sequence_length, no attention mask), generates, and token pruning runs on it."""

from __future__ import annotations

import numpy as np
import pytest
import torch

pytest.importorskip("diffusers")

from diffusers import FluxPipeline  # noqa: E402
from diffusers.models.transformers.transformer_flux import FluxAttnProcessor  # noqa: E402

from tokenprune_diffusers import apply_token_pruning, remove_token_pruning  # noqa: E402
from tokenprune_diffusers.toy.evaluate import FLUX_SETTINGS, EvalConfig, evaluate, markdown_table  # noqa: E402
from tokenprune_diffusers.toy.flux import FluxToyConfig, flux_token_ids, flux_tokenizer  # noqa: E402
from tokenprune_diffusers.toy.model import load_toy_pipeline  # noqa: E402
from tokenprune_diffusers.toy.train import CHECKPOINT  # noqa: E402
from tokenprune_diffusers.toy.train_flux import (  # noqa: E402
    FluxTrainConfig,
    export_flux_checkpoint,
    load_flux_checkpoint,
    train_flux,
)

MODEL = FluxToyConfig.tiny()
TINY = FluxTrainConfig(steps=3, batch_size=4, lr=1e-2, warmup_steps=0, ckpt_every=0, model=MODEL)
PROMPT = "a small red circle on the left and a large cyan square on the right, studio lighting"


@pytest.fixture(scope="module")
def straight_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("flux_straight")
    return train_flux(TINY, out, progress=False), out


@pytest.fixture(scope="module")
def exported(straight_run, tmp_path_factory):
    folder = tmp_path_factory.mktemp("flux_weights")
    return folder, export_flux_checkpoint(straight_run[1], folder)


@pytest.fixture(scope="module")
def pipe(exported):
    return load_toy_pipeline(exported[0], kind="flux")


def _states(trainer) -> dict[str, torch.Tensor]:
    out = {}
    for name in ("transformer", "text_encoder", "text_encoder_2"):
        out.update({f"{name}.{k}": v for k, v in getattr(trainer, name).state_dict().items()})
    out.update({f"ema.{i}": e for i, e in enumerate(trainer.ema)})
    return out


def test_one_step_resumes_bit_exactly(tmp_path, straight_run):
    straight = straight_run[0]
    part = train_flux(TINY, tmp_path, progress=False, stop_after=2)
    assert part.step == 2 and (tmp_path / CHECKPOINT).is_file() and not list(tmp_path.glob("*.tmp"))
    resumed = train_flux(TINY, tmp_path, progress=False)  # one more step, from the checkpoint
    assert resumed.step == straight.step == 3 and resumed.config.model == MODEL
    assert resumed.history == straight.history
    a, b = _states(straight), _states(resumed)
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k
    assert straight.history[-1][1] != straight.history[0][1]  # it trained


def test_every_caption_word_has_its_own_t5_token():
    tok = flux_tokenizer(MODEL)
    ids = tok(PROMPT, padding="max_length", max_length=MODEL.max_sequence_length).input_ids
    assert tok.unk_token_id not in ids  # "cyan" is no whole CLIP word: the toy's tokenizer adds it
    words = len(PROMPT.replace(",", " ,").split())
    assert ids[words] == tok.eos_token_id and set(ids[words + 1:]) == {tok.pad_token_id}  # T5's layout: padding after </s>


def test_t5_word_embeddings_are_the_clip_toys_and_frozen(straight_run):
    trainer = load_flux_checkpoint(straight_run[1])
    tok, clip_tok = trainer.pipe.tokenizer_2, trainer.pipe.tokenizer
    t5_emb, clip_emb = trainer.text_encoder_2.get_input_embeddings().weight, trainer.text_encoder.get_input_embeddings().weight
    assert torch.equal(t5_emb[tok.convert_tokens_to_ids("circle")], clip_emb[clip_tok.convert_tokens_to_ids("circle</w>")])
    assert not t5_emb.requires_grad and all(p.requires_grad for p in trainer.transformer.parameters())


def test_export_is_small_and_loads_as_the_ema_weights(exported, straight_run, pipe):
    folder, sizes = exported
    assert set(sizes) == {"vae.safetensors", "transformer.safetensors", "text_encoder.safetensors",
                          "text_encoder_2.safetensors", "config.json"}
    assert sizes["text_encoder_2.safetensors"] < 1_000_000  # only the toy's embedding rows are stored
    assert isinstance(pipe, FluxPipeline) and pipe.vae.config.shift_factor == 0.0
    assert not pipe.transformer.config.guidance_embeds
    _, clip, t5, transformer = load_flux_checkpoint(straight_run[1]).ema_models()
    for a, b in zip(transformer.parameters(), pipe.transformer.parameters()):
        assert torch.equal(a, b)
    clip_ids, t5_ids = (torch.tensor(x) for x in flux_token_ids(MODEL))
    assert torch.equal(clip.get_input_embeddings().weight[clip_ids], pipe.text_encoder.get_input_embeddings().weight[clip_ids])
    assert torch.equal(t5.get_input_embeddings().weight[t5_ids], pipe.text_encoder_2.get_input_embeddings().weight[t5_ids])
    assert pipe.text_encoder_2.encoder.embed_tokens.weight is pipe.text_encoder_2.get_input_embeddings().weight
    assert all(isinstance(p, FluxAttnProcessor) for p in pipe.transformer.attn_processors.values())


def test_generation_smoke_is_seeded_and_32px(pipe):
    def run():
        return pipe(PROMPT, num_inference_steps=2, generator=torch.Generator().manual_seed(3), output_type="np",
                    max_sequence_length=MODEL.max_sequence_length).images

    a, b = run(), run()
    assert a.shape == (1, 32, 32, 3) and np.isfinite(a).all()
    np.testing.assert_array_equal(a, b)


def test_pruning_runs_and_shortens_the_text_stream(pipe):
    lengths = []
    hook = pipe.transformer.context_embedder.register_forward_pre_hook(lambda m, a: lengths.append(a[0].shape[1]))
    try:
        proc = apply_token_pruning(pipe, warmup=0.25, padding="drop")
        with torch.no_grad():
            pipe(PROMPT, num_inference_steps=4, generator=torch.Generator().manual_seed(0), output_type="np",
                 max_sequence_length=MODEL.max_sequence_length)
    finally:
        hook.remove()
        remove_token_pruning(pipe)
    assert proc.report.keep.shape == (1, MODEL.max_sequence_length)
    words = len(PROMPT.replace(",", " ,").split())  # 18 T5 tokens
    assert max(lengths) <= words + 1  # padding "drop": from the first call only the prompt's tokens and </s> run
    assert lengths[-1] == max(proc.report.steps[-1].kept_counts)


def test_evaluate_reports_the_sequence_removed(pipe):
    settings = (FLUX_SETTINGS[0], next(s for s in FLUX_SETTINGS if s[0] == "padding drop, warmup 0.2"))
    config = EvalConfig.for_kind("flux", n=2, steps=2, batch_size=2)
    assert config.max_sequence_length == FluxToyConfig().max_sequence_length
    rows = evaluate(pipe, EvalConfig.for_kind("flux", n=2, steps=2, batch_size=2, max_sequence_length=32),
                    settings=settings, progress=False)
    assert [r["setting"] for r in rows] == ["stock", "stock", settings[1][0], settings[1][0]]
    assert rows[0]["sequence_removed"] == 0.0
    assert rows[2]["sequence_removed"] > 0.5  # the padding of 32 positions after a one-object prompt goes
    assert rows[2]["other_pruned"] < 1.0  # "</s>" and "<pad>" are not counted as words
    assert "text sequence removed" in markdown_table(rows, kind="flux")


def test_bad_config_and_missing_weights_are_refused(tmp_path):
    with pytest.raises(FileNotFoundError, match="transformer.safetensors"):
        load_toy_pipeline(tmp_path, kind="flux")
    with pytest.raises(ValueError, match="max_sequence_length"):
        FluxToyConfig(max_sequence_length=1024)
    with pytest.raises(ValueError, match="axes_dims_rope"):
        FluxToyConfig(transformer=FluxToyConfig().transformer | dict(axes_dims_rope=(4, 4, 4)))

"""Training the toy model: a tiny run learns, resumes exactly, exports and loads offline."""

from __future__ import annotations

import dataclasses

import pytest
import torch

pytest.importorskip("diffusers")

from tokenprune_diffusers.toy.model import ToyModelConfig, data_token_ids, load_toy_pipeline  # noqa: E402
from tokenprune_diffusers.toy.train import CHECKPOINT, TrainConfig, export_checkpoint, load_checkpoint, train  # noqa: E402

TINY = TrainConfig(
    steps=4, vae_steps=2, batch_size=4, lr=1e-2, warmup_steps=0, ckpt_every=0, scale_samples=8, model=ToyModelConfig.tiny()
)


@pytest.fixture(scope="module")
def straight_run(tmp_path_factory):
    """An uninterrupted tiny run (2 VAE steps, 4 UNet steps) and its folder."""
    out = tmp_path_factory.mktemp("straight")
    return train(TINY, out, progress=False), out


def _states(trainer) -> dict[str, torch.Tensor]:
    out = {}
    for name in ("vae", "text_encoder", "unet"):
        out.update({f"{name}.{k}": v for k, v in getattr(trainer, name).state_dict().items()})
    out.update({f"ema.{i}": e for i, e in enumerate(trainer.ema)})
    return out


@pytest.mark.slow
def test_tiny_run_decreases_loss(tmp_path):
    cfg = dataclasses.replace(TINY, steps=0, vae_steps=5, batch_size=8)
    trainer = train(cfg, tmp_path, progress=False)  # VAE phase only
    vae_losses = [loss for _, loss in trainer.history]
    assert vae_losses[-1] < 0.8 * vae_losses[0]
    before = trainer.eval_loss(num_batches=1)
    trainer = train(dataclasses.replace(cfg, steps=8), tmp_path, progress=False)  # resumes into phase 2
    assert trainer.step == 13 and len(trainer.history) == 13
    after = trainer.eval_loss(num_batches=1)
    assert after < 0.8 * before, (before, after)


def test_resume_equals_uninterrupted(tmp_path, straight_run):
    straight = straight_run[0]
    part = train(TINY, tmp_path / "b", progress=False, stop_after=3)  # stops in phase 2
    assert part.step == 3
    assert (tmp_path / "b" / CHECKPOINT).is_file() and not list((tmp_path / "b").glob("*.tmp"))
    resumed = train(TINY, tmp_path / "b", progress=False)
    assert resumed.step == straight.step == 6
    assert resumed.history == straight.history
    a, b = _states(straight), _states(resumed)
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k
    assert straight.vae.config.scaling_factor == resumed.vae.config.scaling_factor != 1.0


def test_export_and_load_offline(tmp_path, straight_run):
    trainer, run = straight_run
    sizes = export_checkpoint(run, tmp_path / "weights")
    assert set(sizes) == {"vae.safetensors", "unet.safetensors", "text_encoder.safetensors", "config.json"}
    pipe = load_toy_pipeline(tmp_path / "weights")
    ema = load_checkpoint(run).ema_models()
    for got, want in zip(pipe.unet.parameters(), ema[2].parameters()):
        assert torch.equal(got, want)
    assert pipe.vae.config.scaling_factor == trainer.vae.config.scaling_factor
    # only the data set's embedding rows are stored; on the data set's words the encoder is unchanged
    ids = pipe.tokenizer(["a small red circle on the left, 4k"], padding="max_length", max_length=77, return_tensors="pt").input_ids
    assert set(ids.flatten().tolist()) <= set(data_token_ids(pipe.tokenizer))
    with torch.no_grad():
        assert torch.allclose(pipe.text_encoder(ids)[0], ema[1](ids)[0], atol=1e-6)
    image = pipe("a small red circle on the left", num_inference_steps=2, generator=torch.Generator().manual_seed(0),
                 output_type="np").images
    assert image.shape == (1, 32, 32, 3)


def test_missing_weights_raise_clear_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="unet.safetensors"):
        load_toy_pipeline(tmp_path)


@pytest.mark.parametrize("kwargs", [dict(steps=-1), dict(batch_size=0), dict(cond_drop=1.0), dict(vae_steps=1.5), dict(scale_samples=1)])
def test_bad_train_config_is_refused(kwargs):
    with pytest.raises(ValueError, match=next(iter(kwargs))):
        TrainConfig(**kwargs)


def test_mismatched_model_config_is_refused():
    with pytest.raises(ValueError, match="cross_attention_dim"):
        ToyModelConfig(unet=ToyModelConfig().unet | dict(cross_attention_dim=32))

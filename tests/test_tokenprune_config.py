import pytest

pytest.importorskip("diffusers")

from tokenprune_diffusers import TokenPruneConfig, TokenPruneProcessor  # noqa: E402


@pytest.mark.parametrize(
    "kwargs, needle",
    [
        (dict(threshold=1.5), "threshold must be a number in [0, 1], got 1.5"),
        (dict(threshold=-0.1), "got -0.1"),
        (dict(threshold="0.1"), "got '0.1'"),
        (dict(warmup=1.2), "warmup must be a number in [0, 1], got 1.2"),
        (dict(warmup=True), "got True"),
        (dict(keep_ratio=2.0), "keep_ratio must be a number in [0, 1], got 2.0"),
        (dict(top_k=-1), "top_k must be a non-negative int, got -1"),
        (dict(min_tokens=1.5), "min_tokens must be a non-negative int, got 1.5"),
        (dict(padding="ignore"), "padding must be one of ('score', 'keep', 'drop'), got 'ignore'"),
        (dict(num_steps=0), "num_steps must be a positive int, got 0"),
        (dict(threshold=0.1, top_k=3), "give one pruning rule, not several: threshold=0.1, top_k=3"),
        (dict(keep_ratio=0.5, top_k=3), "keep_ratio=0.5, top_k=3"),
        (dict(threshold=float("nan")), "threshold must be a number in [0, 1], got nan"),
        (dict(warmup=float("nan")), "warmup must be a number in [0, 1], got nan"),
        (dict(gate=float("nan")), "gate must be a number in [0, 1], got nan"),
        (dict(score_chunk=True), "score_chunk must be a positive int, got True"),
        (dict(record_maps="no"), "record_maps must be True or False, got 'no'"),
        (dict(reuse_kv=1), "reuse_kv must be True or False, got 1"),
    ],
)
def test_bad_options_are_refused_at_construction_naming_the_value(kwargs, needle):
    with pytest.raises(ValueError) as err:
        TokenPruneProcessor(**kwargs)
    assert needle in str(err.value)


def test_unknown_option_is_a_type_error_naming_it_and_the_options():
    with pytest.raises(TypeError, match="unknown token-pruning option.*treshold.*the options are: .*threshold"):
        TokenPruneProcessor(treshold=0.1)
    with pytest.raises(TypeError, match="give the options by name"):
        TokenPruneProcessor(0.1)


def test_a_config_object_or_its_options_not_both():
    cfg = TokenPruneConfig(top_k=3)
    assert TokenPruneProcessor(cfg).config is cfg
    with pytest.raises(TypeError, match="not both"):
        TokenPruneProcessor(cfg, warmup=0.5)


def test_default_rule_is_threshold_point_one_and_other_rules_replace_it():
    assert TokenPruneConfig().rule == "threshold" and TokenPruneConfig().threshold == 0.1
    cfg = TokenPruneConfig(top_k=4)
    assert cfg.rule == "top_k" and cfg.threshold is None


def test_the_readme_options_table_is_the_configs_own():
    from pathlib import Path

    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text(encoding="utf-8")
    assert TokenPruneConfig.markdown_table() in readme

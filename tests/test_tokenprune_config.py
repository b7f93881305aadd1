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
    ],
)
def test_bad_options_are_refused_at_construction_naming_the_value(kwargs, needle):
    with pytest.raises(ValueError) as err:
        TokenPruneProcessor(**kwargs)
    assert needle in str(err.value)


def test_unknown_option_is_a_type_error_naming_it():
    with pytest.raises(TypeError, match="treshold"):
        TokenPruneProcessor(treshold=0.1)


def test_default_rule_is_threshold_point_one_and_other_rules_replace_it():
    assert TokenPruneConfig().rule == "threshold" and TokenPruneConfig().threshold == 0.1
    cfg = TokenPruneConfig(top_k=4)
    assert cfg.rule == "top_k" and cfg.threshold is None


@pytest.mark.parametrize("warmup, n, start", [(0.2, 10, 2), (0.2, 11, 3), (0.0, 10, 1), (1.0, 10, 10), (0.5, 3, 2), (0.2, 1, 1)])
def test_prune_start_is_the_first_call_after_the_warmup_share(warmup, n, start):
    assert TokenPruneConfig(warmup=warmup).prune_start(n) == start

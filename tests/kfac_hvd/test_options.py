"""KFACOptions: every option checked once, with an error naming it; the field list a launcher reads."""

import dataclasses
import re

import pytest
import torch
from torch import nn

import kfac_hvd
from kfac_hvd.options import KFACOptions, option_fields


@pytest.mark.parametrize(
    "values,message",
    [
        (dict(damping=0), "damping must be > 0, got 0"),
        (dict(damping=float("nan")), "damping must be > 0, got nan"),
        (dict(damping="1e-3"), "damping must be > 0, got '1e-3'"),
        (dict(update_threshold=0.0), "update_threshold must be > 0 or None, got 0.0"),
        (dict(update_interval=0), "update_interval must be an int >= 1, got 0"),
        (
            dict(interval_policy="every"),
            "interval_policy must be one of ('modulo', 'since_last'), got 'every'",
        ),
        (dict(max_interval=0), "max_interval must be an int >= 1 or None, got 0"),
        (dict(shrink_multiple=1.0), "shrink_multiple must be > 1 or None, got 1.0"),
        (dict(factor_decay=1.0), "factor_decay must be in [0, 1) or None, got 1.0"),
        (dict(factor_decay=-0.1), "factor_decay must be in [0, 1) or None, got -0.1"),
        (dict(kl_clip=0), "kl_clip must be > 0 or None, got 0"),
        (dict(inverse_method="lu"), "inverse_method must be one of ('cholesky', 'eigen'), got 'lu'"),
        (
            dict(inverse_method=["eigen"]),
            "inverse_method must be one of ('cholesky', 'eigen'), got ['eigen']",
        ),
        (dict(batched_inversion="yes"), "batched_inversion must be True or False, got 'yes'"),
        (dict(narrow_factor_products=1), "narrow_factor_products must be True or False, got 1"),
        (dict(accumulation_steps=True), "accumulation_steps must be an int >= 1, got True"),
        (dict(local_inverse_max_dim=-1), "local_inverse_max_dim must be an int >= 0, got -1"),
        (dict(unfold_chunk_bytes=1.5), "unfold_chunk_bytes must be an int >= 1, got 1.5"),
        (dict(factor_matmul_precision="tf32"), "factor_matmul_precision must be one of ('highest', 'high')"),
        (
            dict(factor_dtype=torch.float16),
            "factor_dtype must be one of (torch.float32, torch.float64) or None",
        ),
        (dict(skip_layers=[1]), "skip_layers must be a sequence of regular expressions, got (1,)"),
        (dict(skip_layers="layer4.("), "skip_layers: 'layer4.(' is not a regular expression"),
    ],
)
def test_a_bad_value_is_refused_with_the_option_named(values, message):
    with pytest.raises(ValueError, match="^" + re.escape(message)):
        KFACOptions(**values)
    with pytest.raises(ValueError, match="^" + re.escape(message)):
        kfac_hvd.KFAC(nn.Linear(2, 2), **values)


def test_bounds_are_inclusive_where_they_say_so():
    options = KFACOptions(factor_decay=0.0, max_interval=1, local_inverse_max_dim=0, damping=1)
    assert (options.factor_decay, options.max_interval, options.local_inverse_max_dim) == (0.0, 1, 0)


def test_unknown_names_and_positional_values_are_refused():
    with pytest.raises(TypeError, match="update_treshold"):
        KFACOptions(update_treshold=0.25)
    with pytest.raises(TypeError):
        KFACOptions(1e-3)  # type: ignore[misc]
    with pytest.raises(TypeError, match="not both"):
        kfac_hvd.KFAC(nn.Linear(2, 2), options=KFACOptions(), damping=0.1)


def test_options_are_frozen_and_a_replace_is_checked_again():
    options = KFACOptions(skip_layers="^fc$")
    assert options.skip_layers == ("^fc$",)  # one pattern is a sequence of one
    with pytest.raises(dataclasses.FrozenInstanceError):
        options.damping = 0.5  # type: ignore[misc]
    with pytest.raises(ValueError, match="damping"):
        dataclasses.replace(options, damping=-1.0)


def test_kfac_built_from_options_or_keywords_is_the_same():
    options = KFACOptions(damping=0.01, update_threshold=0.25, update_interval=2, skip_layers=["^1$"])
    by_keywords = kfac_hvd.KFAC(
        nn.Sequential(nn.Linear(2, 2), nn.Linear(2, 2)), **dataclasses.asdict(options)
    )
    by_options = kfac_hvd.KFAC(nn.Sequential(nn.Linear(2, 2), nn.Linear(2, 2)), options=options)
    assert by_keywords.options == by_options.options == options
    assert by_options.layer_names == ["0"]
    assert by_options.scheduler.options == options.schedule
    assert by_options.scheduler.interval == {"0": 2}


def test_option_fields_describe_every_option_for_a_launcher():
    described = {option.name: option for option in option_fields()}
    assert list(described) == [spec.name for spec in dataclasses.fields(KFACOptions)]
    assert all(option.doc and "\n" not in option.doc for option in described.values())
    assert described["damping"].gt == 0 and described["damping"].annotation is float
    assert described["update_threshold"].nullable and described["update_threshold"].annotation is float
    assert not described["update_interval"].nullable and described["update_interval"].ge == 1
    assert (described["factor_decay"].ge, described["factor_decay"].lt) == (0, 1)
    assert described["inverse_method"].choices == ("cholesky", "eigen")
    assert described["unfold_chunk_bytes"].unit == "bytes"
    assert described["factor_dtype"].annotation is torch.dtype and described["factor_dtype"].nullable
    # every default passes its own checks, and the defaults are KFACOptions()'s
    assert {name: option.default for name, option in described.items()} == dataclasses.asdict(KFACOptions())

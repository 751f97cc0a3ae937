"""distmerge.validate: the config checks every reader shares, and the words of their messages."""

from __future__ import annotations

import math

import pytest

from distmerge import validate
from distmerge.errors import ConfigError


@pytest.mark.parametrize("kwargs, value, message", [
    ({}, "heavy", "x: expected a number, got 'heavy'"),
    ({}, True, "x: expected a number, got True"),
    ({}, math.nan, "x: nan is not a finite number"),
    ({}, -math.inf, "x: -inf is not a finite number"),
    ({"lo": 0.0, "hi": 1.0, "lo_open": True}, 0.0, "x: 0.0 is out of range (0.0, 1.0]"),
    ({"lo": 0.0, "hi": 1.0, "lo_open": True}, 2, "x: 2 is out of range (0.0, 1.0]"),
    ({"lo": 0, "hi": 1, "hi_open": True}, 1, "x: 1 is out of range [0, 1)"),
    ({"lo": 0, "lo_open": True}, -1, "x: -1 is out of range (0, inf)"),
    ({"hi": 5}, 6, "x: 6 is out of range (-inf, 5]"),
    ({"integer": True}, 1.0, "x: expected an integer, got 1.0"),
    ({"integer": True}, False, "x: expected an integer, got False"),
    ({"lo": 1, "integer": True}, 0, "x: expected an integer >= 1, got 0"),
    ({"lo": 0, "lo_open": True, "integer": True}, 0, "x: expected an integer >= 1, got 0"),
    ({"lo": 0, "hi": 3, "hi_open": True, "integer": True}, 3, "x: expected an integer in [0, 2], got 3"),
    ({"hi": 2.5, "integer": True}, 3, "x: expected an integer <= 2, got 3"),
])
def test_number_refuses_with_the_key_and_the_range(kwargs, value, message):
    with pytest.raises(ConfigError) as caught:
        validate.number("x", value, **kwargs)
    assert str(caught.value) == message


def test_number_returns_what_it_accepted():
    assert validate.number("x", 1, 0, 1) == 1.0 and isinstance(validate.number("x", 1, 0, 1), float)
    assert validate.number("x", 1e-9, 0, lo_open=True) == 1e-9
    assert validate.number("x", 0, 0, 1, hi_open=True) == 0.0
    assert validate.number("x", 3, 1, integer=True) == 3 and isinstance(validate.number("x", 3, integer=True), int)


def test_choice_flag_and_unknown_keys():
    assert validate.choice("mode", "b", ("a", "b")) == "b"
    with pytest.raises(ConfigError, match=r"^mode: 'c' is not one of a, b$"):
        validate.choice("mode", "c", ("a", "b"))
    with pytest.raises(ConfigError, match=r"^levels: 3 is not one of 1, 2$"):
        validate.choice("levels", 3, (1, 2))
    assert validate.flag("plus", False) is False
    with pytest.raises(ConfigError, match=r"^plus: expected true or false, got 'yes'$"):
        validate.flag("plus", "yes")
    validate.no_unknown("adapt", {"lr": 1}, {"lr", "epochs"})
    with pytest.raises(ConfigError, match=r"^adapt\.epoch: unknown key \(allowed: epochs, lr\)$"):
        validate.no_unknown("adapt", {"lr": 1, "epoch": 3, "zz": 1}, {"lr", "epochs"})
    with pytest.raises(ConfigError, match=r"^modle: unknown key \(allowed: model\)$"):
        validate.no_unknown("", {"modle": 1}, ("model",))


def test_dtype_names_and_safetensors_codes_agree():
    """One table of names and one of on-disk codes: every name a config may give can be written and read back,
    and each name's size and kind are torch's own."""
    import torch

    from distmerge import dtypes

    assert dtypes.torch_dtype("bfloat16") is torch.bfloat16 and dtypes.torch_dtype("float64") is torch.float64
    assert dtypes.torch_dtype(torch.int8) is torch.int8 and dtypes.name_of(torch.float8_e4m3fn) == "float8_e4m3fn"
    assert set(dtypes.FULL_PRECISION) | set(dtypes.STORAGE) == set(dtypes.NAMES)
    assert all(dtypes.SAFETENSORS[dtypes.CODES[name]] == name for name in dtypes.CODES)
    assert len(dtypes.CODES) == len(dtypes.SAFETENSORS) and set(dtypes.NAMES) <= set(dtypes.CODES)
    for name in dtypes.CODES:
        dtype = dtypes.torch_dtype(name)
        assert dtypes.itemsize(name) == dtype.itemsize, name
        assert dtypes.is_floating(name) == dtype.is_floating_point, name
    assert [dtypes.kind(n) for n in ("bfloat16", "int64", "bool", "complex64")] == \
        ["floating-point", "integer", "boolean", "complex"]
    assert dtypes.itemsize("complex64") == 8  # a .bin file's rarer dtype: torch's own size
    assert dtypes.is_floating("float8_e5m2fnuz") and dtypes.kind("float8_e4m3fnuz") == "floating-point"

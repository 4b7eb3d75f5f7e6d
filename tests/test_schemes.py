import pytest
from pydantic import ValidationError

from quantoracle.errors import SchemeError
from quantoracle.schemes import (
    NVFP4_ACT_DYNAMIC,
    NVFP4_WEIGHT,
    SCHEMES,
    W4A4_NVFP4,
    W4A16_NVFP4,
    GroupShape,
    QuantKey,
    Scheme,
    ScaleDesc,
)


def test_named_nvfp4_keys_follow_the_format():
    assert NVFP4_WEIGHT.dtype == "fp4_e2m1"
    assert NVFP4_WEIGHT.scale == ScaleDesc(dtype="fp8_e4m3", group=GroupShape(rows=1, cols=16), static=True)
    assert NVFP4_WEIGHT.scale2.dtype == "float32" and NVFP4_WEIGHT.scale2.group == GroupShape(rows=-1, cols=-1)
    assert NVFP4_ACT_DYNAMIC.scale.static is False and NVFP4_ACT_DYNAMIC.scale2.static is True
    assert W4A16_NVFP4.activation is None and W4A16_NVFP4.weight_only
    assert W4A4_NVFP4.as_weight_only() == W4A16_NVFP4


@pytest.mark.parametrize("name", sorted(SCHEMES))
def test_every_named_scheme_round_trips_through_json_and_name(name):
    scheme = SCHEMES[name]
    assert Scheme.model_validate_json(scheme.model_dump_json()) == scheme
    assert Scheme.from_name(name.upper()) is scheme
    assert str(scheme) == name
    assert hash(Scheme.model_validate_json(scheme.model_dump_json())) == hash(scheme)


def test_unknown_scheme_name_lists_known_ones():
    with pytest.raises(SchemeError, match="w4a16_nvfp4"):
        Scheme.from_name("w4a8_nvfp4")


@pytest.mark.parametrize(
    "build, field",
    [
        (lambda: GroupShape(rows=0, cols=16), "rows"),
        (lambda: GroupShape(rows=1, cols=-2), "cols"),
        (lambda: QuantKey(dtype="fp4_e2m1"), "scale"),
        (lambda: ScaleDesc(dtype="int4", group=GroupShape(rows=1, cols=16), static=True), "dtype"),
        (lambda: QuantKey(dtype="bfloat16"), "dtype"),
        (lambda: QuantKey(dtype="fp4_e2m1", scale=NVFP4_WEIGHT.scale, colour="red"), "colour"),
    ],
)
def test_invalid_keys_are_rejected_naming_the_field(build, field):
    with pytest.raises(ValidationError, match=field):
        build()


def test_keys_are_frozen_and_readable():
    with pytest.raises(ValidationError):
        NVFP4_WEIGHT.dtype = "int4"
    assert str(NVFP4_WEIGHT) == "fp4_e2m1[fp8_e4m3 per 1x16 static; float32 per tensor static]"

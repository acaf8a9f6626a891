"""Profiles from the envelope, and the TensorRT rules they are checked against (pure logic)."""

from __future__ import annotations

import copy

import pytest

from llmopt.errors import UserError
from llmopt.recipe import Envelope
from llmopt.trt.profiles import (DECODE, PREFILL, Profile, ShapeRange, derive_profiles, outside, profile_for_step,
                                 validate_profiles)

from .conftest import HEAD_DIM, KV_HEADS, make_io

ENV = Envelope(batch=(1, 2, 4), input_len=(1, 128, 1024), total_len=(1, 512, 2048))
KV = "past_key_values.0.key"


def ranges(p: Profile, name: str) -> tuple:
    r = p.shapes[name]
    return r.min, r.opt, r.max


def test_prefill_profile_from_envelope() -> None:
    prefill, decode = derive_profiles(ENV, make_io())
    assert (prefill.name, decode.name) == ("prefill", "decode")
    assert ranges(prefill, "input_ids") == ((1, 1), (2, 128), (4, 1024))
    assert ranges(prefill, "position_ids") == ((1, 1), (2, 128), (4, 1024))
    # past 0..(total max - input max): every shape in the box keeps total <= total_len max
    assert ranges(prefill, KV) == ((1, KV_HEADS, 0, HEAD_DIM), (2, KV_HEADS, 0, HEAD_DIM), (4, KV_HEADS, 1024, HEAD_DIM))
    assert ranges(prefill, "attention_mask") == ((1, 1), (2, 128), (4, 2048))


def test_decode_profile_from_envelope() -> None:
    _, decode = derive_profiles(ENV, make_io())
    assert ranges(decode, "input_ids") == ((1, 1), (2, 1), (4, 1))
    assert ranges(decode, KV) == ((1, KV_HEADS, 1, HEAD_DIM), (2, KV_HEADS, 511, HEAD_DIM),
                                  (4, KV_HEADS, 2047, HEAD_DIM))
    assert ranges(decode, "attention_mask") == ((1, 2), (2, 512), (4, 2048))


def test_every_input_in_both_profiles() -> None:
    io = make_io()
    for p in derive_profiles(ENV, io):
        assert set(p.shapes) == {t["name"] for t in io["inputs"]}


def test_prompt_as_long_as_total_leaves_no_past_in_prefill() -> None:
    env = Envelope(batch=(1, 1, 1), input_len=(4, 8, 64), total_len=(1, 32, 64))
    prefill, decode = derive_profiles(env, make_io())
    assert ranges(prefill, KV)[2][2] == 0
    assert ranges(prefill, "attention_mask") == ((1, 4), (1, 8), (1, 64))
    assert ranges(decode, KV)[1][2] == 31


def test_total_len_of_one_cannot_decode() -> None:
    env = Envelope(batch=(1, 1, 1), input_len=(1, 1, 1), total_len=(1, 1, 1))
    with pytest.raises(UserError, match="decode profile needs at least 2"):
        derive_profiles(env, make_io())


def test_unknown_symbolic_dim_is_named() -> None:
    io = make_io()
    io["inputs"][0]["shape"] = ["batch", "sequence"]
    with pytest.raises(UserError, match="input_ids axis 1 is the symbolic dim 'sequence'"):
        derive_profiles(ENV, io)


def test_export_with_wrong_kv_heads_is_caught() -> None:
    io = make_io()
    io["num_kv_heads"] = KV_HEADS + 1  # io.json metadata disagrees with its own input shapes
    with pytest.raises(UserError, match=r"'past_key_values.0.key' axis 1 \(kv_heads\) must be fixed"):
        derive_profiles(ENV, io)


def _profiles() -> tuple[list[Profile], dict]:
    io = make_io()
    return derive_profiles(ENV, io), io


def _replace(p: Profile, name: str, rng: ShapeRange) -> Profile:
    shapes = dict(p.shapes)
    shapes[name] = rng
    return Profile(p.name, shapes)


@pytest.mark.parametrize("rng, rule", [
    (ShapeRange((1, 1, 1), (1, 1), (1, 1)), "rank"),
    (ShapeRange((2, 1), (1, 1), (4, 8)), r"0 <= min <= opt <= max"),
    (ShapeRange((1, 1), (1, 9), (4, 8)), r"0 <= min <= opt <= max"),
    (ShapeRange((-1, 1), (1, 1), (4, 8)), r"0 <= min <= opt <= max"),
])
def test_trt_rules_name_input_and_rule(rng: ShapeRange, rule: str) -> None:
    profiles, io = _profiles()
    bad = [_replace(profiles[0], "input_ids", rng), profiles[1]]
    with pytest.raises(UserError, match=rf"profile 'prefill': input 'input_ids'.*{rule}"):
        validate_profiles(bad, io["inputs"])


def test_fixed_dim_must_equal_network() -> None:
    profiles, io = _profiles()
    r = profiles[1].shapes[KV]
    wrong = ShapeRange((r.min[0], 8, *r.min[2:]), (r.opt[0], 8, *r.opt[2:]), (r.max[0], 8, *r.max[2:]))
    with pytest.raises(UserError, match=rf"'decode': input '{KV}' axis 1 is fixed at {KV_HEADS}"):
        validate_profiles([profiles[0], _replace(profiles[1], KV, wrong)], io["inputs"])


def test_missing_dynamic_input_and_unknown_input() -> None:
    profiles, io = _profiles()
    shapes = dict(profiles[0].shapes)
    del shapes["position_ids"]
    with pytest.raises(UserError, match="input 'position_ids' has dynamic dims but no min/opt/max"):
        validate_profiles([Profile("prefill", shapes)], io["inputs"])
    extra = _replace(profiles[0], "token_type_ids", ShapeRange((1, 1), (1, 1), (1, 1)))
    with pytest.raises(UserError, match="'token_type_ids' is not an input of the network"):
        validate_profiles([extra], io["inputs"])


def test_mask_must_cover_past_plus_seq() -> None:
    profiles, io = _profiles()
    r = profiles[1].shapes["attention_mask"]
    off = ShapeRange(r.min, (r.opt[0], r.opt[1] + 1), r.max)
    with pytest.raises(UserError, match=r"'decode': opt total 513 .* != past 511 \+ seq 1"):
        validate_profiles([profiles[0], _replace(profiles[1], "attention_mask", off)], io["inputs"])


def test_one_dim_one_value() -> None:
    profiles, io = _profiles()
    off = ShapeRange((1, 1), (3, 1), (4, 1))  # batch opt 3 where every other input says 2
    with pytest.raises(UserError, match="opt of dim 'batch' is"):
        validate_profiles([profiles[0], _replace(profiles[1], "input_ids", off)], io["inputs"])


def test_validates_against_a_parsed_network() -> None:
    profiles, io = _profiles()
    network = [{"name": t["name"], "shape": [d if isinstance(d, int) else -1 for d in t["shape"]]}
               for t in io["inputs"]]
    validate_profiles(profiles, network)
    network[3]["shape"][3] = HEAD_DIM * 2
    with pytest.raises(UserError, match=f"axis 3 is fixed at {HEAD_DIM * 2}"):
        validate_profiles(profiles, network)


def test_step_picks_profile() -> None:
    assert profile_for_step(past=0, seq=7) == PREFILL
    assert profile_for_step(past=0, seq=1) == PREFILL  # a one-token prompt: the decode profile has past >= 1
    assert profile_for_step(past=7, seq=1) == DECODE
    assert profile_for_step(past=7, seq=3) == PREFILL


def test_outside_names_the_shape() -> None:
    profiles, _ = _profiles()
    assert outside(profiles[1], {"input_ids": (4, 1), KV: (4, KV_HEADS, 2047, HEAD_DIM)}) is None
    assert outside(profiles[1], {"input_ids": (5, 1)}) == "input 'input_ids' axis 0 is 5, the decode profile allows 1..4"
    assert "axis 1 is 2000" in outside(profiles[0], {"input_ids": (1, 2000)})


def test_json_round_trip() -> None:
    profiles, _ = _profiles()
    assert [Profile.from_json(copy.deepcopy(p.to_json())) for p in profiles] == profiles

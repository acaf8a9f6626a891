"""TensorRT optimization profiles derived from the serving envelope, and their validation.

Two profiles, both with every dimension internally consistent (``total = past + seq`` holds at min, at
opt and at max, so the builder never times an impossible shape combination):

profile 0, ``prefill`` (a prompt, or any multi-token step)
    seq   = input_len (min, opt, max)    -- seq min is input_len.min (usually 1), not 2: a one-token
                                            prompt has past 0, which the decode profile does not cover
    past  = 0, 0, total_len.max - input_len.max
                                         -- "past 0..max": the largest past that still fits beside the
                                            longest prompt; opt 0 because a prefill starts from an empty cache
    total = seq + past                   -- i.e. input_len.min, input_len.opt, total_len.max
profile 1, ``decode`` (one new token on top of a cache)
    seq   = 1, 1, 1
    past  = 1, clamp(total_len.opt - 1), total_len.max - 1
    total = 2, past opt + 1, total_len.max
batch = envelope batch (min, opt, max) in both; kv_heads and head_dim are fixed.

``total_len.min`` does not narrow the profiles: any prompt of at least ``input_len.min`` tokens can be
prefilled and then decoded. The runtime picks profile 0 when the cache is empty or more than one token
is new, profile 1 otherwise (:func:`profile_for_step`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Iterable

from llmopt.errors import UserError
from llmopt.recipe import Envelope

PREFILL, DECODE = 0, 1
SELECTORS = ("min", "opt", "max")
Shape = tuple[int, ...]


@dataclass(frozen=True)
class ShapeRange:
    min: Shape
    opt: Shape
    max: Shape

    def to_json(self) -> dict:
        return {"min": list(self.min), "opt": list(self.opt), "max": list(self.max)}


@dataclass(frozen=True)
class Profile:
    name: str
    shapes: dict[str, ShapeRange]

    def to_json(self) -> dict:
        return {"name": self.name, "shapes": {k: v.to_json() for k, v in self.shapes.items()}}

    @classmethod
    def from_json(cls, data: dict) -> "Profile":
        return cls(data["name"], {k: ShapeRange(*(tuple(int(x) for x in v[s]) for s in SELECTORS))
                                  for k, v in data["shapes"].items()})


def symbol_ranges(envelope: Envelope) -> list[tuple[str, dict[str, tuple[int, int, int]]]]:
    """(profile name, {symbolic dim: (min, opt, max)}) for prefill and decode."""
    b = envelope.batch
    i_min, i_opt, i_max = envelope.input_len
    t_opt, t_max = envelope.total_len[1], envelope.total_len[2]
    if t_max < 2:
        raise UserError(f"envelope.total_len max is {t_max}: the decode profile needs at least 2 "
                        "(one cached token + one new token)", "raise envelope.total_len max")
    prefill_past_max = t_max - i_max
    past_opt = min(max(t_opt - 1, 1), t_max - 1)
    prefill = {"batch": b, "seq": (i_min, i_opt, i_max), "past": (0, 0, prefill_past_max),
               "total": (i_min, i_opt, i_max + prefill_past_max)}
    decode = {"batch": b, "seq": (1, 1, 1), "past": (1, past_opt, t_max - 1),
              "total": (2, past_opt + 1, t_max)}
    return [("prefill", prefill), ("decode", decode)]


def derive_profiles(envelope: Envelope, io: dict) -> list[Profile]:
    """The prefill and decode profiles for every input of ``io.json``, validated."""
    profiles = []
    for name, symbols in symbol_ranges(envelope):
        shapes = {}
        for spec in io["inputs"]:
            dims = []
            for axis, dim in enumerate(spec["shape"]):
                if isinstance(dim, int):
                    dims.append((dim, dim, dim))
                elif dim in symbols:
                    dims.append(symbols[dim])
                else:
                    raise UserError(f"io.json input {spec['name']} axis {axis} is the symbolic dim {dim!r}; "
                                    f"llmopt derives profiles only for {', '.join(symbols)}",
                                    "re-export the model with llmopt export")
            shapes[spec["name"]] = ShapeRange(*(tuple(d[k] for d in dims) for k in range(3)))
        profiles.append(Profile(name, shapes))
    validate_profiles(profiles, io["inputs"], io)
    return profiles


def _is_dynamic(dim: Any) -> bool:
    return not isinstance(dim, int) or dim < 0


def validate_profiles(profiles: list[Profile], inputs: Iterable[dict], io: dict | None = None) -> None:
    """Check profiles against TensorRT's documented rules, then llmopt's own coherence rules.

    ``inputs`` are ``{"name", "shape"}`` entries: io.json's (symbolic dims are strings) or the parsed
    network's (dynamic dims are -1). TensorRT: every dynamic input has min/opt/max in every profile, of
    the input's rank, with 0 <= min <= opt <= max per dim, and fixed dims equal to the network's.
    """
    specs = {s["name"]: list(s["shape"]) for s in inputs}
    for p in profiles:
        where = f"profile '{p.name}'"
        for name in p.shapes:
            if name not in specs:
                raise UserError(f"{where}: '{name}' is not an input of the network",
                                f"inputs: {', '.join(specs)}")
        for name, shape in specs.items():
            rng = p.shapes.get(name)
            if rng is None:
                if any(_is_dynamic(d) for d in shape):
                    raise UserError(f"{where}: input '{name}' has dynamic dims but no min/opt/max shape "
                                    "(TensorRT needs one for every dynamic input in every profile)")
                continue
            _check_input(where, name, shape, rng)
        if any(isinstance(d, str) for s in specs.values() for d in s):
            _check_symbols(where, p, specs)
        if io is not None:
            _check_kv_dims(where, p, io)


def _check_input(where: str, name: str, shape: list, rng: ShapeRange) -> None:
    for sel in SELECTORS:
        got = getattr(rng, sel)
        if len(got) != len(shape):
            raise UserError(f"{where}: input '{name}' {sel} shape {list(got)} has rank {len(got)}, the input "
                            f"has rank {len(shape)} (min/opt/max must have the input's rank)")
    for axis, dim in enumerate(shape):
        lo, opt, hi = rng.min[axis], rng.opt[axis], rng.max[axis]
        if not 0 <= lo <= opt <= hi:
            raise UserError(f"{where}: input '{name}' axis {axis}: min {lo}, opt {opt}, max {hi} violate "
                            "0 <= min <= opt <= max")
        if not _is_dynamic(dim) and not lo == opt == hi == dim:
            raise UserError(f"{where}: input '{name}' axis {axis} is fixed at {dim} in the network but the "
                            f"profile gives min {lo}, opt {opt}, max {hi} (fixed dims must equal the network's)")


def _check_symbols(where: str, p: Profile, specs: dict[str, list]) -> None:
    """Inputs sharing a symbolic dim agree on it, and total = past + seq at min, opt and max."""
    for sel in SELECTORS:
        seen: dict[str, tuple[int, str]] = {}
        for name, shape in specs.items():
            rng = p.shapes.get(name)
            for axis, dim in enumerate(shape):
                if not isinstance(dim, str) or rng is None:
                    continue
                value = getattr(rng, sel)[axis]
                if dim in seen and seen[dim][0] != value:
                    raise UserError(f"{where}: {sel} of dim '{dim}' is {value} for input '{name}' but "
                                    f"{seen[dim][0]} for '{seen[dim][1]}' (one dim, one value)")
                seen.setdefault(dim, (value, name))
        if {"total", "past", "seq"} <= seen.keys():
            total, past, seq = seen["total"][0], seen["past"][0], seen["seq"][0]
            if total != past + seq:
                raise UserError(f"{where}: {sel} total {total} (input '{seen['total'][1]}') != past {past} + "
                                f"seq {seq}: the attention mask covers the cache plus the new tokens")


def _check_kv_dims(where: str, p: Profile, io: dict) -> None:
    layout = io.get("kv_layout", "batch,kv_heads,seq,head_dim").split(",")
    want = {"kv_heads": io["num_kv_heads"], "head_dim": io["head_dim"]}
    for name in (n for pair in io.get("past_names", []) for n in pair):
        rng = p.shapes.get(name)
        if rng is None:
            continue
        for role, value in want.items():
            axis = layout.index(role)
            if axis < len(rng.min) and not rng.min[axis] == rng.opt[axis] == rng.max[axis] == value:
                raise UserError(f"{where}: input '{name}' axis {axis} ({role}) must be fixed at the model's "
                                f"{role} = {value}, got {rng.min[axis]}..{rng.max[axis]}")


def profile_for_step(past: int, seq: int) -> int:
    """Profile 0 (prefill) for an empty cache or several new tokens, profile 1 (decode) otherwise."""
    return PREFILL if past == 0 or seq > 1 else DECODE


def outside(profile: Profile, shapes: dict[str, Shape]) -> str | None:
    """The first input shape outside the profile's [min, max] range, described; None if all fit."""
    for name, shape in shapes.items():
        rng = profile.shapes.get(name)
        if rng is None:
            continue
        for axis, (v, lo, hi) in enumerate(zip(shape, rng.min, rng.max)):
            if not lo <= v <= hi:
                return f"input '{name}' axis {axis} is {v}, the {profile.name} profile allows {lo}..{hi}"
    return None

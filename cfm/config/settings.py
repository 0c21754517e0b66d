"""What every config group is made of: `setting` (a field's default, bounds and choices) and the
checks and records built on it. Imports neither absl nor torch.

A field's name is its flag's name. Its metadata holds what absl checks at parse time (bounds,
choices, list entries that must be positive integers), so `check_config` applies the same checks,
with the same sentences, to a config built in Python; the command line (cfm/cli/) defines each
flag with the same bounds and choices (tests/test_config.py ties the two).
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

from cfm.io.errors import UserError


def setting(default: Any, *, lower: float | None = None, upper: float | None = None,
            choices: tuple | None = None, positive_ints: bool = False, kind: type | None = None,
            flag_default: Any = dataclasses.MISSING) -> Any:
    """A config field: its default and the checks its flag gets from absl.

    lower, upper: inclusive bounds of a number; choices: the values an enum takes;
    positive_ints: a comma-separated list of positive integers (a tuple of ints in the config);
    kind: int, float, str, bool or tuple when the default does not tell (None);
    flag_default: for a field whose None means "not given" (the checkpoint's value is taken when
    resuming), the flag's default and the value a fresh run uses.
    """
    kind = kind or (type(default) if default is not None else str)
    meta = dict(lower=lower, upper=upper, choices=choices, positive_ints=positive_ints, kind=kind,
                flag_default=default if flag_default is dataclasses.MISSING else flag_default)
    return dataclasses.field(default=default, metadata=meta)


def meta(config_type, name: str) -> dict:
    """The metadata `setting` stored for field `name` of a config class (or instance)."""
    return {f.name: f for f in dataclasses.fields(config_type)}[name].metadata


def value_or_default(config, name: str):
    """Field `name` of `config`, or its flag's default when it was not given (None)."""
    value = getattr(config, name)
    return meta(config, name)["flag_default"] if value is None else value


def _number_rule(kind: type, lower, upper) -> str:
    """How absl names a bounded number's range (its ArgumentParser's syntactic help)."""
    noun = "integer" if kind is int else "number"
    if lower is not None and upper is not None:
        return f"{'an integer' if kind is int else 'a number'} in the range [{lower}, {upper}]"
    if lower == 1 and kind is int:
        return f"a positive {noun}"
    if lower == 0:
        return f"a non-negative {noun}"
    return f"{noun} >= {lower}" if lower is not None else f"{noun} <= {upper}"


def _problem(value, m: dict) -> str | None:
    """absl's complaint about `value` for a field with metadata `m`, or None."""
    if value is None:
        return None
    if m["choices"] is not None and value not in m["choices"]:
        return f"value should be one of <{'|'.join(m['choices'])}>"
    if m["positive_ints"]:
        items = value.split(",") if isinstance(value, str) else value
        try:
            ok = all(int(item) > 0 for item in items if str(item).strip())
        except (TypeError, ValueError):
            ok = False
        return None if ok else "must be comma-separated positive integers"
    if m["lower"] is not None or m["upper"] is not None:
        outside = (m["lower"] is not None and value < m["lower"]) or (m["upper"] is not None and value > m["upper"])
        if outside or (isinstance(value, float) and math.isnan(value)):
            shown = float(value) if m["kind"] is float else value
            return f"{shown} is not {_number_rule(m['kind'], m['lower'], m['upper'])}"
    return None


def satisfies(config_type, name: str, value) -> bool:
    """Whether `value` passes the checks of field `name` (absl's validators call this)."""
    return _problem(value, meta(config_type, name)) is None


def check_config(config) -> None:
    """Raise a `UserError` for the first field of `config` (a config group, or a `TrainConfig` /
    anything whose fields are config groups) that absl would refuse at parse time, with absl's
    sentence: e.g. ``flag --total_steps=0: 0 is not a positive integer``."""
    for field in dataclasses.fields(config):
        value = getattr(config, field.name)
        if dataclasses.is_dataclass(value):
            check_config(value)
            continue
        if "kind" not in field.metadata:
            continue
        problem = _problem(value, field.metadata)
        if problem is not None:
            shown = list(value) if isinstance(value, tuple) and field.metadata["positive_ints"] else value
            raise UserError(f"flag --{field.name}={shown}: {problem}")


def flag_record(config) -> dict:
    """Every flag of `config` (groups flattened in field order), name -> value as absl holds it
    after parsing: a field not given (None) as its flag's default, list flags as lists of strings.
    This is what checkpoints (`ckpt["flags"]`) and wandb's config record."""
    record = {}
    for field in dataclasses.fields(config):
        value = getattr(config, field.name)
        if dataclasses.is_dataclass(value):
            # A group that is off can stay out of the record (ConditionConfig: see its docstring).
            if getattr(value, "recorded", True):
                record.update(flag_record(value))
        elif "kind" in field.metadata:
            value = value_or_default(config, field.name)
            record[field.name] = [str(v) for v in value] if field.metadata["kind"] is tuple else value
    return record

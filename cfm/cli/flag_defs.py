"""Flags defined from config fields, and configs built from parsed flags.

`define(ConfigGroup, "name", help)` defines flag --name with the field's flag default, type,
bounds and choices (cfm/config/settings.py), so the command line and `check_config` refuse the same
values; the help text is the script's. `from_flags(ConfigGroup, FLAGS)` builds the group from the
parsed flags: a field whose None means "not given" is None unless the flag was on the command line.
"""

from __future__ import annotations

import dataclasses

from absl import flags

from cfm.config.settings import meta, satisfies

# absl files a flag under the module that defines it (--helpshort lists the script's own): this
# module defines flags on its callers' behalf, so absl looks past it to the caller.
flags.disclaim_key_flags()


# --lambda_name: one text for the locality and anchor scripts (each defines it for its own recipe).
LAMBDA_NAME_HELP = "lambda as written in run and file names, e.g. 1e0, 1e-1"


def define(config_type, name: str, help_text: str, flag_values=flags.FLAGS) -> None:
    """Define --name from field `name` of `config_type` (see the module docstring)."""
    m = meta(config_type, name)
    default, kind = m["flag_default"], m["kind"]
    common = dict(flag_values=flag_values)
    if m["choices"] is not None:
        flags.DEFINE_enum(name, default, list(m["choices"]), help_text, **common)
    elif kind is bool:
        flags.DEFINE_bool(name, default, help_text, **common)
    elif kind is int:
        flags.DEFINE_integer(name, default, help_text, lower_bound=m["lower"], upper_bound=m["upper"], **common)
    elif kind is float:
        flags.DEFINE_float(name, default, help_text, lower_bound=m["lower"], upper_bound=m["upper"], **common)
    elif kind is tuple:
        flags.DEFINE_list(name, [str(v) for v in default], help_text, **common)
    else:
        flags.DEFINE_string(name, default, help_text, **common)
    if m["positive_ints"]:
        # A malformed list is a parse error (one line, from absl), not a traceback once the data are loaded.
        flags.register_validator(name, lambda value: satisfies(config_type, name, value),
                                 message="must be comma-separated positive integers", flag_values=flag_values)


def from_flags(config_type, flag_values=flags.FLAGS):
    """The config group `config_type` with every field read from its parsed flag."""
    values = {}
    for field in dataclasses.fields(config_type):
        flag = flag_values[field.name]
        given_only = field.default is None and field.metadata["flag_default"] is not None
        value = flag.value if flag.present or not given_only else None
        if value is not None and field.metadata["kind"] is tuple:
            value = tuple(int(v) for v in value)
        values[field.name] = value
    return config_type(**values)

"""A --config.x override that names no field of the config: one line naming it, and the field meant.

ml_collections raises an AttributeError or KeyError from inside absl's flag parsing, before any command's
main runs, so each command with a --config flag passes `parse_flags` to `app.run` (flags_parser=...).
"""

import difflib
import importlib.util
import sys
from typing import Any

from absl import app

# Config fields that were renamed: an override that names the old field is told the new one.
RENAMED_FIELDS = {"model.convolutions": "model.library"}


def _dotted_fields(config: dict[str, Any], prefix: str = "") -> list[str]:
  fields = []
  for key, value in config.items():
    fields.extend(_dotted_fields(value, f"{prefix}{key}.") if isinstance(value, dict) else [f"{prefix}{key}"])
  return fields


def _config_fields(argv: list[str]) -> list[str]:
  """Every dotted field of the --config file given in argv (loaded again: the flag failed to parse)."""
  spec = next(arg.split("=", 1)[1] for arg in argv if arg.startswith("--config="))
  path, _, preset = spec.partition(":")
  module_spec = importlib.util.spec_from_file_location("_config_for_hint", path)
  module = importlib.util.module_from_spec(module_spec)
  module_spec.loader.exec_module(module)
  config = module.get_config(preset) if preset else module.get_config()
  return _dotted_fields(config.to_dict())


def _unknown_override_message(argv: list[str], error: Exception) -> str:
  """Names the --config.x override that is not a field, and the closest field."""
  try:
    fields = _config_fields(argv)
  except Exception:  # pylint: disable=broad-except -- the hint is best effort; the error below still says what
    return f"a --config.* override does not name a config field ({error})"
  overrides = [arg[len("--config.") :].split("=", 1)[0] for arg in argv if arg.startswith("--config.")]
  unknown = next((name for name in overrides if name not in fields), None)
  if unknown is None:
    return f"a --config.* override does not name a config field ({error})"
  if unknown in RENAMED_FIELDS:
    hint = f"it was renamed --config.{RENAMED_FIELDS[unknown]}."
  else:
    close = difflib.get_close_matches(unknown, fields, n=1, cutoff=0.5)
    hint = f"did you mean --config.{close[0]}?" if close else "see the config file for its fields."
  return f"--config.{unknown}: the config has no field {unknown!r}; {hint}"


def parse_flags(argv: list[str]) -> list[str]:
  """absl's flag parsing; an unknown --config.x override (ml_collections raises) is a user error."""
  try:
    return app.parse_flags_with_usage(argv)
  except (AttributeError, KeyError) as error:
    print(f"error: {_unknown_override_message(argv, error)}", file=sys.stderr)
    sys.exit(2)

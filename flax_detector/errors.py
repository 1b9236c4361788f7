"""The two kinds of failure a person running a command should see as a message, not a traceback.

Anything else that escapes a command is a bug and keeps its traceback. `flax_detector.main` maps
`UserError` to exit code 2 and `RunStoppedError` to exit code 1, and prints only the message
(`--verbose` adds the traceback).
"""

import contextlib
from collections.abc import Iterator


class UserError(Exception):
  """A setting, path or workdir the person can fix; the message names it and the fix."""


class RunStoppedError(Exception):
  """The run cannot go on for a reason outside the code (a full disk, a diverged loss)."""


@contextlib.contextmanager
def as_user_errors() -> Iterator[None]:
  """Re-raises ValueError and OSError from set-up code (config checks, data folders) as UserError.

  Set-up code raises these with messages that name the setting or file; before training starts they
  come from what the person asked for, not from a bug, so they deserve a message and exit code 2.
  """
  try:
    yield
  except UserError:
    raise
  except (ValueError, OSError) as error:
    raise UserError(str(error)) from error

"""Errors caused by the user's input: entry points print their message, no traceback."""


class UserError(ValueError):
  """Bad configuration, data, checkpoint or request; the message names the field."""


class StageError(UserError):
  """A stage, run directory or export that does not exist or does not fit the request."""

"""Errors caused by the user's input: entry points print their message, no traceback."""


class UserError(ValueError):
  """Bad configuration, data, checkpoint or request; the message names the field."""

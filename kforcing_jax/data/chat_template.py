"""Rendering a model's chat template (jinja, as the model ships it) the way transformers'
`apply_chat_template` renders it: a sandboxed environment with trim_blocks and
lstrip_blocks, loop controls, `raise_exception`, a `tojson` that does not escape HTML,
`strftime_now`, the `generation` block, and the tokenizer's special tokens (bos_token, eos_token, ...) as variables
beside `messages` and `add_generation_prompt`.
"""
from __future__ import annotations

import datetime
import functools
import json

import jinja2
import jinja2.ext
from jinja2 import sandbox

from kforcing_jax import errors


class ChatTemplateError(errors.UserError):
  pass


class _Generation(jinja2.ext.Extension):
  """`{% generation %}...{% endgeneration %}` (marks assistant text for training masks in
  transformers) renders its body unchanged."""
  tags = {'generation'}

  def parse(self, parser):
    lineno = next(parser.stream).lineno
    body = parser.parse_statements(['name:endgeneration'], drop_needle=True)
    return jinja2.nodes.CallBlock(self.call_method('_body'), [], [], body).set_lineno(lineno)

  def _body(self, caller):
    return caller()


def _raise(message):
  raise jinja2.exceptions.TemplateError(message)


def _tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
  return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators,
                    sort_keys=sort_keys)


@functools.lru_cache(maxsize=16)
def compile_template(source: str) -> jinja2.Template:
  env = sandbox.ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
                                              extensions=[jinja2.ext.loopcontrols, _Generation])
  env.filters['tojson'] = _tojson
  env.globals['raise_exception'] = _raise
  env.globals['strftime_now'] = lambda fmt: datetime.datetime.now().strftime(fmt)
  try:
    return env.from_string(source)
  except jinja2.exceptions.TemplateSyntaxError as e:
    raise ChatTemplateError(f'the model\'s chat template does not parse: {e}') from None


def render(source: str, messages: list[dict], *, add_generation_prompt: bool = True,
           special_tokens: dict | None = None, **variables) -> str:
  """The prompt text of `messages` ([{'role', 'content'}, ...]); keys whose value is None
  are dropped from each message, as transformers drops them."""
  if not isinstance(messages, (list, tuple)) or not all(isinstance(m, dict) for m in messages):
    raise ChatTemplateError('messages must be a list of {"role": ..., "content": ...} objects')
  messages = [{k: v for k, v in m.items() if v is not None} for m in messages]
  context = {**(special_tokens or {}), **variables}
  try:
    return compile_template(source).render(messages=messages, tools=None, documents=None,
                                           add_generation_prompt=add_generation_prompt,
                                           **context)
  except jinja2.exceptions.TemplateError as e:
    raise ChatTemplateError(f'the chat template refused these messages: {e}') from None

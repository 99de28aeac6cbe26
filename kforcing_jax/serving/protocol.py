"""The request bodies of the OpenAI-compatible API as pydantic models (the OpenAPI schema
at /docs describes them) and the OpenAI error shape.

Validation is strict (JSON types as documented: no "5" for 5, no 1.0 for an integer, no
NaN) and every number is bounded by what the engine represents (int32 ids, counts and
seeds; the seed of choice i of a request with n choices is seed + i, so seed + n - 1 must
be an int32 too). What depends on the served model (the vocabulary, the maximum length, AR
or PFLM settings) is checked by kforcing_jax.serving.api against it.

Fields: every field of OpenAI's completions and chat completions requests is known. The
ones this server does not implement (best_of, logit_bias, suffix, tools, ...) are accepted
only at their neutral value and otherwise refused with a 400 naming them; `user` is
accepted and ignored (it only identifies the caller). Of vLLM's extra sampling fields,
`ignore_eos`, `stop_token_ids`, `min_tokens`, `top_k` and `return_token_ids` are
implemented; `repetition_penalty`, `min_p`, `include_stop_str_in_output`,
`skip_special_tokens`, `spaces_between_special_tokens`, `truncate_prompt_tokens` and
`allowed_token_ids` are accepted only at their neutral value (refused otherwise). Any other
field is refused with a 400 naming it, so a client never gets an answer that silently
ignored what it asked for.

Log-probabilities (`logprobs`, chat `logprobs` + `top_logprobs`) are those of the
distribution each token was drawn from: AR -- after the penalties, temperature, top-k and
top-p (a greedy request: the penalised softmax at temperature 1); PFLM -- the softmax of
the hint's logits after the penalties, which the token is read out from: for an argmax
student the noise chooses that distribution and its mass on the token is the student's
confidence in it; an inverse-CDF student (ArchConfig.readout) draws the token from it by the
hint's u. `echo` with `logprobs` (and `max_tokens=0` to only score) adds the prompt's
tokens, each scored by an AR model after the ones before it.
"""
from __future__ import annotations

import json
from typing import Annotated, Literal

import pydantic
from pydantic import Field

INT32_MIN, INT32_MAX = -2 ** 31, 2 ** 31 - 1
MAX_N = 64  # choices per request
MAX_STOP = 4  # stop strings, as OpenAI
MAX_LOGPROBS = 20  # top alternatives per token (the engine's)

TokenId = Annotated[int, Field(ge=0, le=INT32_MAX)]
Count = Annotated[int, Field(ge=1, le=INT32_MAX)]

# A field's neutral value: anything else is refused (BadRequest naming the field); for
# None, any empty value ({}, [], '') is neutral too.
NEUTRAL = {
    'best_of': 1, 'logit_bias': None, 'suffix': None, 'repetition_penalty': 1.0,
    'min_p': 0.0, 'include_stop_str_in_output': False,
    'skip_special_tokens': True, 'spaces_between_special_tokens': True,
    'truncate_prompt_tokens': None, 'allowed_token_ids': None, 'tools': None,
    'tool_choice': None, 'parallel_tool_calls': None, 'response_format': None,
}

# What a field takes, for the message of a value of the wrong type (a union's own errors
# list every alternative).
EXPECTED = {
    'prompt': 'a string, a non-empty list of token ids, or a non-empty list of either',
    'stop': f'a string or a list of up to {MAX_STOP} non-empty strings',
    'messages': 'a non-empty list of {"role": ..., "content": ...} messages',
    'content': 'a string or a list of {"type": "text", "text": ...} parts',
}


class _Body(pydantic.BaseModel):
  model_config = pydantic.ConfigDict(extra='forbid', strict=True, allow_inf_nan=False)


class StreamOptions(_Body):
  include_usage: bool = False
  continuous_usage_stats: Literal[False] = False


class SamplingFields(_Body):
  """The fields shared by completions and chat completions."""
  model: str | None = None
  temperature: float | None = Field(None, ge=0.0, le=2.0, description='0 = greedy (AR)')
  top_p: float | None = Field(None, gt=0.0, le=1.0, description='AR nucleus (1 = off)')
  top_k: int | None = Field(None, ge=-1, le=INT32_MAX,
                            description='AR top-k, at most the vocabulary (0 or -1 = off)')
  frequency_penalty: float | None = Field(None, ge=-2.0, le=2.0,
                                          description='lambda * count(token) off its logit')
  seed: int | None = Field(None, ge=INT32_MIN, le=INT32_MAX,
                           description='choice i uses seed + i; default: random')
  n: int = Field(1, ge=1, le=MAX_N, description='choices per prompt (seeds seed, seed+1, ...)')
  stop: Annotated[str, Field(min_length=1)] | Annotated[
      list[Annotated[str, Field(min_length=1)]], Field(max_length=MAX_STOP)] | None = None
  stop_token_ids: list[TokenId] | None = Field(None, description='vLLM: token ids that end '
                                               'a choice (kept in token_ids)')
  stream: bool = False
  stream_options: StreamOptions | None = None
  ignore_eos: bool = False
  return_token_ids: bool | None = Field(None, description='token ids are always returned')
  K: int | None = Field(None, ge=1, le=INT32_MAX,
                        description='PFLM tokens per step (fixed at start: --K)')
  user: str | None = None
  presence_penalty: float | None = Field(None, ge=-2.0, le=2.0,
                                         description='mu off the logit of every token '
                                         'already generated')
  min_tokens: int | None = Field(None, ge=0, le=INT32_MAX,
                                 description='vLLM: no EOS / stop token / stop string before '
                                 'this many tokens')
  # known fields, refused unless neutral (NEUTRAL)
  logit_bias: dict[str, float] | None = None
  repetition_penalty: float | None = Field(None, gt=0.0)
  min_p: float | None = Field(None, ge=0.0, le=1.0)
  include_stop_str_in_output: bool | None = None
  skip_special_tokens: bool | None = None
  spaces_between_special_tokens: bool | None = None
  truncate_prompt_tokens: int | None = Field(None, ge=-1, le=INT32_MAX)
  allowed_token_ids: list[TokenId] | None = None


class CompletionRequest(SamplingFields):
  """POST /v1/completions."""
  prompt: str | Annotated[list[TokenId], Field(min_length=1)] | Annotated[
      list[str | Annotated[list[TokenId], Field(min_length=1)]], Field(min_length=1)]
  max_tokens: int | None = Field(16, ge=0, le=INT32_MAX, description='tokens per choice '
                                 '(prompt + max_tokens <= the model\'s maximum length; 0 only '
                                 'with echo and logprobs: score the prompt)')
  echo: bool | None = Field(None, description='the prompt before the completion (text, and '
                            'with logprobs its tokens scored: AR models)')
  logprobs: int | None = Field(None, ge=0, le=MAX_LOGPROBS, description='each token\'s '
                               'log-probability and this many top alternatives')
  best_of: int | None = Field(None, ge=1, le=MAX_N)
  suffix: str | None = None


class TextPart(_Body):
  type: Literal['text']
  text: str


class ChatMessage(_Body):
  role: str = Field(min_length=1)
  content: str | list[TextPart] | None = None
  name: str | None = None


class ChatCompletionRequest(SamplingFields):
  """POST /v1/chat/completions (for a model whose export has a chat template)."""
  messages: Annotated[list[ChatMessage], Field(min_length=1)]
  max_tokens: Count | None = Field(None, description='deprecated name of '
                                   'max_completion_tokens')
  max_completion_tokens: Count | None = Field(None, description='default: up to the '
                                              'model\'s maximum length')
  logprobs: bool | None = None
  top_logprobs: int | None = Field(None, ge=0, le=MAX_LOGPROBS)
  tools: list[dict] | None = None
  tool_choice: str | dict | None = None
  parallel_tool_calls: bool | None = None
  response_format: dict | None = None


class TokenizeRequest(_Body):
  """POST /v1/tokenize (vLLM's /tokenize): the ids /v1/completions gives a prompt, or
  /v1/chat/completions gives chat messages (rendered with the model's template)."""
  model: str | None = None
  prompt: str | None = None
  messages: list[ChatMessage] | None = None
  add_special_tokens: bool = Field(True, description='a prompt\'s ids as /v1/completions '
                                   'encodes it (false: only the text\'s own tokens)')


class DetokenizeRequest(_Body):
  """POST /v1/detokenize (vLLM's /detokenize)."""
  model: str | None = None
  tokens: list[TokenId]


class ErrorInfo(pydantic.BaseModel):
  message: str
  type: str
  param: str | None
  code: int


class ErrorResponse(pydantic.BaseModel):
  """Every error the server answers (the OpenAI error shape)."""
  error: ErrorInfo


ERROR_RESPONSES = {code: {'model': ErrorResponse, 'description': what} for code, what in (
    (400, 'a bad request (the message and param name the field)'),
    (404, 'the model is not served here'), (429, 'the waiting queue is full'),
    (500, 'the request failed'), (503, 'the server is shutting down'),
    (504, 'the request timed out'))}


_FIELD_NAMES = frozenset(name for cls in (StreamOptions, CompletionRequest, TextPart, ChatMessage,
                                         ChatCompletionRequest, TokenizeRequest,
                                         DetokenizeRequest) for name in cls.model_fields)


def error_body(message: str, *, status: int, param: str | None = None) -> dict:
  """{"error": {...}} as the OpenAI API answers."""
  kind = ('invalid_request_error' if status < 500 and status not in (404, 429) else
          'not_found_error' if status == 404 else 'rate_limit_error' if status == 429 else
          'server_error')
  return {'error': {'message': message, 'type': kind, 'param': param, 'code': status}}


def _path(loc) -> tuple[str, bool]:
  """('messages[1].content', whether loc goes on into a union's member) of a location."""
  out = ''
  for p in loc:
    if isinstance(p, int):
      out += f'[{p}]'
    elif p in _FIELD_NAMES:
      out += ('.' if out else '') + p
    elif p != 'body':
      return out, True
  return out, False


def describe(errors: list[dict]) -> tuple[str, str | None]:
  """(one message, the field) of pydantic / FastAPI validation errors."""
  unknown = []
  for e in errors:
    path, in_union = _path(e['loc'][:-1])
    if e['type'] == 'extra_forbidden' and not in_union:
      unknown.append(f'{path}.{e["loc"][-1]}' if path else str(e['loc'][-1]))
  if unknown:
    return (f'unknown field{"s" * (len(unknown) > 1)} {", ".join(map(repr, unknown))}: not '
            'part of this API (see /docs for the fields it takes)'), unknown[0]
  first = errors[0]
  if first['type'] == 'json_invalid':
    return f'the body is not valid JSON: {first.get("ctx", {}).get("error", first["msg"])}', None
  field, in_union = _path(first['loc'])
  if not field:
    if first['type'] == 'missing':
      return 'the request needs a JSON body', None
    if isinstance(first.get('input'), (bytes, str)):  # sent without a JSON content type
      try:
        json.loads(first['input'])
      except ValueError as e:
        return f'the body is not valid JSON: {e}', None
    return 'the request body must be a JSON object', None
  if first['type'] == 'missing':
    return f'{field}: required', field
  leaf = field.rsplit('.', 1)[-1].split('[')[0]
  if in_union and leaf in EXPECTED:
    return f'{field}: expected {EXPECTED[leaf]}, got {first["input"]!r}', field
  return f'{field}: {first["msg"]}, got {first["input"]!r}', field

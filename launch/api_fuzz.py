"""Property-based fuzz of the HTTP API from its own OpenAPI schema (schemathesis).

  python -m venv /tmp/st && /tmp/st/bin/pip install schemathesis==4.32.5
  python launch/api_fuzz.py --schemathesis=/tmp/st/bin/schemathesis --out=DIR \
      [--model=ar|pflm] [--max_examples=1000]

Serves a random-weight model (`--config=synthetic --random_init`), decodes one good
request, lets schemathesis send every operation schema-valid and schema-invalid bodies
(coverage and fuzzing phases, seeded, one worker) with the checks a correct server must
pass whatever the body: no 5xx (not_a_server_error), responses as documented
(response_schema_conformance, status_code_conformance, content_type_conformance),
invalid bodies refused (negative_data_rejection) and a per-request timeout (a hang is a
network error). Model-dependent refusals of schema-valid bodies (a token id past the
vocabulary, a prompt beyond the maximum length) are rightly 400s, so
positive_data_acceptance is not run. Afterwards the server must still be healthy and the
good request must give exactly its earlier tokens. Writes DIR/api_fuzz.json (requests
sent, status counts, 5xx, no-response, failures, exit codes); exits 1 on any failure.
"""
import collections
import glob
import json
import os
import subprocess
import sys
import time
import urllib.request

from absl import app
from absl import flags

from kforcing_jax.serving import launcher

FLAGS = flags.FLAGS
flags.DEFINE_string('schemathesis', 'schemathesis', 'the schemathesis executable')
flags.DEFINE_string('out', 'api_fuzz_out', 'output directory')
flags.DEFINE_enum('model', 'ar', ['ar', 'pflm'], 'the random-weight model served')
flags.DEFINE_integer('max_examples', 1000, 'fuzzed bodies per operation')
flags.DEFINE_integer('seed', 1, 'schemathesis seed')
flags.DEFINE_float('request_timeout', 60.0, 'seconds before a request counts as a hang')

GOOD = {'prompt': '| s5 s9', 'max_tokens': 24, 'seed': 7, 'ignore_eos': True}
CHECKS = ('not_a_server_error,response_schema_conformance,status_code_conformance,'
          'content_type_conformance,negative_data_rejection')


def post(url: str, body: dict) -> dict:
  req = urllib.request.Request(url, json.dumps(body).encode(),
                               {'Content-Type': 'application/json'})
  with urllib.request.urlopen(req, timeout=120) as r:
    return json.load(r)


def main(argv):
  del argv
  out = os.path.abspath(FLAGS.out)
  os.makedirs(out, exist_ok=True)
  report = os.path.join(out, 'report')
  model_flags = ['--config=synthetic', '--random_init', f'--model={FLAGS.model}',
                 '--max_slots=8', '--request_timeout=120']
  result = {'date': time.strftime('%Y-%m-%d'), 'command': ' '.join(sys.argv),
            'server_flags': model_flags}
  with launcher.ServerProcess(model_flags, os.path.join(out, 'server.log')) as srv:
    before = post(srv.url + '/v1/completions', GOOD)['choices'][0]['token_ids']
    cmd = [FLAGS.schemathesis, 'run', srv.url + '/openapi.json',
           '--phases', 'examples,coverage,fuzzing', '--checks', CHECKS, '--mode', 'all',
           '--max-examples', str(FLAGS.max_examples), '--seed', str(FLAGS.seed),
           '--workers', '1', '--continue-on-failure', '--request-timeout',
           str(FLAGS.request_timeout), '--generation-database', 'none',
           '--output-sanitize', 'false', '--no-color', '--report', 'json,har',
           '--report-dir', report]
    t0 = time.perf_counter()
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=7200)
    result['seconds'] = round(time.perf_counter() - t0, 1)
    result['schemathesis_command'] = ' '.join(cmd)
    result['schemathesis_exit'] = r.returncode
    with open(os.path.join(out, 'schemathesis.txt'), 'w', encoding='utf-8') as f:
      f.write(r.stdout + r.stderr)
    with urllib.request.urlopen(srv.url + '/health', timeout=30) as h:
      result['health_after'] = h.status
    after = post(srv.url + '/v1/completions', GOOD)['choices'][0]['token_ids']
    result['good_request_unchanged'] = after == before
    result['server_alive'] = srv.alive
  entries = json.load(open(max(glob.glob(f'{report}/har-*.json')),
                           encoding='utf-8'))['log']['entries']
  codes = collections.Counter(e['response']['status'] for e in entries)
  rep = json.load(open(max(glob.glob(f'{report}/json-*.json')), encoding='utf-8'))
  by_op = collections.Counter(f'{e["request"]["method"]} {e["request"]["url"].split("?")[0]}'
                              .replace(f'http://127.0.0.1:{srv.port}', '') for e in entries)
  result.update({'requests': len(entries), 'status_codes': dict(sorted(codes.items())),
                 'server_errors_5xx': sum(n for c, n in codes.items() if c >= 500),
                 'no_response': codes.get(0, 0), 'failures': rep.get('failures'),
                 'errors': rep.get('errors'), 'by_operation': dict(by_op.most_common())})
  with open(os.path.join(out, 'api_fuzz.json'), 'w', encoding='utf-8') as f:
    json.dump(result, f, indent=1)
  print(json.dumps({k: v for k, v in result.items() if k not in ('by_operation',)}, indent=1))
  ok = (result['schemathesis_exit'] == 0 and not result['server_errors_5xx'] and
        not result['no_response'] and result['good_request_unchanged'] and
        result['health_after'] == 200 and result['requests'] >= 1000)
  if not ok:
    raise SystemExit(1)


if __name__ == '__main__':
  app.run(main)

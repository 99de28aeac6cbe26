"""A server in a child process (`python -m kforcing_jax.serve ...`), for the benchmarks and
checks that drive it with external clients (aiperf, lm-evaluation-harness, schemathesis).

  with ServerProcess(['--export=DIR'], log_path='serve.log') as srv:
    ...  # srv.url, srv.port
"""
from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
import urllib.request


def free_port() -> int:
  s = socket.socket()
  s.bind(('127.0.0.1', 0))
  port = s.getsockname()[1]
  s.close()
  return port


class ServerProcess:
  """Starts the server with `flags` on a free local port and waits until /health answers
  200 (SystemExit naming the log if it exits or does not start in `start_timeout` s).
  cpus: the CPU ids it may run on (taskset), so that a load generator can use others."""

  def __init__(self, flags: list[str], log_path: str, *, start_timeout: float = 600.0,
               cpus: str | None = None, env: dict | None = None):
    self.port = free_port()
    cmd = [sys.executable, '-m', 'kforcing_jax.serve', f'--port={self.port}', *flags]
    if cpus:
      cmd = ['taskset', '-c', cpus, *cmd]
    self.log_path = log_path
    self.log = open(log_path, 'w', encoding='utf-8')
    child_env = {k: v for k, v in os.environ.items() if k != 'XLA_FLAGS'}
    child_env.update(env or {})
    self.proc = subprocess.Popen(cmd, stdout=self.log, stderr=subprocess.STDOUT, env=child_env)
    self.url = f'http://127.0.0.1:{self.port}'
    deadline = time.time() + start_timeout
    while time.time() < deadline:
      if self.proc.poll() is not None:
        self.log.close()
        raise SystemExit(f'the server exited with status {self.proc.returncode}; see '
                         f'{log_path}')
      try:
        with urllib.request.urlopen(self.url + '/health', timeout=2) as r:
          if r.status == 200:
            return
      except OSError:
        time.sleep(0.5)
    self.close()
    raise SystemExit(f'the server did not start in {start_timeout:.0f} s; see {log_path}')

  def close(self) -> int:
    """Stops it (SIGTERM: it drains) and returns its exit status."""
    if self.proc.poll() is None:
      self.proc.terminate()
      try:
        self.proc.wait(timeout=120)
      except subprocess.TimeoutExpired:
        self.proc.kill()
        self.proc.wait()
    self.log.close()
    return self.proc.returncode

  @property
  def alive(self) -> bool:
    return self.proc.poll() is None

  def __enter__(self) -> ServerProcess:
    return self

  def __exit__(self, *exc) -> None:
    self.close()

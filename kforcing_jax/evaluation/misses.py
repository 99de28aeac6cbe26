"""Where a push-forward student's tokens miss the AR teacher's inverse-CDF rollout on the
same noise.

A student decoding by argmax must place each u_i inside the CDF interval of the teacher's
token, an interval whose ends it has to compute from the context. Its held-out agreement
alone does not say which windows it loses, so the evaluation bins window position i, over
the windows whose first i-1 tokens match (the student then continues the teacher's own
context), two ways: by the teacher's probability of its own token (a narrow interval is
hard to hit), and by the distance from u to the nearer end of that interval (a u close to
an end needs the end placed precisely). A student limited by how finely it resolves the
interval ends loses the first bins of both and agrees almost always far from an end.
"""
from __future__ import annotations

import numpy as np

# bin edges: the teacher's probability of its token; u's distance to its interval's end
PROB_EDGES = (0.0, 0.003, 0.01, 0.03, 0.1, 0.3, 1.0)
EDGE_EDGES = (0.0, 0.002, 0.005, 0.01, 0.02, 0.05, 1.0)
BREAKDOWNS = {'target_prob': ('teacher\'s probability of its token', PROB_EDGES),
              'edge_distance': ('distance from u to its token\'s CDF interval end', EDGE_EDGES)}


def binned(hit_W, value_W, edges) -> list[dict]:
  """Agreement of hit_W (bool, one per window position) in bins of value_W: per bin
  [lo, hi) (the last one closed) its share of the windows and its agreement (None when
  the bin is empty)."""
  hit_W, value_W = np.asarray(hit_W, bool).ravel(), np.asarray(value_W, np.float64).ravel()
  if hit_W.shape != value_W.shape:
    raise ValueError(f'hits {hit_W.shape} and values {value_W.shape} differ in shape')
  n = max(hit_W.size, 1)
  out = []
  for b, (lo, hi) in enumerate(zip(edges[:-1], edges[1:])):
    last = b == len(edges) - 2
    sel = (value_W >= lo) & ((value_W <= hi) if last else (value_W < hi))
    count = int(sel.sum())
    out.append({'lo': float(lo), 'hi': float(hi), 'share': count / n,
                'agreement': float(hit_W[sel].mean()) if count else None})
  return out


def breakdown(hit_WxK, ok_W, prob_WxK, edge_WxK) -> dict:
  """{name: [per window position i: binned(...)]} over the valid windows ok_W whose first
  i-1 tokens match the rollout: there the student continues the teacher's own context, so
  position i's agreement is conditional on the earlier ones and all-K agreement is the
  product of the K positions' (an earlier miss would otherwise count again at every later
  position, whose target then continues a token the student did not emit)."""
  ok = np.asarray(ok_W, bool)
  hit = np.asarray(hit_WxK, bool)[ok]
  values = {'target_prob': np.asarray(prob_WxK)[ok], 'edge_distance': np.asarray(edge_WxK)[ok]}
  reached = [np.all(hit[:, :i], axis=-1) for i in range(hit.shape[-1])]
  return {name: [binned(hit[r, i], values[name][r, i], edges) for i, r in enumerate(reached)]
          for name, (_, edges) in BREAKDOWNS.items()}


def markdown(stage: str, misses: dict) -> str:
  """Two tables per stage: rows are bins, columns window positions, cells 'share of the
  windows / agreement' (breakdown's windows)."""
  out = []
  for name, (what, _) in BREAKDOWNS.items():
    per_pos = misses[name]
    k = len(per_pos)
    out.append(f'\n{stage}, by the {what}: share of the windows / agreement at position i, '
               'over the windows whose first i-1 tokens match\n')
    out.append('| bin | ' + ' | '.join(f'position {i + 1}' for i in range(k)) + ' |')
    out.append('|---' * (k + 1) + '|')
    for b, first in enumerate(per_pos[0]):
      close = ']' if b == len(per_pos[0]) - 1 else ')'
      cells = []
      for i in range(k):
        cell = per_pos[i][b]
        agree = '-' if cell['agreement'] is None else f'{cell["agreement"]:.3f}'
        cells.append(f'{cell["share"]:.3f} / {agree}')
      out.append(f'| [{first["lo"]:g}, {first["hi"]:g}{close} | ' + ' | '.join(cells) + ' |')
  return '\n'.join(out) + '\n'

"""A measurement, not a model option: MMSR with the heterogeneous keys tied to the queries.

    python scripts/bench_tied_keys.py train --workdir W --dataset D --model mmsr --run-name R ...
    python scripts/bench_tied_keys.py evaluate --workdir W --dataset D --run R --split test
    python scripts/bench_tied_keys.py attention-share --workdir W --dataset D --runs R

The authors' public code scores heterogeneous edges with the query projection on both sides,
e_ij = (W_Q h_j) . (W_Q h_i) / sqrt(d), where the paper's Eq. 13 has a key projection W_K on the
target. Issue 4 lists this as a bug, and `mmsr train` follows the paper. This script runs the `mmsr`
CLI (or scripts/bench_attention_share.py) with that one change patched into the score of Eq. 13, so
docs/benchmarks.md can measure what it does to the user vector and to accuracy. Values stay
W_V as in the paper. Runs trained here must be evaluated here too: `mmsr evaluate` would rebuild
them with W_K.
"""

from __future__ import annotations

import runpy
import sys
from contextlib import contextmanager
from pathlib import Path

import mmsr_cli.models.layers as layers


def _scores_tied(self, q, k, edges):
    """Eq. 13 with W_K := W_Q: the target side takes its query where the paper has its key."""
    return layers.EdgeDot.apply(q, q, edges.he) * self.scale


@contextmanager
def keys_tied_to_queries():
    """HANLayer with W_K replaced by W_Q in the heterogeneous scores, for the duration."""
    saved = layers.HeterogeneousAttention.forward
    layers.HeterogeneousAttention.forward = _scores_tied
    try:
        yield
    finally:
        layers.HeterogeneousAttention.forward = saved


def main() -> None:
    if len(sys.argv) < 2 or sys.argv[1] in ("-h", "--help"):
        raise SystemExit(__doc__)
    with keys_tied_to_queries():
        if sys.argv[1] == "attention-share":
            sys.argv = ["bench_attention_share.py", *sys.argv[2:]]
            runpy.run_path(str(Path(__file__).with_name("bench_attention_share.py")), run_name="__main__")
        else:
            from mmsr_cli.entry import run

            sys.argv = ["mmsr", *sys.argv[1:]]
            run()


if __name__ == "__main__":
    main()

"""A measurement, not a model option: what each departure of the authors' HAN-GNN costs or gains.

    python scripts/bench_authors_departures.py --workdir W --dataset D [--only NAME,...]
        [--epochs 3] [--max-steps 400] [--seed 0]

Trains `mmsr train --config configs/mmsr-authors-beauty.toml` (the authors' variant with their
Beauty preset) once as published and once per departure with that one departure put back to the
paper's choice, everything else unchanged, on a short budget (--epochs x --max-steps batches of
128), and prints the best validation NDCG@10 of each run (validation only; test is never read).
Runs are named authors-dep-<name>-s<seed>; a finished run is skipped when the script runs again.

Departures (mmsr_cli/models/han_authors.py and models/mmsr.py list them):

  keys-values  separate W_K for the target's key and W_V for the values (their K = V = Q)
  scaled       heterogeneous scores divided by sqrt(d)
  slope        LeakyReLU slope 0.2 in the softmax (theirs 0.1)
  no-att-drop  no dropout on the attention weights (theirs 0.2)
  hohe-phase2  ho->he runs its second phase: heterogeneous scores from h^ho (theirs re-runs he)
  concat-gate  the gate of Eq. 16 over [h^hohe; h^heho] (theirs scores each path alone)
  paper-init   the paper variant's initialisation (theirs uniform +-1/sqrt(d), min-max codes)
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from contextlib import ExitStack, contextmanager
from pathlib import Path
from unittest import mock


import mmsr_cli.models.han_authors as han
import mmsr_cli.models.mmsr as mmsr_model
from mmsr_cli.models.layers import TypedLinear, UpdateGate, EdgeDot, aggregate

PRESET = Path(__file__).resolve().parents[1] / "configs" / "mmsr-authors-beauty.toml"
DEPARTURES = ("keys-values", "scaled", "slope", "no-att-drop", "hohe-phase2", "concat-gate", "paper-init")


class MeasuredLayer(han.AuthorsHANLayer):
    """The authors' layer with one departure undone (``undo``); forward mirrors theirs otherwise."""

    undo = ""

    def __init__(self, dim: int, n_types: int, attention_dropout: float = 0.0):
        super().__init__(dim, n_types, attention_dropout)
        if self.undo == "keys-values":
            self.key, self.value = TypedLinear(n_types, dim, dim), TypedLinear(n_types, dim, dim)
        if self.undo == "concat-gate":
            self.gate = UpdateGate(dim)

    def forward(self, h, edges, types):
        q = self.query(h, types)
        k = self.key(h, types) if self.undo == "keys-values" else q
        v = self.value(h, types) if self.undo == "keys-values" else q
        scale = 1 / math.sqrt(self.dim) if self.undo == "scaled" else 1.0
        drop = self.attention_dropout

        def he(scores_from_q, scores_from_k):
            return han._softmax(EdgeDot.apply(scores_from_k, scores_from_q, edges.he) * scale, edges.he)

        he_alpha = he(q, k)
        h_he = aggregate(drop(he_alpha), v, edges.he)
        ho_alpha = han._softmax(self.homogeneous(h_he, edges), edges.ho)
        out_heho = aggregate(drop(ho_alpha), v, edges.ho)
        if self.undo == "hohe-phase2":  # h -> h^ho -> h^hohe, scores of phase 2 from h^ho
            h_ho = aggregate(drop(han._softmax(self.homogeneous(v, edges), edges.ho)), v, edges.ho)
            q_ho = self.query(h_ho, types)
            k_ho = self.key(h_ho, types) if self.undo == "keys-values" else q_ho
            out_hohe = aggregate(drop(he(q_ho, k_ho)), v, edges.he)
        else:
            out_hohe = aggregate(drop(he_alpha), v, edges.he)
        out, beta = self.gate(out_hohe, out_heho)
        self.last_gate = beta.detach()
        return out


@contextmanager
def undone(name: str):
    """The authors' variant with departure ``name`` set back to the paper's choice."""
    with ExitStack() as stack:
        MeasuredLayer.undo = name
        stack.enter_context(mock.patch.object(mmsr_model, "AuthorsHANLayer", MeasuredLayer))
        if name == "slope":
            stack.enter_context(mock.patch.object(han, "AUTHORS_SLOPE", 0.2))
        if name == "paper-init":  # keep the tables and weights as built for the paper variant
            stack.enter_context(mock.patch.object(mmsr_model.NodeEncoder, "reset_parameters_uniform", lambda self, m: None))
            stack.enter_context(mock.patch.object(han.AuthorsHANLayer, "reset_parameters_uniform", lambda self: None))
        yield


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--workdir", required=True)
    ap.add_argument("--dataset", required=True)
    ap.add_argument("--only", default="", help="comma-separated departures (default: all, and the published layer)")
    ap.add_argument("--epochs", type=int, default=3)
    ap.add_argument("--max-steps", type=int, default=400)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    names = [n for n in args.only.split(",") if n] or ["published", *DEPARTURES]
    unknown = [n for n in names if n not in ("published", *DEPARTURES)]
    if unknown:
        raise SystemExit(f"--only: unknown departure(s) {', '.join(unknown)} (known: {', '.join(DEPARTURES)})")
    from mmsr_cli.app import main as mmsr_main

    rows = []
    for name in names:
        run = f"authors-dep-{name}-s{args.seed}"
        history = Path(args.workdir) / args.dataset / "runs" / run / "history.json"
        argv = ["train", "--workdir", args.workdir, "--dataset", args.dataset, "--config", str(PRESET),
                "--run-name", run, "--epochs", str(args.epochs), "--max-steps", str(args.max_steps),
                "--patience", "0", "--seed", str(args.seed)]
        if name == "no-att-drop":
            argv += ["--attention-dropout", "0"]
        done = history.exists() and len(json.loads(history.read_text())) >= args.epochs
        if not done:
            with undone(name if name != "published" else ""):
                try:
                    mmsr_main(argv)
                except SystemExit as e:
                    if e.code:
                        sys.exit(f"{run}: mmsr train exited {e.code}")
        epochs = json.loads(history.read_text())
        best = max(e["valid"]["ndcg@10"] for e in epochs)
        rows.append((name, best, epochs[-1]["loss"]))
    print("| departure undone | best valid NDCG@10 (%) | last training loss |\n|---|---:|---:|")
    for name, best, loss in rows:
        print(f"| {name} | {100 * best:.2f} | {loss:.3f} |")


if __name__ == "__main__":
    main()

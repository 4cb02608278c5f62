#!/usr/bin/env python
"""Seconds per training step of GRU4Rec on a Beauty-like batch: the model's forward against the
former packed-sequence forward (commit c9f2958), same weights, same batch.

The batch: B=512 left-padded histories of max_len 50 whose lengths are drawn from the per-user
sequence lengths of Amazon Beauty (``sequences.tsv``, capped at 50: mean ~8.9, and a batch of 512
always holds a 50), random item ids out of 12,101 items. One step = forward, cross-entropy over all
items, backward, Adam. The two forwards alternate step by step (the machine may be shared); the
median of ``--steps`` steps after 2 warm-up steps is reported, as wall-clock and as process CPU
time. Run once per thread count.

Usage: python scripts/bench_gru4rec.py [--threads 1] [--steps 10] [--data DIR]
"""

from __future__ import annotations

import argparse
import os
import statistics
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from mmsr_cli.models import build_model
from mmsr_cli.models.base import DatasetInfo, ModelConfig

DEFAULT_DATA = Path(__file__).resolve().parents[2] / "shared" / "data" / "amazon-beauty"
N_ITEMS, MAX_LEN, BATCH, DIM = 12_101, 50, 512, 128


def packed_forward(model, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """GRU4Rec's forward before this change: re-align left, pack, final hidden state."""
    history, lengths = batch["history"], batch["lengths"]
    B, L = history.shape
    cols = (torch.arange(L)[None, :] + (L - lengths)[:, None]) % L
    x = model.emb_dropout(model.item_emb(history.gather(1, cols)))
    packed = nn.utils.rnn.pack_padded_sequence(x, lengths.clamp(min=1).cpu(), batch_first=True, enforce_sorted=False)
    _, h_n = model.gru(packed)
    return model.out_dropout(h_n[-1])


def beauty_batch(data: Path, rng: np.random.Generator) -> dict[str, torch.Tensor]:
    lines = (data / "sequences.tsv").read_text().splitlines()[1:]
    user_lengths = np.minimum([len(line.split("\t")[1].split()) for line in lines], MAX_LEN)
    lengths = rng.choice(user_lengths, BATCH)
    history = np.full((BATCH, MAX_LEN), N_ITEMS, dtype=np.int64)
    for b, n in enumerate(lengths):
        history[b, MAX_LEN - n :] = rng.integers(0, N_ITEMS, n)
    return {
        "history": torch.from_numpy(history),
        "lengths": torch.from_numpy(lengths.astype(np.int64)),
        "target": torch.from_numpy(rng.integers(0, N_ITEMS, BATCH)),
        "user_idx": torch.arange(BATCH),
    }


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--data", type=Path, default=DEFAULT_DATA)
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    torch.manual_seed(0)
    batch = beauty_batch(a.data, np.random.default_rng(0))
    info = DatasetInfo(n_items=N_ITEMS, n_users=BATCH, max_len=MAX_LEN)
    model = build_model(ModelConfig(model="gru4rec", dim=DIM, layers=2, dropout=0.3, max_len=MAX_LEN), info).train()
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    forwards = {"packed (before)": lambda b: packed_forward(model, b), "current": model}

    def step(forward) -> tuple[float, float]:
        w0, c0 = time.perf_counter(), time.process_time()
        users = forward(batch)
        loss = F.cross_entropy(users @ model.item_embeddings().T, batch["target"])
        opt.zero_grad()
        loss.backward()
        opt.step()
        return time.perf_counter() - w0, time.process_time() - c0

    times: dict[str, list[tuple[float, float]]] = {k: [] for k in forwards}
    for i in range(a.steps + 2):
        for name, fwd in forwards.items():
            t = step(fwd)
            if i >= 2:
                times[name].append(t)
    lengths = batch["lengths"].float()
    print(
        f"threads={a.threads} B={BATCH} L={MAX_LEN} mean length={lengths.mean():.2f} max={int(lengths.max())} "
        f"n_items={N_ITEMS} dim={DIM} layers=2; load average {os.getloadavg()[0]:.1f}; median of {a.steps} steps"
    )
    for name, ts in times.items():
        wall = statistics.median(t[0] for t in ts)
        cpu = statistics.median(t[1] for t in ts)
        print(f"{name:16s} wall {wall:.3f} s/step   cpu {cpu:.3f} s/step")


if __name__ == "__main__":
    main()

"""`mmsr train`: train MMSR or a baseline on a preprocessed dataset (runs/<run>/)."""

from __future__ import annotations

from typing import Annotated, Optional

import typer

from .. import contracts as C
from ..app import ConfigOpt, DatasetOpt, SeedOpt, WorkdirOpt, app, console, ranged
from ..distributed import launched_main
from ..models import model_names
from ..runs import train_configs
from ..training import train
from ..workdir import DatasetDir


@app.command("train")
def train_command(
    dataset: DatasetOpt,
    model: Annotated[str, typer.Option("--model", "-m", help=f"{', '.join(model_names()[:-1])} or {model_names()[-1]}.")] = "mmsr",
    run_name: Annotated[
        Optional[str],
        typer.Option("--run-name", help="Run folder under runs/ [default: <model>-<split>-s<seed>, split loo or ratio<r>; "
                     "mmsr-<aggregator>-<split>-s<seed> for an --aggregator other than han]."),
    ] = None,
    epochs: Annotated[Optional[int], ranged("--epochs", rng=C.RANGE_EPOCHS, help="Maximum epochs [default: 50].")] = None,
    batch_size: Annotated[int, ranged("--batch-size", rng=C.RANGE_TRAIN_BATCH, help="Samples per batch (training and evaluation).")] = 512,
    lr: Annotated[Optional[float], ranged("--lr", rng=C.RANGE_LR, help="Adam learning rate [default: 1e-3].")] = None,
    weight_decay: Annotated[Optional[float], ranged("--weight-decay", rng=C.RANGE_WEIGHT_DECAY, help="Adam L2 weight decay [default: 0].")] = None,
    clip_norm: Annotated[Optional[float], ranged("--clip-norm", rng=C.RANGE_CLIP_NORM, help="Clip gradients to this norm [default: 0 = off].")] = None,
    dropout: Annotated[Optional[float], ranged("--dropout", rng=C.RANGE_DROPOUT, help="Dropout ratio [default: 0.3].")] = None,
    dim: Annotated[Optional[int], ranged("--dim", rng=C.RANGE_DIM, help="Embedding size [default: 128].")] = None,
    layers: Annotated[Optional[int], ranged("--layers", rng=C.RANGE_LAYERS, help="GNN layers / transformer blocks / GRU layers [default: 2].")] = None,
    heads: Annotated[Optional[int], ranged("--heads", rng=C.RANGE_HEADS, help="Attention heads: SASRec(F), NOVA, DIF-SR, Trans2D [default: 2].")] = None,
    patience: Annotated[
        Optional[int], ranged("--patience", rng=C.RANGE_PATIENCE, help="Stop after N epochs without validation improvement; 0 = never [default: 5].")
    ] = None,
    seed: SeedOpt = 0,
    device: Annotated[str, typer.Option("--device", help="auto, cpu or cuda[:N].")] = "auto",
    modalities: Annotated[
        Optional[str], typer.Option("--modalities", help="Comma-separated modalities (codes: mmsr, sasrecf, gru4recf, nova, difsr, trans2d; features: mmgcn, mgat, bm3) [default: all built].")
    ] = None,
    aggregator: Annotated[
        Optional[str],
        typer.Option("--aggregator", help="MMSR graph layers (paper 5.2): han (HAN-GNN) or gcn, sage, gat, transformer, "
                     "rgcn, rgat, hgnn, hgt, hgat (PyG layers) [default: han]."),
    ] = None,
    fusion: Annotated[
        Optional[str], typer.Option("--fusion", help="MMSR fusion order: adaptive, hohe, heho, synchronous, ho, he [default: adaptive].")
    ] = None,
    invasive: Annotated[bool, typer.Option("--invasive", help="MMSR: invasive phase-2 values (ablation).")] = False,
    no_pos_emb: Annotated[bool, typer.Option("--no-pos-emb", help="MMSR: no position embeddings (ablation).")] = False,
    no_type_emb: Annotated[bool, typer.Option("--no-type-emb", help="MMSR: no node-type embeddings (ablation).")] = False,
    no_codes: Annotated[bool, typer.Option("--no-codes", help="MMSR: item-level modality nodes (graphs --no-codes).")] = False,
    feed_forward: Annotated[
        bool, typer.Option("--feed-forward", help="MMSR: residual ReLU feed-forward block after each layer (not in the paper).")
    ] = False,
    variant: Annotated[
        Optional[str],
        typer.Option("--variant", help="MMSR's HAN-GNN: paper (Eq. 12-17) or authors (as their public code runs it; "
                     "preset: configs/mmsr-authors-beauty.toml) [default: paper]."),
    ] = None,
    attention_dropout: Annotated[
        Optional[float], ranged("--attention-dropout", rng=C.RANGE_DROPOUT, help="MMSR: dropout on the attention weights [default: 0].")
    ] = None,
    readout: Annotated[
        Optional[str],
        typer.Option("--readout", help="MMSR's user vector: last (last pooling, paper 4.4) or attention (SR-GNN's "
                     "soft attention over the item nodes; not in the paper) or residual (last pooling plus that "
                     "readout, which starts at zero; not in the paper) [default: last]."),
    ] = None,
    max_steps: Annotated[int, ranged("--max-steps", rng=C.RANGE_MAX_STEPS, help="At most N training batches per epoch (smoke runs); 0 = all.")] = 0,
    resume: Annotated[bool, typer.Option("--resume/--no-resume", help="Continue the run from its last.pt if present.")] = True,
    tensorboard: Annotated[
        bool,
        typer.Option("--tensorboard/--no-tensorboard", help="Write TensorBoard event files (loss, validation "
                     "metrics, learning rate, seconds per epoch, MMSR gate statistics) into the run folder."),
    ] = True,
    metric: Annotated[str, typer.Option("--metric", help="Validation metric for early stopping and best.pt.")] = "ndcg@10",
    drop_modality: Annotated[
        Optional[str],
        typer.Option("--drop-modality", help="Missing modalities (paper 5.4): image, text, all or a modality name; "
                     "a share --drop-ratio of the items lose it for the whole run (seeded by --seed)."),
    ] = None,
    drop_ratio: Annotated[
        Optional[float], ranged("--drop-ratio", rng=C.RANGE_RATIO, help="Share of items (0 < R < 1) that lose the --drop-modality.")
    ] = None,
    workdir: WorkdirOpt = None,
    config: ConfigOpt = None,
) -> None:
    """Train a model with cross-entropy over all items; validate every epoch; keep the best."""
    tc, mc = train_configs(
        model, run_name=run_name, epochs=epochs, batch_size=batch_size, lr=lr, weight_decay=weight_decay,
        clip_norm=clip_norm, patience=patience, seed=seed, device=device, max_steps=max_steps, metric=metric,
        drop_modality=drop_modality, drop_ratio=drop_ratio, dropout=dropout, dim=dim, layers=layers, heads=heads,
        modalities=modalities, aggregator=aggregator, fusion=fusion, invasive=invasive or None,
        pos_emb=False if no_pos_emb else None, type_emb=False if no_type_emb else None,
        graph_variant="items" if no_codes else None, feed_forward=feed_forward or None, variant=variant,
        attention_dropout=attention_dropout, readout=readout,
    )
    result = train(DatasetDir.open(workdir, dataset), tc, mc, resume=resume, tensorboard=tensorboard)
    if launched_main():  # under torchrun: rank 0 only
        console.print(result.summary(tc.metric), markup=False, highlight=False, soft_wrap=True)

"""`mmsr train`: train MMSR or a baseline on a preprocessed dataset (runs/<run>/)."""

from __future__ import annotations

from typing import Annotated, Optional

import typer

from .. import contracts as C
from ..app import ConfigOpt, DatasetOpt, SeedOpt, WorkdirOpt, app, console, parse_list, ranged
from ..distributed import launched_main
from ..errors import MmsrError
from ..models import check_model_name, fields_not_read, model_names
from ..models.aggregators import check_aggregator
from ..models.base import ModelConfig
from ..models.layers import FUSION_MODES
from ..robustness import check_drop_options
from ..runs import TrainConfig
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
    check_model_name(model)
    given = {  # config field -> (option name, value or None when not given)
        "epochs": ("epochs", epochs), "lr": ("lr", lr), "weight_decay": ("weight-decay", weight_decay),
        "clip_norm": ("clip-norm", clip_norm), "dropout": ("dropout", dropout), "dim": ("dim", dim),
        "layers": ("layers", layers), "heads": ("heads", heads), "patience": ("patience", patience),
        "modalities": ("modalities", modalities), "aggregator": ("aggregator", aggregator), "fusion": ("fusion", fusion),
        "invasive": ("invasive", invasive or None), "pos_emb": ("no-pos-emb", no_pos_emb or None),
        "type_emb": ("no-type-emb", no_type_emb or None), "graph_variant": ("no-codes", no_codes or None),
        "feed_forward": ("feed-forward", feed_forward or None), "variant": ("variant", variant),
        "attention_dropout": ("attention-dropout", attention_dropout),
    }
    for field in fields_not_read(model):
        option, value = given[field]
        if value is not None:
            raise MmsrError(f"--{option}: not used by model {model}")
    if aggregator is not None:
        for name in ("fusion", "invasive", "attention_dropout") if check_aggregator(aggregator) != "han" else ():
            if given[name][1] is not None:
                raise MmsrError(f"--{name.replace('_', '-')}: only used by --aggregator han, not {aggregator}")
    if fusion is not None and fusion not in FUSION_MODES:
        raise MmsrError(f"--fusion: expected one of {', '.join(FUSION_MODES)}, got {fusion!r}")
    names = parse_list(modalities, "--modalities")
    drop = check_drop_options(drop_modality, drop_ratio)
    if len(set(names)) != len(names):
        raise MmsrError(f"--modalities: a modality is named twice in {modalities}")

    defaults_t, defaults_m = TrainConfig(), ModelConfig()
    tc = TrainConfig(
        model=model,
        run_name=run_name or "",
        epochs=epochs if epochs is not None else defaults_t.epochs,
        batch_size=batch_size,
        lr=lr if lr is not None else defaults_t.lr,
        weight_decay=weight_decay if weight_decay is not None else defaults_t.weight_decay,
        clip_norm=clip_norm if clip_norm is not None else defaults_t.clip_norm,
        patience=patience if patience is not None else defaults_t.patience,
        seed=seed,
        device=device,
        max_steps=max_steps,
        metric=metric,
        drop_modality=drop[0] if drop else "",
        drop_ratio=drop[1] if drop else 0.0,
    ).validate()
    mc = ModelConfig(
        model=model,
        dim=dim if dim is not None else defaults_m.dim,
        layers=layers if layers is not None else defaults_m.layers,
        heads=heads if heads is not None else defaults_m.heads,
        dropout=dropout if dropout is not None else defaults_m.dropout,
        modalities=tuple(names),
        aggregator=aggregator or defaults_m.aggregator,
        fusion=fusion or defaults_m.fusion,
        invasive=invasive,
        pos_emb=not no_pos_emb,
        type_emb=not no_type_emb,
        graph_variant="items" if no_codes else "codes",
        feed_forward=feed_forward,
        variant=variant or defaults_m.variant,
        attention_dropout=attention_dropout if attention_dropout is not None else defaults_m.attention_dropout,
    )
    ds = DatasetDir.open(workdir, dataset)
    result = train(ds, tc, mc, resume=resume, tensorboard=tensorboard)
    if launched_main():  # under torchrun: rank 0 only
        console.print(result.summary(tc.metric), markup=False, highlight=False, soft_wrap=True)

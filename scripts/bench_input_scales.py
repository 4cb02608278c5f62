"""At initialisation, how large is each part of a model's input where the parts are combined?

    python scripts/bench_input_scales.py --workdir W --dataset D [--seed 0]

For MMSR (both variants) and every baseline that sums or concatenates tables (SASRec, SASRec^F,
NOVA, DIF-SR, GRU4Rec^F, Trans2D), builds the model for the prepared dataset (its real item
count and modality codes) and prints the mean norm of each part over every item (positions: every
position), at the point where the model combines them. A part far smaller than the others starts
as noise beside them (docs/benchmarks.md, "Input scales at initialisation").
"""

from __future__ import annotations

import argparse
import math

import torch

from mmsr_cli.models import build_model
from mmsr_cli.models.base import ModelConfig
from mmsr_cli.inputs import load_dataset
from mmsr_cli.workdir import DatasetDir


def mean_norm(x: torch.Tensor) -> float:
    return float(x.detach().reshape(-1, x.shape[-1]).norm(dim=1).mean())


def parts(name: str, model, n_items: int) -> dict[str, float]:
    items = torch.arange(n_items)
    positions = torch.arange(model.max_len if hasattr(model, "max_len") else 50)
    if name.startswith("mmsr"):
        enc, d = model.encoder, model.config.dim
        W = enc.merge.weight
        out = {"item content": mean_norm(enc.item_embedding(items) @ W[:, :d].T)}
        for i, (table, proj) in enumerate(zip(enc.code_embeddings, enc.code_projections)):
            out[f"code content ({model.modalities[i].name})"] = mean_norm(proj(table.weight) @ W[:, :d].T)
        out["type"] = mean_norm(enc.type_embedding.weight @ W[:, d : 2 * d].T)
        out["position"] = mean_norm(enc.position_embedding.weight @ W[:, 2 * d :].T)
        if enc.merge.bias is not None:
            out["bias"] = float(enc.merge.bias.norm())
        return out
    if name == "sasrec":
        return {"item x sqrt(d)": mean_norm(model.item_emb(items) * math.sqrt(model.dim)), "position": mean_norm(model.pos_emb(positions))}
    if name == "sasrecf":
        fused = model.fused_item_table()[:n_items]
        return {"fused item x sqrt(d)": mean_norm(fused * math.sqrt(model.dim)), "position": mean_norm(model.pos_emb(positions))}
    codes = {
        model.modality_names[i]: model.modality_channel(i, items)[0] for i in range(len(model.code_tables))
    }
    if name == "nova":  # F(R, S): LayerNorm'd item rows beside position and projected codes
        out = {"item (LayerNorm)": mean_norm(model.input_norm(model.item_emb(items))), "position": mean_norm(model.pos_emb(positions))}
        parts = zip(codes.items(), model.side_proj, model.side_norm)
        out.update({f"code ({m})": mean_norm(norm(proj(c))) for (m, c), proj, norm in parts})
        return out
    if name == "difsr":  # one attention map per source: scores grow with the square of these
        out = {"item (LayerNorm)": mean_norm(model.input_norm(model.item_emb(items))), "position": mean_norm(model.pos_emb(positions))}
        out.update({f"code ({m})": mean_norm(norm(c)) for (m, c), norm in zip(codes.items(), model.side_norm)})
        return out
    if name == "gru4recf":  # one GRU per channel: the parts meet only after their GRUs
        out = {"item": mean_norm(model.item_emb(items))}
        out.update({f"code ({m})": mean_norm(c) for m, c in codes.items()})
        return out
    if name == "trans2d":  # E + position per channel, then LayerNorm per cell
        out = {"item": mean_norm(model.item_emb(items)), "position": mean_norm(model.pos_emb(positions))}
        out.update({f"code ({m})": mean_norm(proj(c)) for (m, c), proj in zip(codes.items(), model.channel_proj)})
        return out
    raise ValueError(name)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--workdir", required=True)
    ap.add_argument("--dataset", required=True)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    ds = DatasetDir.open(args.workdir, args.dataset)
    models = [("mmsr", {}), ("mmsr-authors", {"variant": "authors"}), ("sasrec", {}), ("sasrecf", {}),
              ("nova", {}), ("difsr", {}), ("gru4recf", {}), ("trans2d", {})]
    print("| model | part | mean norm at init |\n|---|---|---:|")
    for name, extra in models:
        config = ModelConfig(model=name.split("-")[0], **extra)
        bundle = load_dataset(ds, config, verify=False)
        torch.manual_seed(args.seed)
        model = build_model(bundle.model_config, bundle.info)
        with torch.no_grad():
            for part, value in parts(name, model, bundle.info.n_items).items():
                print(f"| {name} | {part} | {value:.2f} |")


if __name__ == "__main__":
    main()

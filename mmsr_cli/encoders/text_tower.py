"""CLIP and SigLIP text towers: the tower's own pooled embedding, as its authors use it.

CLIP: ``CLIPTextModelWithProjection.text_embeds`` (projected); SigLIP: ``SiglipTextModel.
pooler_output`` (last token + head), on texts padded to the tower's full length as in training.
"""

from __future__ import annotations

import torch

from . import hub
from .base import TextEncoder, autocast

TOWER_TYPES = ("clip", "siglip")


class TextTower(TextEncoder):
    @classmethod
    def claims(cls, model: str) -> bool:
        return hub.peek_model_type(model) in TOWER_TYPES

    def __init__(self, model: str, max_length: int, device, dtype):
        # heavy: only when this encoder is built
        import transformers

        def loader(source: str, local: bool):
            kind = hub.model_type(transformers.AutoConfig.from_pretrained(source, local_files_only=local))
            cls = transformers.CLIPTextModelWithProjection if kind == "clip" else transformers.SiglipTextModel
            tokenizer = transformers.AutoTokenizer.from_pretrained(source, local_files_only=local)
            return source, kind, tokenizer, cls.from_pretrained(source, local_files_only=local)

        self.source, self.tower, self.tokenizer, net = hub.load(model, loader)
        self.weights_label = self.source
        cfg = net.config
        clip = self.tower == "clip"
        self.dim = int(cfg.projection_dim if clip else getattr(cfg, "projection_size", None) or cfg.hidden_size)
        self.pooling = "text_embeds" if clip else "pooler_output"
        # SigLIP pools the last position: it was trained on texts padded to this length.
        self.pad_to = None if clip else int(cfg.max_position_embeddings)
        self.net = net.eval().to(device)
        self.device, self.dtype, self.max_length = device, dtype, max_length

    def encode(self, texts: list[str]):
        if self.pad_to is not None:
            batch = self.tokenizer(texts, padding="max_length", truncation=True,
                                   max_length=min(self.max_length, self.pad_to), return_tensors="pt")
        else:
            batch = self.tokenizer(texts, padding=True, truncation=True, max_length=self.max_length, return_tensors="pt")
        ids = batch["input_ids"].to(self.device)
        mask = batch["attention_mask"].to(self.device) if self.tower == "clip" and "attention_mask" in batch else None
        with torch.inference_mode(), autocast(self.device, self.dtype):
            out = self.net(input_ids=ids, attention_mask=mask)
            pooled = out.text_embeds if self.tower == "clip" else out.pooler_output
        return pooled.to(torch.float32).cpu()

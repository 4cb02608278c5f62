"""Image models of the Hugging Face hub: CLIP/SigLIP vision towers, DINOv2, ViT.

Each gives its architecture's pooled embedding, the one its authors use as *the* embedding:
CLIP ``CLIPVisionModelWithProjection.image_embeds`` (projected), SigLIP ``SiglipVisionModel.
pooler_output`` (attention-pooling head), DINOv2 ``pooler_output`` (CLS token after the layer
norm), ViT the CLS token of ``last_hidden_state`` (ViT's pooler is a classifier-pretraining
head). Inputs go through the model's own ``AutoImageProcessor``.
"""

from __future__ import annotations

from pathlib import Path

import torch

from ..errors import MmsrError
from . import hub
from .base import ImageEncoder, autocast
from .images import prepare_item_image

IMAGE_TYPES = ("clip", "siglip", "dinov2", "vit")


class HubImage(ImageEncoder):
    """An image model from the hub (``AutoImageProcessor`` + the architecture's vision tower)."""

    @classmethod
    def claims(cls, model: str) -> bool:
        # heavy (torchvision, transformers): only when this encoder is built
        import torchvision

        if model in set(torchvision.models.list_models(module=torchvision.models)):
            return False
        return "/" in model or Path(model).expanduser().exists()  # a hub name or a local folder

    def __init__(self, model: str, weights: str, device, dtype):
        # heavy: only when this encoder is built
        import transformers

        if weights != "default":
            raise MmsrError(f"--weights {weights}: only for torchvision models; {model} loads its own weights")

        def loader(source: str, local: bool):
            config = transformers.AutoConfig.from_pretrained(source, local_files_only=local)
            kind = hub.model_type(config)
            if kind not in IMAGE_TYPES or config.model_type.endswith("_text_model"):
                raise MmsrError(
                    f"--model {model}: a {config.model_type} model; image models from the hub must be one of "
                    f"{', '.join(IMAGE_TYPES)} (or a torchvision name such as resnet50)"
                )
            cls = {
                "clip": transformers.CLIPVisionModelWithProjection,
                "siglip": transformers.SiglipVisionModel,
                "dinov2": transformers.Dinov2Model,
                "vit": transformers.ViTModel,
            }[kind]
            kwargs = {"add_pooling_layer": False} if kind == "vit" else {}
            net = cls.from_pretrained(source, local_files_only=local, **kwargs)
            processor = transformers.AutoImageProcessor.from_pretrained(source, local_files_only=local)
            return source, kind, net, processor

        self.source, self.kind_name, net, self.processor = hub.load(model, loader)
        self.weights_label = self.source
        cfg = net.config
        self.dim = int(cfg.projection_dim if self.kind_name == "clip" else cfg.hidden_size)
        self.net = net.eval().to(device)
        self.device, self.dtype = device, dtype

    def prepare(self, rel: str | None, root: Path):
        return prepare_item_image(rel, root, 256, self._pixel_values)

    def _pixel_values(self, img):
        return self.processor(images=img, return_tensors="pt")["pixel_values"][0]

    def encode(self, images: list):
        x = torch.stack(images).to(self.device)
        with torch.inference_mode(), autocast(self.device, self.dtype):
            out = self.net(pixel_values=x)
            if self.kind_name == "clip":
                pooled = out.image_embeds
            elif self.kind_name == "vit":
                pooled = out.last_hidden_state[:, 0]
            else:
                pooled = out.pooler_output
        return pooled.to(torch.float32).cpu()

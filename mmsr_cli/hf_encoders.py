"""Hugging Face hub encoders for `extract-features`: vision towers for images, CLIP/SigLIP text towers.

Each architecture gives its own pooled embedding, the one its authors use as *the* embedding:

| model_type          | image                                            | text                              |
|---------------------|--------------------------------------------------|-----------------------------------|
| clip                | CLIPVisionModelWithProjection ``image_embeds``   | CLIPTextModelWithProjection ``text_embeds`` |
| siglip              | SiglipVisionModel ``pooler_output`` (MAP head)   | SiglipTextModel ``pooler_output`` (last token + head; texts padded to the full length as in training) |
| dinov2              | ``pooler_output`` (CLS token after the layer norm) | -                               |
| vit                 | CLS token of ``last_hidden_state`` (after the layer norm; ViT's pooler is a classifier-pretraining head) | - |

Other text encoders keep the mean over real tokens (:class:`mmsr_cli.features.TextEncoder`).
Models load the normal way (``from_pretrained``: the hub cache, downloaded on first use, or a local
folder), so users get the pretrained weights; tests save tiny random configs to a folder.
"""

from __future__ import annotations

from pathlib import Path

from .errors import MmsrError

IMAGE_TYPES = ("clip", "siglip", "dinov2", "vit")
TEXT_TOWER_TYPES = ("clip", "siglip")
# Sub-configs saved on their own name the tower in model_type.
_TOWER_TYPE = {"clip_vision_model": "clip", "clip_text_model": "clip",
               "siglip_vision_model": "siglip", "siglip_text_model": "siglip"}


def resolve_source(model: str) -> tuple[str, bool]:
    """(what from_pretrained reads, whether it is a local folder); a folder must hold config.json."""
    path = Path(model).expanduser()
    if path.exists():
        if not (path / "config.json").exists():
            raise MmsrError(f"--model {model}: {path} is not a Hugging Face model folder (no config.json)")
        return str(path), True
    return model, False


def model_type(config) -> str:
    return _TOWER_TYPE.get(config.model_type, config.model_type)


def load_failed(model: str, local: bool, e: BaseException) -> MmsrError:
    if local:
        first = str(e).strip().splitlines()
        return MmsrError(f"--model {model}: cannot load the model ({first[0][:200] if first else type(e).__name__})")
    return MmsrError(
        f"--model {model}: not in the Hugging Face cache and cannot be downloaded here; "
        "pass a local model folder"
    )


def _quiet() -> None:
    import huggingface_hub
    import transformers

    transformers.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    huggingface_hub.utils.logging.set_verbosity_error()


# ----------------------------------------------------------------------------------------------
# Text towers


class TextTower:
    """The pooled text embedding of a CLIP or SigLIP text tower."""

    def __init__(self, kind: str, source: str, local: bool):
        import transformers

        cls = transformers.CLIPTextModelWithProjection if kind == "clip" else transformers.SiglipTextModel
        self.kind = kind
        self.net = cls.from_pretrained(source, local_files_only=local)
        cfg = self.net.config
        self.dim = int(cfg.projection_dim if kind == "clip" else getattr(cfg, "projection_size", None) or cfg.hidden_size)
        # SigLIP pools the last position: it was trained on texts padded to this length.
        self.pad_to = int(cfg.max_position_embeddings) if kind == "siglip" else None

    def tokenize(self, tokenizer, texts: list[str], max_length: int):
        if self.pad_to is not None:
            return tokenizer(texts, padding="max_length", truncation=True, max_length=min(max_length, self.pad_to),
                             return_tensors="pt")
        return tokenizer(texts, padding=True, truncation=True, max_length=max_length, return_tensors="pt")

    def pool(self, batch: dict):
        out = self.net(input_ids=batch["input_ids"], attention_mask=batch.get("attention_mask")
                       if self.kind == "clip" else None)
        return out.text_embeds if self.kind == "clip" else out.pooler_output


# ----------------------------------------------------------------------------------------------
# Image encoders


class HubImageEncoder:
    """An image model from the hub (``AutoImageProcessor`` + the architecture's vision tower)."""

    def __init__(self, model: str, device, dtype):
        import transformers

        _quiet()
        source, local = resolve_source(model)
        try:
            config = transformers.AutoConfig.from_pretrained(source, local_files_only=local)
            kind = model_type(config)
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
            self.processor = transformers.AutoImageProcessor.from_pretrained(source, local_files_only=local)
        except (OSError, ValueError) as e:
            raise load_failed(model, local, e) from e
        self.kind = kind
        self.source = source
        self.weights_label = source
        cfg = net.config
        self.dim = int(cfg.projection_dim if kind == "clip" else cfg.hidden_size)
        self.net = net.eval().to(device)
        self.device = device
        self.dtype = dtype

    def prepare(self, rel: str | None, root: Path):
        from .features import prepare_item_image

        return prepare_item_image(rel, root, 256, self._pixel_values)

    def _pixel_values(self, img):
        return self.processor(images=img, return_tensors="pt")["pixel_values"][0]

    def encode(self, images: list):
        import torch

        from .features import _autocast

        x = torch.stack(images).to(self.device)
        with torch.inference_mode(), _autocast(self.device, self.dtype):
            out = self.net(pixel_values=x)
            if self.kind == "clip":
                pooled = out.image_embeds
            elif self.kind == "vit":
                pooled = out.last_hidden_state[:, 0]
            else:
                pooled = out.pooler_output
        return pooled.to(torch.float32).cpu()

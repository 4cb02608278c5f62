"""torchvision classifiers as image encoders (paper section 4.1: ResNet-50 pretrained on ImageNet).

The feature is the input of the network's final classifier layer (2048-d avgpool output for
ResNet-50); weights are the architecture's ImageNet weights (``--weights default``, from the
torch cache or downloaded), a fixed random init (``none``) or a state_dict file.
"""

from __future__ import annotations

import contextlib
import io
from pathlib import Path

import torch
from torch import nn

from ..errors import MmsrError
from .base import ImageEncoder, autocast, first_line
from .images import prepare_item_image


class TorchvisionImage(ImageEncoder):
    """A torchvision classifier whose final Linear layer is removed: its input is the feature."""

    @classmethod
    def claims(cls, model: str) -> bool:
        return True  # the fallback for images: an unknown name gets the list of torchvision names

    def __init__(self, model: str, weights: str, device, dtype):
        # heavy: only when this encoder is built
        import torchvision
        from torchvision.models import get_model, get_model_weights

        names = set(torchvision.models.list_models(module=torchvision.models))
        if model not in names:
            raise MmsrError(
                f"--model {model!r}: not a torchvision classification model (e.g. resnet50, "
                f"resnet18, efficientnet_b0, mobilenet_v3_small, vit_b_16)"
            )
        enum = get_model_weights(model)
        default = enum.DEFAULT
        if weights == "default":
            self.weights_label = f"{enum.__name__}.{default.name}"
            ckpt = Path(torch.hub.get_dir()) / "checkpoints" / Path(default.url).name
            try:
                # torch.hub announces downloads on stdout, which is kept for data; errors must stay
                # one line on stderr.
                with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
                    state = default.get_state_dict(progress=False)
            except Exception as e:  # URLError, HTTPError, socket errors: offline
                raise MmsrError(
                    f"--model {model}: ImageNet weights {self.weights_label} are not in {ckpt.parent} "
                    f"and cannot be downloaded ({type(e).__name__}); pass --weights PATH (a state_dict "
                    f"file) or --weights none (random init)"
                ) from e
            net = get_model(model, weights=None)
            net.load_state_dict(state)
        elif weights == "none":
            # A fixed seed makes "random" weights the same on every run, so features, codes and
            # everything downstream stay reproducible (and an interrupted run resumes consistently).
            self.weights_label = "none (random init, seed 0)"
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(0)
                net = get_model(model, weights=None)
        else:
            path = Path(weights).expanduser()
            if not path.is_file():
                raise MmsrError(f"--weights {weights}: file not found (expected default, none or a state_dict file)")
            try:
                state = torch.load(path, map_location="cpu", weights_only=True)
            except Exception as e:
                raise MmsrError(f"--weights {path}: not a readable torch state_dict ({type(e).__name__})") from e
            if isinstance(state, dict) and isinstance(state.get("state_dict"), dict):
                state = state["state_dict"]
            net = get_model(model, weights=None)
            try:
                net.load_state_dict(state)
            except (RuntimeError, TypeError, AttributeError) as e:
                raise MmsrError(f"--weights {path}: does not fit {model} ({first_line(e)})") from e
            self.weights_label = str(path.resolve())
        self.source = model
        self.dim = _drop_final_linear(net, model)
        self.transform = default.transforms()  # ImageNet resize/crop/normalise of this architecture
        self.short_side = min(getattr(self.transform, "resize_size", None) or [256])
        # channels-last (NHWC) activations: oneDNN's and cuDNN's faster convolution layout; a
        # ResNet-50 batch of 32 on 2 CPU cores took 2.2-2.4 s against 3.2-3.6 s in NCHW
        self.net = net.eval().to(device, memory_format=torch.channels_last)
        self.device = device
        self.dtype = dtype

    def prepare(self, rel: str | None, root: Path):
        """(input tensor, None) for one image path relative to ``root``, or (None, reason)."""
        return prepare_item_image(rel, root, self.short_side, self.transform)

    def encode(self, images: list):
        x = torch.stack(images).to(self.device, memory_format=torch.channels_last)
        with torch.inference_mode(), autocast(self.device, self.dtype):
            out = self.net(x)
        return out.to(torch.float32).flatten(1).cpu()


def _drop_final_linear(net, model: str) -> int:
    """Replace the last ``nn.Linear`` (the classifier) by identity; return its input size."""
    last = None
    for qualified, module in net.named_modules():
        if isinstance(module, nn.Linear):
            last = (qualified, module)
    if last is None:
        raise MmsrError(f"--model {model}: has no final Linear classifier to take features from")
    qualified, linear = last
    parent = net.get_submodule(qualified.rpartition(".")[0]) if "." in qualified else net
    setattr(parent, qualified.rpartition(".")[2], nn.Identity())
    return int(linear.in_features)

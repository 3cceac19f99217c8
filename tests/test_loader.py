"""Model loading: the cached default model, local HF dirs, random shapes, typed errors."""
from __future__ import annotations

import json
import time
from pathlib import Path

import pytest
import torch

from actors.model.config import ModelConfig, ModelLoadError
from actors.model.loader import convert_gguf, default_gguf_path, load_model
from actors.model.rotary import inverse_frequencies


@pytest.mark.slow  # the first run in a fresh cache converts the GGUF (~30 s); later ones ~1 s
def test_default_model_loads_from_cache_with_chat_template() -> None:
    loaded, tok = load_model("default", "cpu", "float32")
    c = loaded.config
    assert (c.num_layers, c.hidden_size, c.num_heads, c.num_kv_heads) == (30, 576, 9, 3)
    assert c.tie_word_embeddings and c.vocab_size == 49152 and c.eos_token_ids == (2,)
    assert tok.chat_template, "the ingress needs tokenizer.apply_chat_template"
    text = tok.apply_chat_template([{"role": "user", "content": "hi"}], tokenize=False,
                                   add_generation_prompt=True)
    assert "hi" in text
    start = time.perf_counter()
    load_model("default", "cpu", "float32")
    assert time.perf_counter() - start < 10, "a cached load must take seconds"


def test_random_tiny_is_seeded_and_uses_default_tokenizer() -> None:
    a, tok = load_model("random:tiny", "cpu", "float32")
    b, _ = load_model("random:tiny", "cpu", "float32")
    assert a.config.vocab_size == len(tok) == 49152
    assert all(torch.equal(a.weights[k], b.weights[k]) for k in a.weights)
    assert "lm_head.weight" not in a.weights  # tied
    ids = tok("hello world")["input_ids"]
    assert max(ids) < a.config.vocab_size


def test_local_hf_directory_round_trips(tmp_path: Path) -> None:
    from transformers import LlamaForCausalLM

    loaded, tok = load_model("random:tiny-llama3", "cpu", "float32")
    hf = LlamaForCausalLM(loaded.hf_config)
    hf.load_state_dict(loaded.weights, strict=False)
    hf.save_pretrained(tmp_path)
    tok.save_pretrained(tmp_path)
    again, tok2 = load_model(str(tmp_path), "cpu", "float32")
    assert again.config == loaded.config
    assert again.config.rope_scaling["rope_type"] == "llama3"
    for name, tensor in loaded.weights.items():
        assert torch.equal(again.weights[name], tensor), name
    assert len(tok2) == len(tok)


def test_half_precision_on_request() -> None:
    loaded, _ = load_model("random:tiny", "cpu", "bfloat16")
    assert loaded.weights["model.embed_tokens.weight"].dtype == torch.bfloat16


@pytest.mark.parametrize("model", ["/no/such/model", "./missing-dir", "/no/such/file.gguf",
                                   "not/a/hub/id/at/all"])
def test_missing_model_raises_typed_error(model: str) -> None:
    with pytest.raises(ModelLoadError, match="does not exist"):
        load_model(model, "cpu")


def test_unknown_random_shape_raises() -> None:
    with pytest.raises(ModelLoadError, match="unknown random shape"):
        load_model("random:gpt-5", "cpu")


def test_non_llama_gguf_raises(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import gguf

    monkeypatch.setenv("FLUIDSERVE_CACHE", str(tmp_path / "cache"))
    path = tmp_path / "gpt2.gguf"
    writer = gguf.GGUFWriter(str(path), "gpt2")
    writer.add_block_count(1)
    writer.add_tensor("token_embd.weight", torch.zeros(4, 4).numpy())
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    with pytest.raises(ModelLoadError, match="'gpt2' GGUF"):
        load_model(str(path), "cpu")
    assert not (tmp_path / "cache" / "gpt2").exists()


def test_non_llama_hf_directory_raises(tmp_path: Path) -> None:
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "gpt2", "n_layer": 1}))
    with pytest.raises(ModelLoadError, match="unsupported architecture 'gpt2'"):
        load_model(str(tmp_path), "cpu")


def test_directory_without_weights_raises(tmp_path: Path) -> None:
    loaded, _ = load_model("random:tiny", "cpu")
    loaded.hf_config.save_pretrained(tmp_path)
    with pytest.raises(ModelLoadError, match="no \\*.safetensors"):
        load_model(str(tmp_path), "cpu")


def test_conversion_reuses_a_finished_cache_dir(tmp_path: Path,
                                                monkeypatch: pytest.MonkeyPatch) -> None:
    """A dir another process already renamed into place is used as is, never rewritten."""
    monkeypatch.setenv("FLUIDSERVE_CACHE", str(tmp_path))
    gguf = Path(default_gguf_path())
    done = tmp_path / gguf.name.removesuffix(".gguf")
    done.mkdir()
    (done / "config.json").write_text("{}")
    assert convert_gguf(gguf) == done
    assert [p.name for p in tmp_path.iterdir()] == [done.name]  # no temp dirs left behind


def test_llama3_inverse_frequencies_match_transformers() -> None:
    from transformers import LlamaConfig
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    scaling = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
               "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}
    hf = LlamaConfig(hidden_size=4096, num_attention_heads=32, max_position_embeddings=131072,
                     rope_theta=500000.0, rope_scaling=scaling)
    ref, _ = ROPE_INIT_FUNCTIONS["llama3"](hf, "cpu")
    cfg = ModelConfig.from_hf(hf)
    ours = inverse_frequencies(cfg.head_dim, cfg.rope_theta, cfg.rope_scaling)
    assert torch.allclose(ours, ref, rtol=1e-6, atol=0)

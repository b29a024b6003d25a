"""Synthetic Llama checkpoints of any size, written one layer at a time (for scale tests and benchmarks).

``write_llama`` saves a Llama config, random weights (normal, std 0.02; norms at 1) in one safetensors shard per
decoder layer plus one for the embeddings and head, the index, and a tokenizer — never holding more than one
layer in memory, so a checkpoint larger than this machine's RAM can be made on it.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch


def llama_params(layers: int, hidden: int, intermediate: int, heads: int, kv_heads: int, vocab: int,
                 tie: bool = False) -> int:
    """Parameters of such a model."""
    d = hidden // heads
    per_layer = hidden * d * (2 * heads + 2 * kv_heads) + 3 * hidden * intermediate + 2 * hidden
    return layers * per_layer + vocab * hidden * (1 if tie else 2) + hidden


def write_llama(folder: str | Path, tokenizer, layers: int = 8, hidden: int = 2048, intermediate: int = 5632,
                heads: int = 16, kv_heads: int = 4, max_positions: int = 2048, seed: int = 0,
                dtype: torch.dtype = torch.float32, tie: bool = False) -> Path:
    """Write a random Llama with ``tokenizer``'s vocabulary into ``folder`` (created); return it."""
    from safetensors.torch import save_file
    from transformers import LlamaConfig

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    vocab = len(tokenizer)
    d = hidden // heads
    config = LlamaConfig(vocab_size=vocab, hidden_size=hidden, intermediate_size=intermediate,
                         num_hidden_layers=layers, num_attention_heads=heads, num_key_value_heads=kv_heads,
                         head_dim=d, max_position_embeddings=max_positions, tie_word_embeddings=tie,
                         dtype=str(dtype).removeprefix("torch."), bos_token_id=None, eos_token_id=None)
    config.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    gen = torch.Generator().manual_seed(seed)

    def rand(*shape: int) -> torch.Tensor:
        return (torch.randn(*shape, generator=gen) * 0.02).to(dtype)

    weight_map, total = {}, 0
    n = layers + 1
    for i in range(layers):
        p = f"model.layers.{i}."
        tensors = {
            p + "self_attn.q_proj.weight": rand(heads * d, hidden),
            p + "self_attn.k_proj.weight": rand(kv_heads * d, hidden),
            p + "self_attn.v_proj.weight": rand(kv_heads * d, hidden),
            p + "self_attn.o_proj.weight": rand(hidden, heads * d),
            p + "mlp.gate_proj.weight": rand(intermediate, hidden),
            p + "mlp.up_proj.weight": rand(intermediate, hidden),
            p + "mlp.down_proj.weight": rand(hidden, intermediate),
            p + "input_layernorm.weight": torch.ones(hidden, dtype=dtype),
            p + "post_attention_layernorm.weight": torch.ones(hidden, dtype=dtype),
        }
        name = f"model-{i + 1:05d}-of-{n:05d}.safetensors"
        save_file(tensors, str(folder / name), metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(tensors, name))
        total += sum(t.numel() * t.element_size() for t in tensors.values())
        del tensors
    rest = {"model.embed_tokens.weight": rand(vocab, hidden), "model.norm.weight": torch.ones(hidden, dtype=dtype)}
    if not tie:
        rest["lm_head.weight"] = rand(vocab, hidden)
    name = f"model-{n:05d}-of-{n:05d}.safetensors"
    save_file(rest, str(folder / name), metadata={"format": "pt"})
    weight_map.update(dict.fromkeys(rest, name))
    total += sum(t.numel() * t.element_size() for t in rest.values())
    (folder / "model.safetensors.index.json").write_text(
        json.dumps({"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}, indent=2))
    return folder

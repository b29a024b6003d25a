"""Tiny random models of every supported family, with a tokenizer trained locally on wiki text."""

from __future__ import annotations

from functools import lru_cache
from pathlib import Path

import torch

FAMILIES = ("llama", "gemma3_text", "opt", "gpt2", "gpt_neox")
VOCAB = 384
HIDDEN = 64
FFN = 128
LAYERS = 3
MAX_POS = 256


@lru_cache(maxsize=1)
def tokenizer():
    """A byte-level BPE tokenizer (384 tokens) trained on the wiki calibration split."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    from prunekit.data import wiki

    tok = Tokenizer(models.BPE(unk_token=None))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=VOCAB, special_tokens=["<eos>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(wiki("calibration")[:20], trainer=trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<eos>", pad_token="<eos>")


def config(family: str):
    import transformers as tf

    common = dict(vocab_size=VOCAB, eos_token_id=0, pad_token_id=0, bos_token_id=0)
    if family == "llama":
        return tf.LlamaConfig(hidden_size=HIDDEN, intermediate_size=FFN, num_hidden_layers=LAYERS,
                              num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=MAX_POS, **common)
    if family == "gemma3_text":
        return tf.Gemma3TextConfig(hidden_size=HIDDEN, intermediate_size=FFN, num_hidden_layers=LAYERS,
                                   num_attention_heads=4, num_key_value_heads=2, head_dim=16,
                                   max_position_embeddings=MAX_POS, sliding_window=32, **common)
    if family == "opt":
        return tf.OPTConfig(hidden_size=HIDDEN, ffn_dim=FFN, num_hidden_layers=LAYERS, num_attention_heads=4,
                            max_position_embeddings=MAX_POS, word_embed_proj_dim=HIDDEN, **common)
    if family == "gpt2":
        return tf.GPT2Config(n_embd=HIDDEN, n_inner=FFN, n_layer=LAYERS, n_head=4, n_positions=MAX_POS, **common)
    if family == "gpt_neox":
        return tf.GPTNeoXConfig(hidden_size=HIDDEN, intermediate_size=FFN, num_hidden_layers=LAYERS,
                                num_attention_heads=4, max_position_embeddings=MAX_POS, **common)
    raise ValueError(family)


def make_model(family: str, folder: Path, seed: int = 0, layers: int | None = None) -> Path:
    """Save a random tiny model of ``family`` with the local tokenizer into ``folder``; return it."""
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    cfg = config(family)
    if layers is not None and getattr(cfg, "layer_types", None) is not None:
        # per-layer attention types are fixed at construction (Gemma 3): rebuild them for the new depth
        cfg = type(cfg)(**{**cfg.to_dict(), "num_hidden_layers": layers, "layer_types": None})
    elif layers is not None:
        cfg.num_hidden_layers = layers
    model = AutoModelForCausalLM.from_config(cfg)
    folder.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(folder, safe_serialization=True)
    tokenizer().save_pretrained(folder)
    return folder


def run_with_wandb_offline(args: list[str], tmp_path: Path) -> Path:
    """``prunekit <args>`` (in this process) with configs/wandb.yaml in offline mode; the W&B run folder."""
    import os

    from prunekit.cli import main

    saved = {k: os.environ.get(k) for k in ("WANDB_MODE", "WANDB_SILENT")}
    os.environ.update(WANDB_MODE="offline", WANDB_SILENT="true")
    here = os.getcwd()
    os.chdir(tmp_path)
    try:
        code = main([*args, "--config", str(Path(__file__).parents[1] / "configs" / "wandb.yaml"),
                     "--trainer.logger.init_args.save_dir", str(tmp_path / "wb")])
    finally:
        os.chdir(here)
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
    assert code == 0
    runs = list((tmp_path / "wb" / "wandb").glob("offline-run-*"))
    assert len(runs) == 1, runs
    return runs[0]

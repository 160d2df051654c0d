"""Builders for tiny, locally made parts: a Llama config with random weights and a small trained tokenizer."""

from __future__ import annotations

from functools import lru_cache
from pathlib import Path

import torch
from tokenizers import Tokenizer, models, pre_tokenizers, trainers
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

TINY_TEXT = [
    "The cat sat on the mat. The dog sat on the log.",
    "Python is a programming language. Functions return values.",
    "A list holds items; a dict maps keys to values.",
    "Sparse autoencoders find features inside neural networks.",
] * 8


@lru_cache(maxsize=1)
def build_tiny_tokenizer() -> PreTrainedTokenizerFast:
    """A byte-level BPE tokenizer (vocab 320) trained on a few sentences: real tokenization, no download."""
    tok = Tokenizer(models.BPE(unk_token=None))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    from tokenizers import decoders

    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=320,
        special_tokens=["<|endoftext|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    tok.train_from_iterator(TINY_TEXT, trainer=trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|endoftext|>", pad_token="<|endoftext|>")


def build_tiny_llama_cfg(**overrides) -> LlamaConfig:
    cfg = dict(
        vocab_size=320,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=3,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=256,
        eos_token_id=0,
        pad_token_id=0,
        bos_token_id=None,
    )
    cfg.update(overrides)
    return LlamaConfig(**cfg)


def build_tiny_llama(seed: int = 0, **overrides) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    model = LlamaForCausalLM(build_tiny_llama_cfg(**overrides))
    return model.eval()


def save_tiny_llama(folder: Path, seed: int = 0) -> Path:
    """Write a tiny Llama and its tokenizer to `folder`, loadable with `from_pretrained(folder)`."""
    folder.mkdir(parents=True, exist_ok=True)
    build_tiny_llama(seed).save_pretrained(folder)
    build_tiny_tokenizer().save_pretrained(folder)
    return folder

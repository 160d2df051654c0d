"""Builders for tiny, locally made parts: Llama, Gemma, GPT-2 and BERT configs with random weights, and a
small trained tokenizer."""

from __future__ import annotations

from functools import lru_cache
from pathlib import Path

import torch
from tokenizers import Tokenizer, models, pre_tokenizers, trainers
from transformers import (
    BertConfig,
    BertModel,
    GemmaConfig,
    GemmaForCausalLM,
    GPT2Config,
    GPT2LMHeadModel,
    LlamaConfig,
    LlamaForCausalLM,
    PreTrainedTokenizerFast,
)

TINY_TEXT = [
    "The cat sat on the mat. The dog sat on the log.",
    "Python is a programming language. Functions return values.",
    "A list holds items; a dict maps keys to values.",
    "Sparse autoencoders find features inside neural networks.",
] * 8


@lru_cache(maxsize=2)
def build_tiny_tokenizer(bos: bool = False) -> PreTrainedTokenizerFast:
    """A byte-level BPE tokenizer (vocab 320) trained on a few sentences: real tokenization, no download.

    With `bos`, every text starts with a `<s>` token (id 1), as Llama tokenizers do.
    """
    tok = Tokenizer(models.BPE(unk_token=None))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    from tokenizers import decoders, processors

    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=320,
        special_tokens=["<|endoftext|>", "<s>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    tok.train_from_iterator(TINY_TEXT, trainer=trainer)
    if bos:
        tok.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
    extra = {"bos_token": "<s>"} if bos else {}
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, eos_token="<|endoftext|>", pad_token="<|endoftext|>", **extra
    )


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


def build_tiny_gemma(seed: int = 0) -> GemmaForCausalLM:
    torch.manual_seed(seed)
    cfg = GemmaConfig(
        vocab_size=320,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=1,
        head_dim=8,
        max_position_embeddings=256,
        pad_token_id=0,
        eos_token_id=0,
        bos_token_id=1,
    )
    return GemmaForCausalLM(cfg).eval()


def build_tiny_gpt2(seed: int = 0) -> GPT2LMHeadModel:
    torch.manual_seed(seed)
    cfg = GPT2Config(
        vocab_size=320, n_embd=32, n_layer=2, n_head=4, n_positions=256, bos_token_id=0, eos_token_id=0
    )
    return GPT2LMHeadModel(cfg).eval()


def build_tiny_bert(seed: int = 0) -> BertModel:
    """A BERT encoder (no LM head), as `AutoModel` loads one."""
    torch.manual_seed(seed)
    cfg = BertConfig(
        vocab_size=320,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=4,
        intermediate_size=64,
        max_position_embeddings=256,
        pad_token_id=0,
    )
    return BertModel(cfg).eval()


class IdentityDictionary(torch.nn.Module):
    """An exact stand-in dictionary: codes = relu([x, -x]), so decode(encode(x)) = x; latent i < d writes e_i
    (it fires when coordinate i is positive) and latent d + i writes -e_i."""

    def __init__(self, d: int):
        super().__init__()
        self.d_in, self.d_sae = d, 2 * d

    def encode(self, acts: torch.Tensor) -> torch.Tensor:
        return torch.relu(torch.cat([acts, -acts], dim=-1))

    def decode(self, codes: torch.Tensor) -> torch.Tensor:
        return codes[..., : self.d_in] - codes[..., self.d_in :]

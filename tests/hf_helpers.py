"""Tiny Hugging Face models built from configs, token datasets and a locally trained tokenizer."""

from __future__ import annotations

import torch
from datasets import Dataset
from tokenizers import Tokenizer, models, pre_tokenizers, trainers
from transformers import (
    BertConfig,
    BertForSequenceClassification,
    GPT2Config,
    GPT2LMHeadModel,
    LlamaConfig,
    LlamaForCausalLM,
    PreTrainedTokenizerFast,
)

VOCAB = 64


def tiny_gpt2(**overrides) -> GPT2LMHeadModel:
    """A 2-layer GPT-2 without dropout (so an HVP by hand sees the same function)."""
    torch.manual_seed(0)
    config = GPT2Config(
        vocab_size=VOCAB,
        n_positions=32,
        n_embd=16,
        n_layer=2,
        n_head=2,
        resid_pdrop=0.0,
        embd_pdrop=0.0,
        attn_pdrop=0.0,
        bos_token_id=0,
        eos_token_id=0,
        **overrides,
    )
    return GPT2LMHeadModel(config)


def tiny_llama(**overrides) -> LlamaForCausalLM:
    torch.manual_seed(0)
    options = dict(
        vocab_size=VOCAB,
        hidden_size=16,
        intermediate_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=2,
        max_position_embeddings=32,
    )
    config = LlamaConfig(**{**options, **overrides})
    return LlamaForCausalLM(config)


def token_dataset(rows: int = 16, length: int = 12, seed: int = 0) -> Dataset:
    """Causal-LM rows (input_ids = labels) of a learnable pattern: each row counts up mod VOCAB."""
    gen = torch.Generator().manual_seed(seed)
    starts = torch.randint(0, VOCAB, (rows,), generator=gen)
    ids = [[(int(s) + i) % VOCAB for i in range(length)] for s in starts]
    return Dataset.from_dict({"input_ids": ids, "labels": ids})


def tiny_tokenizer(texts: list[str]) -> PreTrainedTokenizerFast:
    """A word-level tokenizer trained on ``texts`` in milliseconds, with pad/eos tokens."""
    backend = Tokenizer(models.WordLevel(unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    backend.train_from_iterator(texts, trainers.WordLevelTrainer(special_tokens=["<unk>", "<pad>", "<eos>"]))
    return PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="<unk>", pad_token="<pad>", eos_token="<eos>")


def tiny_bert_classifier() -> BertForSequenceClassification:
    """A 2-layer BERT sequence classifier without dropout."""
    torch.manual_seed(0)
    config = BertConfig(
        vocab_size=VOCAB,
        hidden_size=16,
        intermediate_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        max_position_embeddings=32,
        hidden_dropout_prob=0.0,
        attention_probs_dropout_prob=0.0,
        num_labels=2,
    )
    return BertForSequenceClassification(config)


def classification_dataset(rows: int = 8, length: int = 10, seed: int = 0) -> Dataset:
    """Token rows labelled by whether their first token is in the upper half of the vocabulary."""
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, VOCAB, (rows, length), generator=gen)
    return Dataset.from_dict({"input_ids": ids.tolist(), "labels": (ids[:, 0] >= VOCAB // 2).long().tolist()})

"""A recipe's tokenizer and model: pretrained (Hub id, local directory, or a package that ships one:
a built-in model), or built here (a byte-level BPE tokenizer trained in a moment, a model from a config)."""

from __future__ import annotations

import importlib
import re
from collections.abc import Iterable

from peft import PeftConfig
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import (
    AutoConfig,
    AutoModelForCausalLM,
    AutoModelForSequenceClassification,
    AutoTokenizer,
    PreTrainedModel,
    PreTrainedTokenizerBase,
    PreTrainedTokenizerFast,
)
from trl import get_peft_config, get_quantization_config

from .arguments import BUILTIN_MODELS, ModelArguments
from .errors import RecipeError, first_line

__all__ = ["is_function_path", "load_model", "load_tokenizer", "peft_config", "resolve_model_path", "train_tokenizer"]

_PROVIDER = re.compile(r"([A-Za-z_][\w.]*):([A-Za-z_]\w*)")
_PAD, _EOS = "<pad>", "<eos>"


def is_function_path(name: str) -> bool:
    """Whether a model name is ``"module:function"``: code to run, which a recipe needs ``--allow_code`` for."""
    return _PROVIDER.fullmatch(name) is not None


def resolve_model_path(key: str, name: str) -> str:
    """A built-in model name (``BUILTIN_MODELS``) or ``"module:function"`` becomes the directory that
    function returns (a package that ships a model); any other name is returned unchanged."""
    match = _PROVIDER.fullmatch(BUILTIN_MODELS.get(name, name))
    if not match:
        return name
    module_name, function_name = match.groups()
    try:
        module = importlib.import_module(module_name)
    except ImportError as error:
        raise RecipeError(
            key,
            f"cannot import {module_name!r} ({error}); install the package that provides it "
            "(the recipes extra: pip install 'hf_psgd[recipes]')",
        ) from None
    function = getattr(module, function_name, None)
    if not callable(function):
        raise RecipeError(key, f"{module_name!r} has no function {function_name!r}")
    return str(function())


def train_tokenizer(texts: Iterable[str], vocab_size: int) -> PreTrainedTokenizerFast:
    """A byte-level BPE tokenizer (digits split one by one) trained on ``texts``, with ``<pad>`` and
    ``<eos>`` special tokens; decoding gives back the exact text."""
    backend = Tokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.Digits(individual_digits=True), pre_tokenizers.ByteLevel(add_prefix_space=False)]
    )
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=[_PAD, _EOS], initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
    )
    backend.train_from_iterator(texts, trainer)
    return PreTrainedTokenizerFast(tokenizer_object=backend, pad_token=_PAD, eos_token=_EOS)


def load_tokenizer(arguments: ModelArguments, training_texts: Iterable[str]) -> PreTrainedTokenizerBase:
    """``tokenizer_name_or_path`` (else ``model_name_or_path``) from_pretrained, or one trained on
    ``training_texts`` (read only in that case). A tokenizer without a pad token pads with eos."""
    key = "tokenizer_name_or_path" if arguments.tokenizer_name_or_path else "model_name_or_path"
    name = arguments.tokenizer_name_or_path or arguments.model_name_or_path
    if name is None:
        return train_tokenizer(training_texts, arguments.tokenizer_vocab_size)
    try:
        tokenizer = AutoTokenizer.from_pretrained(resolve_model_path(key, name))
    except (OSError, ValueError) as error:
        raise RecipeError(key, f"cannot load a tokenizer from {name!r}: {first_line(error)}") from None
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def load_model(
    arguments: ModelArguments, task: str, tokenizer: PreTrainedTokenizerBase, num_labels: int | None = None
) -> PreTrainedModel:
    """``model_name_or_path`` from_pretrained for ``task`` (with TRL's revision, dtype, attention and
    quantization settings), or a new ``model_type`` model whose config takes ``config_overrides`` and
    the tokenizer's vocabulary size and special tokens."""
    auto = AutoModelForSequenceClassification if task == "sequence_classification" else AutoModelForCausalLM
    options = {"dtype": arguments.dtype, "attn_implementation": arguments.attn_implementation}
    if arguments.model_name_or_path:
        name = arguments.model_name_or_path
        options.update(quantization_config=get_quantization_config(arguments))
        options.update({"num_labels": num_labels} if num_labels is not None else {})
        try:
            path = resolve_model_path("model_name_or_path", name)
            model = auto.from_pretrained(path, revision=arguments.model_revision, **options)
        except (OSError, ValueError) as error:
            raise RecipeError("model_name_or_path", f"cannot load {name!r}: {first_line(error)}") from None
    else:
        model = auto.from_config(_new_config(arguments, tokenizer, num_labels), **options)
    if model.config.pad_token_id is None:
        model.config.pad_token_id = tokenizer.pad_token_id
    return model


def _new_config(arguments: ModelArguments, tokenizer: PreTrainedTokenizerBase, num_labels: int | None):
    try:
        config = AutoConfig.for_model(arguments.model_type)
    except ValueError:
        raise RecipeError("model_type", f"{arguments.model_type!r} is not a transformers model type") from None
    overrides = arguments.config_overrides or {}
    unknown = [key for key in overrides if not hasattr(config, key)]
    if unknown:
        raise RecipeError("config_overrides", f"{unknown[0]!r} is not a field of {type(config).__name__}")
    special = {"pad_token_id": tokenizer.pad_token_id, "eos_token_id": tokenizer.eos_token_id}
    special["bos_token_id"] = tokenizer.bos_token_id if tokenizer.bos_token_id is not None else tokenizer.eos_token_id
    extra = {"num_labels": num_labels} if num_labels is not None else {}
    return AutoConfig.for_model(arguments.model_type, vocab_size=len(tokenizer), **special, **extra, **overrides)


def peft_config(arguments: ModelArguments, task: str) -> PeftConfig | None:
    """TRL's LoRA config of a recipe with ``use_peft`` (else ``None``); a classification task's
    adapters get the ``SEQ_CLS`` task type unless ``lora_task_type`` says otherwise."""
    config = get_peft_config(arguments)
    if config is not None and task == "sequence_classification" and arguments.lora_task_type == "CAUSAL_LM":
        config.task_type = "SEQ_CLS"
    return config

"""The GPT being fine-tuned: default base model, tokenized data, training loss, evaluation, metrics."""

from gptfluence.lm.data import IGNORE_INDEX, TokenizedExamples, tokenize_examples
from gptfluence.lm.evaluation import EvalSet, greedy_generate, prepare_eval, target_losses
from gptfluence.lm.metrics import (
    generation_metrics,
    label_accuracy,
    masked_target_loss,
    metric_names,
    rouge_l,
    sentence_bleu,
)
from gptfluence.lm.model import (
    BaseModelConfig,
    base_config_of,
    ensure_default_model,
    load_model,
    prepare_tokenizer,
    read_model_info,
)
from gptfluence.lm.training import causal_lm_loss, make_optimizer

__all__ = [
    "IGNORE_INDEX",
    "BaseModelConfig",
    "EvalSet",
    "TokenizedExamples",
    "base_config_of",
    "causal_lm_loss",
    "ensure_default_model",
    "generation_metrics",
    "greedy_generate",
    "label_accuracy",
    "load_model",
    "make_optimizer",
    "masked_target_loss",
    "metric_names",
    "prepare_eval",
    "prepare_tokenizer",
    "read_model_info",
    "rouge_l",
    "sentence_bleu",
    "target_losses",
    "tokenize_examples",
]

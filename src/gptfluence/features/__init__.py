"""Text features: frozen encoders and cached embeddings of example texts (GPTfluence's h).

>>> enc = load_encoder("minilm")                  # all-MiniLM-L6-v2, mean pooling, normalised, 384-d
>>> H = embed_examples(enc, dynamics.task.train)  # float32 [N, 384], rows in task.train order

Rows follow the order of the examples given; map ids to rows with ``Dynamics.train_row`` /
``test_row``.

Loss-gradient features of the fine-tuned GPT (GPTfluence's similarity term), at the base model or
at checkpoints of a replayed fine-tuning run, cached the same way:

>>> g = LossGradientEncoder.for_dynamics(dynamics, checkpoints=4, run_id="run-0000")
>>> G = g.embed(dynamics.task.train)              # float32 [N, 4 * 1024]
"""

from gptfluence.features.cache import (EmbedStats, embed_examples, embed_texts, embed_texts_with_stats,
                                       spec_key)
from gptfluence.features.gradients import CheckpointReplay, LossGradientEncoder
from gptfluence.features.encoders import (MINILM_NAME, CausalLMEncoder, Encoder, HashingBowEncoder, HFEncoder,
                                          SentenceTransformerEncoder, load_encoder, minilm_path,
                                          parse_encoder_spec, resolve_encoder)

__all__ = [
    "Encoder", "SentenceTransformerEncoder", "HFEncoder", "CausalLMEncoder", "HashingBowEncoder", "load_encoder",
    "resolve_encoder", "parse_encoder_spec", "minilm_path",
    "MINILM_NAME", "LossGradientEncoder", "CheckpointReplay", "embed_texts", "embed_texts_with_stats",
    "embed_examples", "EmbedStats", "spec_key",
]

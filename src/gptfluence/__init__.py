"""gptfluence: which training examples shaped a fine-tuned GPT's behaviour on a test example.

Implements GPTfluence (Chai et al., EMNLP 2024), a featurized simulator of training dynamics,
with its baselines (Simfluence-Linear, TracIn-CP, Grad-Dot) and the tooling to collect the
training dynamics they learn from.
"""

from gptfluence.errors import GptfluenceError
from gptfluence.types import Example, Task

__version__ = "0.1.0"
__all__ = ["Example", "Task", "GptfluenceError", "__version__"]

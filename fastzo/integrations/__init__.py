"""Integrations of fastzo.MeZO with training frameworks.

- ``fastzo.integrations.transformers``: ``ZOTrainer`` / ``ZOTrainingArguments`` for the Hugging Face
  ``Trainer`` (needs ``transformers`` and ``accelerate``).
- ``fastzo.integrations.assets``: the offline default model and data of ``fastzo finetune``.

Submodules are imported on demand, so ``import fastzo`` never needs these frameworks.
"""

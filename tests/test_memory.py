"""fastzo.memory: parameter counts, activation accounting, totals, budget search, CLI."""

import dataclasses
import json
import os

import pytest

from fastzo import memory

os.environ.setdefault("HF_HUB_OFFLINE", "1")

EXPECTED_PARAMETERS = {  # from the public config.json files
    "gpt2-medium": 354_823_168,
    "llama2-7b": 6_738_415_616,
    "llama2-13b": 13_015_864_320,
    "opt-1.3b": 1_315_758_080,
    "opt-13b": 12_853_473_280,
}


@pytest.mark.parametrize("preset", sorted(EXPECTED_PARAMETERS))
def test_preset_parameter_counts_are_exact(preset):
    assert memory.count_parameters(preset) == EXPECTED_PARAMETERS[preset]


def _tiny_configs():
    transformers = pytest.importorskip("transformers")
    import torch
    common_llama = dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                        intermediate_size=172, vocab_size=101)
    return [
        ("gpt2 tied", transformers.GPT2Config(n_embd=64, n_layer=2, n_head=4, vocab_size=101,
                                              n_positions=37)),
        ("gpt2 untied", transformers.GPT2Config(n_embd=64, n_layer=2, n_head=4, vocab_size=101,
                                                n_positions=37, tie_word_embeddings=False)),
        ("llama gqa untied", transformers.LlamaConfig(num_key_value_heads=2, **common_llama)),
        ("llama tied biases", transformers.LlamaConfig(tie_word_embeddings=True,
                                                       attention_bias=True, mlp_bias=True,
                                                       **common_llama)),
        ("opt tied", transformers.OPTConfig(hidden_size=64, num_hidden_layers=2, ffn_dim=256,
                                            num_attention_heads=4, vocab_size=101,
                                            max_position_embeddings=50)),
        ("opt projections untied", transformers.OPTConfig(
            hidden_size=64, num_hidden_layers=2, ffn_dim=256, num_attention_heads=4,
            vocab_size=101, max_position_embeddings=50, word_embed_proj_dim=32,
            do_layer_norm_before=False, tie_word_embeddings=False)),
    ]


def _build(config):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_config(config, attn_implementation="eager")


@pytest.mark.parametrize("index", range(6))
def test_counting_matches_hf_models(index):
    label, config = _tiny_configs()[index]
    model = _build(config)
    assert memory.count_parameters(config) == sum(p.numel() for p in model.parameters()), label
    assert memory.count_parameters(config.to_dict()) == memory.count_parameters(config)


def test_config_json_path_and_folder(tmp_path):
    config = {"model_type": "llama", "hidden_size": 4096, "num_hidden_layers": 32,
              "num_attention_heads": 32, "num_key_value_heads": 32, "intermediate_size": 11008,
              "vocab_size": 32000, "tie_word_embeddings": False, "hidden_act": "silu"}
    folder = tmp_path / "llama-2-7b"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps(config))
    assert memory.count_parameters(str(folder / "config.json")) == 6_738_415_616
    assert memory.count_parameters(folder) == 6_738_415_616
    assert memory.load_spec(str(folder)).name == "llama-2-7b"


def test_unknown_model_is_rejected():
    with pytest.raises(ValueError, match="neither a preset"):
        memory.load_spec("gpt5-huge")
    with pytest.raises(ValueError, match="unsupported model_type"):
        memory.spec_from_config({"model_type": "bert"})


def test_fused_gpt_layer_reproduces_korthikanti():
    spec = memory.PRESETS["gpt2-medium"]  # dropout 0.1 everywhere, GELU MLP of 4h
    for seq_len, batch in [(512, 1), (1024, 8), (2048, 4)]:
        run = memory.RunSpec(batch_size=batch, seq_len=seq_len, act_bytes=2)
        terms = memory.layer_activation_terms(spec, run)
        stats = terms.pop("norm statistics")  # float32 mean/rstd, left out by the paper
        assert sum(terms.values()) == memory.korthikanti_layer_bytes(spec, seq_len, batch)
        assert stats < 1e-3 * sum(terms.values())


def test_activations_linear_in_batch_and_quadratic_attention_in_seq_len():
    spec = memory.PRESETS["llama2-7b"]
    base = memory.RunSpec(batch_size=1, seq_len=1024)
    one = memory.layer_activation_terms(spec, base)
    four = memory.layer_activation_terms(spec, dataclasses.replace(base, batch_size=4))
    longer = memory.layer_activation_terms(spec, dataclasses.replace(base, seq_len=2048))
    for name in one:
        assert four[name] == pytest.approx(4 * one[name]), name
        factor = 4 if name.startswith("softmax") or "attention dropout" in name else 2
        assert longer[name] == pytest.approx(factor * one[name]), name
    # flash attention drops the s² term: linear in s
    flash = dataclasses.replace(base, attention="flash")
    ratio = (memory.layer_activations(spec, dataclasses.replace(flash, seq_len=2048))
             / memory.layer_activations(spec, flash))
    assert ratio == pytest.approx(2.0)


def test_llama_fused_layer_formula():
    # derived in docs/memory.md: s·b·h·(16 + 6·f/h + 2·a·s/h) bytes with 2-byte activations
    spec = memory.PRESETS["llama2-7b"]
    s, b, h, f, a = 2048, 8, 4096, 11008, 32
    run = memory.RunSpec(batch_size=b, seq_len=s, act_bytes=2)
    terms = memory.layer_activation_terms(spec, run)
    stats = terms.pop("norm statistics")
    assert stats == 2 * s * b * 4
    assert sum(terms.values()) == pytest.approx(s * b * h * (16 + 6 * f / h + 2 * a * s / h))


def test_act_bytes_scales_activations():
    spec = memory.PRESETS["llama2-7b"]
    two = memory.layer_activations(spec, memory.RunSpec(seq_len=512, act_bytes=2))
    four = memory.layer_activations(spec, memory.RunSpec(seq_len=512, act_bytes=4))
    assert four == pytest.approx(2 * two, rel=1e-3)


def test_dropout_zero_stores_no_masks():
    spec = memory.PRESETS["gpt2-medium"]
    run = memory.RunSpec(seq_len=256, batch_size=2)
    with_dropout = memory.layer_activation_terms(spec, run)
    assert "attention dropout mask + output" in with_dropout
    for off in (dataclasses.replace(run, dropout=False),):
        assert not [k for k in memory.layer_activation_terms(spec, off) if "dropout" in k]
    no_dropout_spec = dataclasses.replace(spec, attention_dropout=0.0, hidden_dropout=0.0)
    assert not [k for k in memory.layer_activation_terms(no_dropout_spec, run) if "dropout" in k]


@pytest.mark.parametrize("preset", sorted(EXPECTED_PARAMETERS))
@pytest.mark.parametrize("seq_len", [128, 2048, 8192])
def test_mezo_needs_less_than_bp(preset, seq_len):
    est = memory.estimate(preset, batch_size=8, seq_len=seq_len)
    assert est.mezo.total < est.bp.total
    assert est.mezo.total < est.bp_checkpointed.total <= est.bp.total
    assert 0 < est.mezo_over_bp < 1
    assert est.mezo.gradients == est.mezo.optimizer_state == 0
    # one forward's working set (a layer or the logits) is below what BP stores for L layers
    assert est.mezo.activations < est.bp.activations


def test_optimizer_state_sizes():
    params = memory.count_parameters("opt-1.3b")
    for name, states in [("sgd", 0), ("sgd-momentum", 1), ("adam", 2)]:
        est = memory.estimate("opt-1.3b", optimizer=name, weight_bytes=2, state_bytes=4)
        assert est.bp.optimizer_state == states * params * 4
        assert est.bp.gradients == params * 2


def test_checkpoint_layers_count_and_fraction():
    spec = memory.PRESETS["llama2-7b"]
    run = memory.RunSpec(batch_size=8, seq_len=1024)
    assert dataclasses.replace(run, checkpoint_layers=0.41).checkpointed(32) == 13
    assert dataclasses.replace(run, checkpoint_layers=13).checkpointed(32) == 13
    assert dataclasses.replace(run, checkpoint_layers=1.0).checkpointed(32) == 32
    assert run.checkpointed(32) == 32
    with pytest.raises(ValueError):
        dataclasses.replace(run, checkpoint_layers=33).checkpointed(32)
    stored = [memory.stored_activations(spec, run, k) for k in (0, 8, 16, 32)]
    assert stored[0] > stored[1] > stored[2] > stored[3]
    none = memory.estimate(spec, dataclasses.replace(run, checkpoint_layers=0))
    assert none.bp_checkpointed.activations == none.bp.activations


def test_budget_search_is_monotone():
    run = memory.RunSpec(batch_size=8, seq_len=1024)
    previous = {}
    for gib in (4, 8, 16, 32, 64):
        fits = memory.largest_fitting("llama2-7b", gib * memory.GIB, run)
        for method, fit in fits.items():
            assert fit.parameters >= previous.get(method, 0)
            if fit.spec is not None:
                assert fit.total <= gib * memory.GIB
                bigger = memory.family_member(memory.PRESETS["llama2-7b"], fit.spec.num_layers + 1)
                est = memory.estimate(bigger, run)
                total = {"BP": est.bp, "BP+ckpt": est.bp_checkpointed, "MeZO": est.mezo}[method]
                assert total.total > gib * memory.GIB
            previous[method] = fit.parameters
        assert fits["MeZO"].parameters >= fits["BP+ckpt"].parameters >= fits["BP"].parameters
    assert previous["MeZO"] > previous["BP"]
    # a layer count for the preset becomes its fraction for smaller family members
    counted = memory.largest_fitting("llama2-7b", 4 * memory.GIB,
                                     dataclasses.replace(run, checkpoint_layers=16))
    halved = memory.largest_fitting("llama2-7b", 4 * memory.GIB,
                                    dataclasses.replace(run, checkpoint_layers=0.5))
    assert counted["BP+ckpt"] == halved["BP+ckpt"]


def test_family_member_of_the_preset_is_the_preset():
    for name in ("llama2-7b", "gpt2-medium", "opt-13b"):
        spec = memory.PRESETS[name]
        member = memory.family_member(spec, spec.num_layers)
        assert memory.count_parameters(member) == memory.count_parameters(spec)


def test_parse_bytes():
    assert memory.parse_bytes("16GiB") == 16 * 2**30
    assert memory.parse_bytes("17 GB") == 17e9
    assert memory.parse_bytes("512MiB") == 512 * 2**20
    assert memory.parse_bytes("5e9") == 5e9
    with pytest.raises(ValueError):
        memory.parse_bytes("lots")


def test_cli_prints_table_and_budget(capsys):
    assert memory.cli_main(["llama2-7b", "--batch", "8", "--seq-len", "2048",
                            "--budget", "16GiB"]) == 0
    out = capsys.readouterr().out
    for word in ("weights", "gradients", "optimizer state", "activations", "total",
                 "BP+ckpt", "MeZO / BP", "largest"):
        assert word in out


def test_cli_config_path_and_options(tmp_path, capsys):
    path = tmp_path / "config.json"
    path.write_text(json.dumps({"model_type": "gpt2", "n_embd": 1024, "n_layer": 24,
                                "n_head": 16, "vocab_size": 50257, "n_positions": 1024}))
    argv = [str(path), "--batch", "2", "--seq-len", "512", "--weight-bytes", "4",
            "--act-bytes", "4", "--optimizer", "sgd", "--checkpoint-layers", "0.5",
            "--implementation", "eager", "--no-dropout"]
    assert memory.cli_main(argv) == 0
    out = capsys.readouterr().out
    assert "354,823,168 parameters" in out and "checkpointing 12/24" in out


def test_cli_reports_errors():
    assert memory.cli_main(["no-such-model"]) == 2


def test_cli_plot(tmp_path):
    pytest.importorskip("matplotlib")
    path = tmp_path / "fig.png"
    assert memory.cli_main(["gpt2-medium", "--plot", str(path)]) == 0
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


# The eager accounting against what autograd really saves, counted by storage.
@pytest.mark.parametrize("family", ["gpt2", "llama", "opt"])
def test_eager_stored_activations_match_autograd(family):
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    import torch
    if family == "gpt2":
        config = transformers.GPT2Config(n_embd=64, n_layer=2, n_head=4, vocab_size=97,
                                         n_positions=128, resid_pdrop=0.0, embd_pdrop=0.0,
                                         attn_pdrop=0.0)
    elif family == "llama":
        config = transformers.LlamaConfig(hidden_size=64, num_hidden_layers=2,
                                          num_attention_heads=4, num_key_value_heads=2,
                                          intermediate_size=172, vocab_size=97)
    else:
        config = transformers.OPTConfig(hidden_size=64, num_hidden_layers=2, ffn_dim=256,
                                        num_attention_heads=4, vocab_size=97, dropout=0.0,
                                        attention_dropout=0.0, max_position_embeddings=128)
    config.use_cache = False
    model = _build(config).train()
    batch, seq_len = 3, 80
    ids = torch.randint(0, 97, (batch, seq_len), generator=torch.Generator().manual_seed(0))
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    saved = {}

    def pack(tensor):
        pointer = tensor.untyped_storage().data_ptr()
        if pointer not in params:
            saved[pointer] = tensor.untyped_storage().nbytes()
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        model(input_ids=ids, labels=ids).loss
    run = memory.RunSpec(batch_size=batch, seq_len=seq_len, weight_bytes=4, act_bytes=4,
                         implementation="eager")
    predicted = memory.stored_activations(memory.spec_from_config(config), run, 0)
    assert predicted == pytest.approx(sum(saved.values()), rel=0.01)


# ------------------------------------------------------------------------------------ encoders
ENCODER_CONFIGS = {
    "bert": dict(hidden_size=48, num_hidden_layers=2, num_attention_heads=4, intermediate_size=96,
                 vocab_size=301, max_position_embeddings=40, type_vocab_size=2),
    "mpnet": dict(hidden_size=48, num_hidden_layers=2, num_attention_heads=4, intermediate_size=96,
                  vocab_size=301, max_position_embeddings=42, relative_attention_num_buckets=32),
}


@pytest.mark.parametrize("model_type", sorted(ENCODER_CONFIGS))
def test_encoder_parameters_and_stored_activations_match_transformers(model_type, tmp_path):
    transformers = pytest.importorskip("transformers")
    import torch
    config = transformers.AutoConfig.for_model(model_type, **ENCODER_CONFIGS[model_type])
    torch.manual_seed(0)
    model = transformers.AutoModel.from_config(config).train()
    spec = memory.encoder_spec_from_config(config.to_dict(), head_classes=3)
    assert memory.encoder_parameters(spec) == sum(p.numel() for p in model.parameters())
    assert memory.encoder_parameters(spec, head=True) == memory.encoder_parameters(spec) + 48 * 3 + 3
    (tmp_path / "config.json").write_text(config.to_json_string())
    assert memory.is_encoder_config(str(tmp_path)) and not memory.is_encoder_config({"model_type": "llama"})

    batch, seq = 3, 17
    saved = {}

    def pack(t):
        saved[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    ids = torch.randint(5, 300, (batch, seq))
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        model(input_ids=ids, attention_mask=torch.ones_like(ids)).last_hidden_state.sum()
    weights = {p.untyped_storage().data_ptr() for p in model.parameters()}
    measured = sum(n for ptr, n in saved.items() if ptr not in weights)
    predicted = memory.encoder_estimate(spec, memory.EncoderRun(batch, seq))["BP"].stored_activations
    assert abs(predicted - measured) / measured < 0.15, (predicted, measured)


def test_encoder_estimate_terms_and_cli(tmp_path, capsys):
    spec = memory.EncoderSpec("enc", "bert", hidden_size=64, num_layers=2, num_heads=4, intermediate_size=128,
                              vocab_size=1000, max_positions=64, type_vocab_size=2)
    run = memory.EncoderRun(batch_size=4, seq_len=32, baseline=100 * 2**20)
    est = memory.encoder_estimate(spec, run)
    params = memory.encoder_parameters(spec, head=True)
    assert est["MeZO"].weights == est["BP"].weights == 4 * params
    assert est["BP"].optimizer_state == 8 * params and est["MeZO"].optimizer_state == 0
    assert est["MeZO"].step_peak == run.baseline + 4 * params + memory.encoder_forward_working_set(spec, run)
    assert est["BP"].step_peak > est["MeZO"].step_peak
    longer = memory.encoder_estimate(spec, run, seq_len=64)
    assert longer["BP"].stored_activations > 2 * est["BP"].stored_activations  # scores grow as s^2
    with pytest.raises(ValueError, match="model_type must be one of"):
        memory.EncoderSpec("x", "t5", 8, 1, 1, 8, 8, 8)
    with pytest.raises(ValueError, match="batch_size and seq_len must be positive"):
        memory.EncoderRun(batch_size=0)
    config = tmp_path / "config.json"
    config.write_text(json.dumps({"model_type": "bert", **ENCODER_CONFIGS["bert"]}))
    assert memory.cli_main([str(config), "--batch", "4", "--seq-len", "32", "--weight-bytes", "4",
                            "--act-bytes", "4", "--baseline", "100MiB"]) == 0
    out = capsys.readouterr().out
    assert "bert encoder" in out and "peak of a step (+baseline)" in out and "baseline 100 MiB" in out

"""Memory model of fine-tuning a decoder-only transformer (or a BERT/MPNet encoder) with backpropagation (BP) or MeZO.

Every term, its derivation and its source is written out in ``docs/memory.md``; the names of the
functions and terms below follow that document. Units: bytes. Symbols: ``s`` sequence length,
``b`` batch, ``h`` hidden size, ``a`` attention heads, ``g`` = kv heads / heads, ``f`` MLP
intermediate size, ``V`` vocabulary, ``L`` layers, ``p`` bytes per activation.

Two accountings of the stored activations:

- ``implementation="fused"``: the kernels that Korthikanti et al. (2022) assume (fused GELU,
  fused softmax with an implicit causal mask, fused norms). With 2-byte activations, 1-byte
  dropout masks and a GPT MLP it gives their ``s·b·h·(34 + 5·a·s/h)`` bytes per layer.
- ``implementation="eager"``: the tensors that eager PyTorch saves for Hugging Face
  ``transformers`` GPT-2, OPT and Llama with ``attn_implementation="eager"`` (what
  ``benchmarks/memory_validation.py`` measures).

The module is pure Python; it imports torch only for ``count_module_parameters`` and matplotlib
only for the plot.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import re
import sys
from dataclasses import dataclass
from pathlib import Path

GIB = 1 << 30

# ---------------------------------------------------------------------------------------------
# Architecture
# ---------------------------------------------------------------------------------------------

FAMILIES = ("gpt2", "opt", "llama")
# model_type values of config.json that share Llama's layer (RMSNorm, RoPE, SwiGLU).
LLAMA_LIKE = ("llama", "mistral", "qwen2", "qwen3")


@dataclass(frozen=True)
class TransformerSpec:
    """A decoder-only transformer, reduced to what its memory depends on."""

    name: str
    family: str  # gpt2 | opt | llama: which layer layout, parameter names and eager kernels
    hidden_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    intermediate_size: int
    vocab_size: int
    gated_mlp: bool  # SwiGLU (three matrices) or plain (two)
    activation: str  # gelu | gelu_new | relu | silu
    norm: str  # layernorm | rmsnorm
    norm_affine: bool = True
    tied_embeddings: bool = False
    learned_positions: int = 0  # rows of a learned positional table (GPT-2 n_positions, OPT +2)
    attention_bias: bool = False  # q, k, v and output projections
    qkv_bias_only: bool = False  # Qwen2: bias on q, k, v but not on the output projection
    mlp_bias: bool = False
    final_norm: bool = True
    embed_dim: int = 0  # OPT word_embed_proj_dim; 0 = hidden_size
    head_dim: int = 0  # 0 = hidden_size // num_heads
    attention_dropout: float = 0.0
    hidden_dropout: float = 0.0  # residual branches (and embeddings for GPT-2 / OPT)
    activation_dropout: float = 0.0  # OPT, between the MLP activation and fc2

    def __post_init__(self):
        if self.family not in FAMILIES:
            raise ValueError(f"family must be one of {FAMILIES}, got {self.family!r}")
        if self.norm not in ("layernorm", "rmsnorm"):
            raise ValueError(f"norm must be 'layernorm' or 'rmsnorm', got {self.norm!r}")
        for field in ("hidden_size", "num_layers", "num_heads", "num_kv_heads",
                      "intermediate_size", "vocab_size"):
            if getattr(self, field) < 1:
                raise ValueError(f"{field} must be positive, got {getattr(self, field)}")
        if self.num_heads % self.num_kv_heads:
            raise ValueError(f"num_heads={self.num_heads} is not a multiple of "
                             f"num_kv_heads={self.num_kv_heads}")

    @property
    def dim_head(self) -> int:
        return self.head_dim or self.hidden_size // self.num_heads

    @property
    def word_embed_dim(self) -> int:
        return self.embed_dim or self.hidden_size

    @property
    def kv_fraction(self) -> float:
        return self.num_kv_heads / self.num_heads

    def scaled(self, num_layers: int, hidden_size: int) -> "TransformerSpec":
        """The same family at another depth and width: head size, MLP ratio, kv-head ratio and
        vocabulary kept."""
        head = self.dim_head
        heads = max(1, hidden_size // head)
        group = self.num_heads // self.num_kv_heads
        kv_heads = max(1, heads // group)
        heads = kv_heads * group
        hidden = heads * head
        ratio = self.intermediate_size / self.hidden_size
        return dataclasses.replace(
            self, name=f"{self.name}@L{num_layers}h{hidden}", num_layers=num_layers,
            hidden_size=hidden, num_heads=heads, num_kv_heads=kv_heads,
            intermediate_size=max(1, round(ratio * hidden)),
            embed_dim=0 if not self.embed_dim else hidden, head_dim=0)


def _gpt2(name, hidden, layers, heads, vocab=50257, positions=1024, dropout=0.1):
    return TransformerSpec(
        name=name, family="gpt2", hidden_size=hidden, num_layers=layers, num_heads=heads,
        num_kv_heads=heads, intermediate_size=4 * hidden, vocab_size=vocab, gated_mlp=False,
        activation="gelu_new", norm="layernorm", tied_embeddings=True,
        learned_positions=positions, attention_bias=True, mlp_bias=True,
        attention_dropout=dropout, hidden_dropout=dropout)


def _llama(name, hidden, layers, heads, ffn, kv_heads=None, vocab=32000):
    return TransformerSpec(
        name=name, family="llama", hidden_size=hidden, num_layers=layers, num_heads=heads,
        num_kv_heads=kv_heads or heads, intermediate_size=ffn, vocab_size=vocab, gated_mlp=True,
        activation="silu", norm="rmsnorm", tied_embeddings=False)


def _opt(name, hidden, layers, heads, ffn, vocab=50272, max_positions=2048):
    # OPT's learned positions carry an offset of 2 rows (OPTLearnedPositionalEmbedding).
    return TransformerSpec(
        name=name, family="opt", hidden_size=hidden, num_layers=layers, num_heads=heads,
        num_kv_heads=heads, intermediate_size=ffn, vocab_size=vocab, gated_mlp=False,
        activation="relu", norm="layernorm", tied_embeddings=True,
        learned_positions=max_positions + 2, attention_bias=True, mlp_bias=True,
        attention_dropout=0.0, hidden_dropout=0.1)


# Public config.json files of the models (values in docs/memory.md).
PRESETS: dict[str, TransformerSpec] = {
    "gpt2-medium": _gpt2("gpt2-medium", 1024, 24, 16),
    "llama2-7b": _llama("llama2-7b", 4096, 32, 32, 11008),
    "llama2-13b": _llama("llama2-13b", 5120, 40, 40, 13824),
    "opt-1.3b": _opt("opt-1.3b", 2048, 24, 32, 8192),
    "opt-13b": _opt("opt-13b", 5120, 40, 40, 20480),
}


def _load_config(config, name):
    """(config as a dict, name): a ``PretrainedConfig`` as its dict; a path to config.json (or to
    its folder) read, the folder naming the model unless ``name`` is given."""
    if hasattr(config, "to_dict") and not isinstance(config, dict):
        return config.to_dict(), name
    if isinstance(config, (str, os.PathLike)):
        path = Path(config)
        if path.is_dir():
            path = path / "config.json"
        with open(path) as handle:
            return json.load(handle), name or path.parent.name or path.stem
    return config, name


def spec_from_config(config, name: str | None = None) -> TransformerSpec:
    """A spec from a Hugging Face config: a dict, a path to config.json (or to its folder), or a
    ``transformers.PretrainedConfig``."""
    config, name = _load_config(config, name)
    if not isinstance(config, dict):
        raise TypeError(f"config must be a dict, a path or a PretrainedConfig, got "
                        f"{type(config).__name__}")
    model_type = config.get("model_type", "")
    name = name or config.get("_name_or_path") or model_type or "config"
    get = config.get
    if model_type == "gpt2":
        hidden = get("n_embd", 768)
        dropout = float(get("resid_pdrop", 0.1))
        return TransformerSpec(
            name=name, family="gpt2", hidden_size=hidden, num_layers=get("n_layer", 12),
            num_heads=get("n_head", 12), num_kv_heads=get("n_head", 12),
            intermediate_size=get("n_inner") or 4 * hidden, vocab_size=get("vocab_size", 50257),
            gated_mlp=False, activation=get("activation_function", "gelu_new"),
            norm="layernorm", tied_embeddings=get("tie_word_embeddings", True),
            learned_positions=get("n_positions", 1024), attention_bias=True, mlp_bias=True,
            attention_dropout=float(get("attn_pdrop", 0.1)), hidden_dropout=dropout)
    if model_type == "opt":
        hidden = get("hidden_size", 768)
        bias = get("enable_bias", True)
        return TransformerSpec(
            name=name, family="opt", hidden_size=hidden, num_layers=get("num_hidden_layers", 12),
            num_heads=get("num_attention_heads", 12), num_kv_heads=get("num_attention_heads", 12),
            intermediate_size=get("ffn_dim", 3072), vocab_size=get("vocab_size", 50272),
            gated_mlp=False, activation=get("activation_function", "relu"), norm="layernorm",
            norm_affine=get("layer_norm_elementwise_affine", True),
            tied_embeddings=get("tie_word_embeddings", True),
            learned_positions=get("max_position_embeddings", 2048) + 2,
            attention_bias=bias, mlp_bias=bias,
            final_norm=get("do_layer_norm_before", True) and not get("_remove_final_layer_norm",
                                                                      False),
            embed_dim=get("word_embed_proj_dim") or hidden,
            attention_dropout=float(get("attention_dropout", 0.0)),
            hidden_dropout=float(get("dropout", 0.1)),
            activation_dropout=float(get("activation_dropout", 0.0)))
    if model_type in LLAMA_LIKE or ("intermediate_size" in config and "hidden_act" in config
                                    and "num_key_value_heads" in config):
        heads = get("num_attention_heads", 32)
        return TransformerSpec(
            name=name, family="llama", hidden_size=get("hidden_size", 4096),
            num_layers=get("num_hidden_layers", 32), num_heads=heads,
            num_kv_heads=get("num_key_value_heads") or heads,
            intermediate_size=get("intermediate_size", 11008), vocab_size=get("vocab_size", 32000),
            gated_mlp=True, activation=get("hidden_act", "silu"), norm="rmsnorm",
            tied_embeddings=get("tie_word_embeddings", False),
            attention_bias=bool(get("attention_bias", False)),
            qkv_bias_only=model_type == "qwen2", mlp_bias=bool(get("mlp_bias", False)),
            head_dim=get("head_dim") or 0,
            attention_dropout=float(get("attention_dropout", 0.0)))
    raise ValueError(f"unsupported model_type {model_type!r}: fastzo.memory knows gpt2, opt and "
                     f"the Llama-like {LLAMA_LIKE}")


def load_spec(model) -> TransformerSpec:
    """A preset name, a config (dict, path, PretrainedConfig) or a spec."""
    if isinstance(model, TransformerSpec):
        return model
    if isinstance(model, str) and model.lower() in PRESETS:
        return PRESETS[model.lower()]
    if isinstance(model, str) and not os.path.exists(model):
        raise ValueError(f"{model!r} is neither a preset ({', '.join(PRESETS)}) nor a path to a "
                         "config.json")
    return spec_from_config(model)


# ---------------------------------------------------------------------------------------------
# Parameters
# ---------------------------------------------------------------------------------------------

def layer_parameters(spec: TransformerSpec) -> int:
    """Parameters of one decoder layer."""
    h, f = spec.hidden_size, spec.intermediate_size
    q_out = spec.num_heads * spec.dim_head
    kv_out = spec.num_kv_heads * spec.dim_head
    attention = h * q_out + 2 * h * kv_out + q_out * h
    if spec.attention_bias:
        attention += q_out + 2 * kv_out + h
    elif spec.qkv_bias_only:
        attention += q_out + 2 * kv_out
    mlp = (3 if spec.gated_mlp else 2) * h * f
    if spec.mlp_bias:
        mlp += (2 * f if spec.gated_mlp else f) + h
    return attention + mlp + 2 * _norm_parameters(spec)


def _norm_parameters(spec: TransformerSpec) -> int:
    if not spec.norm_affine:
        return 0
    return spec.hidden_size * (2 if spec.norm == "layernorm" else 1)


def embedding_parameters(spec: TransformerSpec) -> int:
    """Token and learned positional embeddings, OPT's projections, the untied output head."""
    h, e, vocab = spec.hidden_size, spec.word_embed_dim, spec.vocab_size
    total = vocab * e + spec.learned_positions * h
    if e != h:  # OPT project_in / project_out, no bias
        total += 2 * e * h
    if not spec.tied_embeddings:
        total += vocab * e
    return total


def count_parameters(model) -> int:
    """Exact parameter count of a preset or HF config (as ``sum(p.numel())`` of the model)."""
    spec = load_spec(model)
    final = _norm_parameters(spec) if spec.final_norm else 0
    return embedding_parameters(spec) + spec.num_layers * layer_parameters(spec) + final


def largest_parameter(spec: TransformerSpec) -> int:
    """Elements of the largest single weight tensor (bounds per-tensor optimizer temporaries)."""
    h = spec.hidden_size
    return max(spec.vocab_size * spec.word_embed_dim, h * spec.intermediate_size,
               h * spec.num_heads * spec.dim_head * (3 if spec.family == "gpt2" else 1))


# ---------------------------------------------------------------------------------------------
# Run settings
# ---------------------------------------------------------------------------------------------

OPTIMIZERS = {"sgd": 0, "sgd-momentum": 1, "adam": 2}  # state tensors per parameter
IMPLEMENTATIONS = ("fused", "eager")
ATTENTIONS = ("standard", "flash")


@dataclass(frozen=True)
class RunSpec:
    batch_size: int = 8
    seq_len: int = 2048
    weight_bytes: float = 2.0
    act_bytes: float = 2.0
    optimizer: str = "adam"
    grad_bytes: float | None = None  # default: weight_bytes
    state_bytes: float | None = None  # per optimizer state element; default: weight_bytes
    # L′: layers whose activations are recomputed (only their input is kept). An int counts
    # layers, a float in (0, 1] is the fraction L′/L; None means every layer.
    checkpoint_layers: int | float | None = None
    implementation: str = "fused"
    attention: str = "standard"
    dropout: bool = True  # apply the architecture's dropout (training mode)
    # MeZO perturbation scratch, bytes (0 for an in-place fused kernel; see docs/memory.md).
    perturbation_workspace: int = 0

    def __post_init__(self):
        if self.batch_size < 1 or self.seq_len < 1:
            raise ValueError(f"batch_size and seq_len must be positive, got {self.batch_size}, "
                             f"{self.seq_len}")
        if self.optimizer not in OPTIMIZERS:
            raise ValueError(f"optimizer must be one of {tuple(OPTIMIZERS)}, got "
                             f"{self.optimizer!r}")
        if self.implementation not in IMPLEMENTATIONS:
            raise ValueError(f"implementation must be one of {IMPLEMENTATIONS}, got "
                             f"{self.implementation!r}")
        if self.attention not in ATTENTIONS:
            raise ValueError(f"attention must be one of {ATTENTIONS}, got {self.attention!r}")
        if self.weight_bytes <= 0 or self.act_bytes <= 0:
            raise ValueError("weight_bytes and act_bytes must be positive")

    @property
    def gradient_bytes(self) -> float:
        return self.weight_bytes if self.grad_bytes is None else self.grad_bytes

    @property
    def optimizer_state_bytes(self) -> float:
        return self.weight_bytes if self.state_bytes is None else self.state_bytes

    def checkpointed(self, num_layers: int) -> int:
        """L′ as a layer count: an int counts layers, a float is the fraction L′/L."""
        value = self.checkpoint_layers
        if value is None:
            return num_layers
        if isinstance(value, float):
            if not 0.0 <= value <= 1.0:
                raise ValueError(f"checkpoint fraction must lie in [0, 1], got {value}")
            return round(value * num_layers)
        if not 0 <= value <= num_layers:
            raise ValueError(f"checkpoint_layers={value} outside 0..{num_layers}")
        return int(value)


# ---------------------------------------------------------------------------------------------
# Activations
# ---------------------------------------------------------------------------------------------

MASK_BYTES = 1  # dropout masks are bool tensors (Korthikanti et al. count 1 byte as well)
FP32 = 4


def _dims(spec: TransformerSpec, run: RunSpec):
    s, b = run.seq_len, run.batch_size
    tokens = s * b
    return dict(
        T=tokens * spec.hidden_size,  # one hidden-sized tensor: s·b·h
        F=tokens * spec.intermediate_size,  # one MLP-sized tensor: s·b·f
        S=spec.num_heads * s * s * b,  # one score-sized tensor: a·s²·b
        tokens=tokens,
        logits=tokens * spec.vocab_size,
        heads_tokens=spec.num_heads * tokens,
    )


def _softmax_bytes(spec: TransformerSpec, run: RunSpec) -> float:
    """Eager OPT / Llama compute the softmax in float32 and cast back; GPT-2 keeps the dtype."""
    if run.implementation == "eager" and spec.family in ("opt", "llama"):
        return max(FP32, run.act_bytes)
    return run.act_bytes


def _dropout(spec: TransformerSpec, run: RunSpec, which: str) -> bool:
    return run.dropout and getattr(spec, which) > 0.0


def layer_activation_terms(spec: TransformerSpec, run: RunSpec) -> dict[str, float]:
    """Bytes that one layer saves for its backward pass (Korthikanti et al. 2022, Sec. 4.1,
    extended to RMSNorm/SwiGLU, grouped-query attention, flash attention and eager PyTorch)."""
    d = _dims(spec, run)
    T, F, S = d["T"], d["F"], d["S"]
    p = run.act_bytes
    eager = run.implementation == "eager"
    terms: dict[str, float] = {}

    # Norms keep their input (and float32 statistics); eager RMSNorm also keeps its normalised
    # input for the weight's gradient, computed in float32.
    if spec.norm == "layernorm":
        terms["norm inputs"] = 2 * T * p
        terms["norm statistics"] = 2 * 2 * d["tokens"] * FP32
    elif eager:
        terms["norm inputs"] = 2 * T * max(p, FP32)
        terms["norm normalised"] = 2 * T * p
        terms["norm statistics"] = 2 * d["tokens"] * FP32
    else:
        terms["norm inputs"] = 2 * T * p
        terms["norm statistics"] = 2 * d["tokens"] * FP32

    terms["qkv input"] = T * p
    # Eager repeats grouped k/v heads before the matmul, so it saves them at full size.
    kv = 1.0 if eager else spec.kv_fraction
    terms["q, k, v"] = (1 + 2 * kv) * T * p
    if run.attention == "flash":
        terms["attention output + logsumexp"] = T * p + d["heads_tokens"] * FP32
    else:
        softmax = _softmax_bytes(spec, run)
        terms["softmax output"] = S * softmax
        if softmax != p:  # the cast copy that multiplies V
            terms["softmax output, cast"] = S * p
        if _dropout(spec, run, "attention_dropout"):
            terms["attention dropout mask + output"] = S * (MASK_BYTES + p)
    terms["output projection input"] = T * p
    terms["mlp input"] = T * p
    terms["mlp activations"] = F * p * _mlp_saved_tensors(spec, run)
    if _dropout(spec, run, "activation_dropout"):
        terms["activation dropout mask + output"] = F * (MASK_BYTES + p)
    if _dropout(spec, run, "hidden_dropout"):
        terms["residual dropout masks"] = 2 * T * MASK_BYTES
    return terms


def _mlp_saved_tensors(spec: TransformerSpec, run: RunSpec) -> int:
    """f-sized tensors the MLP saves, the input of the down projection included."""
    eager = run.implementation == "eager"
    if spec.gated_mlp:
        # fused: gate, up, product; eager: gate, act(gate), up, product
        return 4 if eager else 3
    if spec.activation == "relu":
        return 1  # relu's output is both what relu's backward reads and fc2's input
    if eager and spec.activation == "gelu_new":
        # NewGELU in Python: x, tanh(...), 0.5·x, 1 + tanh(...), then fc2's input
        return 5
    return 2  # activation input, fc2 input


def layer_activations(spec: TransformerSpec, run: RunSpec) -> float:
    return sum(layer_activation_terms(spec, run).values())


def layer_activation_split(spec: TransformerSpec, run: RunSpec) -> tuple[float, float]:
    """(attention half, MLP half) of one layer's saved bytes; the MLP half is freed first in the
    backward pass."""
    terms = layer_activation_terms(spec, run)
    p = run.act_bytes
    T = _dims(spec, run)["T"]
    norm_share = 0.5 * (terms.get("norm inputs", 0) + terms.get("norm normalised", 0)
                        + terms.get("norm statistics", 0))
    mlp = (terms["mlp input"] + terms["mlp activations"] + norm_share
           + terms.get("activation dropout mask + output", 0)
           + 0.5 * terms.get("residual dropout masks", 0))
    mlp += T * p  # the output projection's input is released with the attention's backward
    total = sum(terms.values())
    return total - mlp, mlp


def model_activation_terms(spec: TransformerSpec, run: RunSpec) -> dict[str, float]:
    """Bytes saved outside the layers: embeddings, final norm, output head and the loss."""
    d = _dims(spec, run)
    T, p = d["T"], run.act_bytes
    terms = {"token ids and targets": 2 * d["tokens"] * 8}
    if spec.family == "llama" and run.implementation == "eager":
        terms["rotary cos/sin"] = 2 * run.seq_len * spec.dim_head * FP32  # shared by all layers
    if spec.family in ("gpt2", "opt") and _dropout(spec, run, "hidden_dropout"):
        terms["embedding dropout mask"] = T * MASK_BYTES
    if spec.final_norm:
        if spec.norm == "rmsnorm" and run.implementation == "eager":
            terms["final norm"] = T * (max(p, FP32) + p) + d["tokens"] * FP32
        else:
            stats = 2 if spec.norm == "layernorm" else 1
            terms["final norm"] = T * p + stats * d["tokens"] * FP32
    head_input = d["tokens"] * spec.word_embed_dim
    if spec.word_embed_dim != spec.hidden_size:
        terms["project_in/out inputs"] = (T + head_input) * p
    terms["output head input"] = head_input * p
    # Hugging Face's loss upcasts the logits to float32; log_softmax saves its float32 output.
    terms["log-softmax output (fp32)"] = d["logits"] * FP32
    return terms


def stored_activations(spec: TransformerSpec, run: RunSpec, checkpointed: int = 0) -> float:
    """Activations BP keeps from the forward pass for the backward pass, with ``checkpointed``
    of the L layers keeping only their input (the layer being recomputed is a transient, see
    ``bp_activation_peak``)."""
    per_layer = layer_activations(spec, run)
    T = _dims(spec, run)["T"]
    kept = (spec.num_layers - checkpointed) * per_layer + checkpointed * T * run.act_bytes
    if checkpointed:
        kept += _mask_bytes(spec, run)  # the recomputation needs the causal mask again
    return kept + sum(model_activation_terms(spec, run).values())


def _mask_bytes(spec: TransformerSpec, run: RunSpec) -> float:
    """Eager transformers materialises the causal mask as (b, 1, s, s) in the model dtype;
    fused and flash kernels apply it implicitly."""
    if run.implementation == "eager" and run.attention == "standard":
        return run.batch_size * run.seq_len ** 2 * run.act_bytes
    return 0.0


def forward_persistent(spec: TransformerSpec, run: RunSpec) -> float:
    """Tensors alive during the whole forward pass besides the current layer: the residual
    stream, and for eager transformers the embedding outputs its forward keeps in locals and the
    materialised mask."""
    d = _dims(spec, run)
    T, p = d["T"], run.act_bytes
    persistent = T * p  # the residual stream entering the current layer
    if run.implementation == "eager":
        persistent += _mask_bytes(spec, run)
        if spec.family == "gpt2":
            persistent += T * p + run.seq_len * spec.hidden_size * p  # token + position embeds
        elif spec.family == "opt":
            persistent += 2 * T * p
        else:
            persistent += T * p
    return persistent


def forward_working_set(spec: TransformerSpec, run: RunSpec) -> dict[str, float]:
    """Peak bytes of one forward pass without autograd (MeZO), by phase; the peak is their max.
    Phases are the attention and the MLP of one layer and the output head with the loss."""
    d = _dims(spec, run)
    T, F, S, p = d["T"], d["F"], d["S"], run.act_bytes
    eager = run.implementation == "eager"
    base = forward_persistent(spec, run)
    kv = 1.0 if eager else spec.kv_fraction
    # the layer input (residual), the normalised input, q, k, v
    attention = base + T * p * (1 + 1 + 1 + 2 * kv)
    if run.attention == "flash":
        attention += T * p  # the output
    else:
        # scores and the next elementwise result (scaled / masked / softmaxed) coexist
        attention += S * (p + _softmax_bytes(spec, run))
        if eager:
            attention += T * p  # contiguous copy of a transposed operand of the batched matmul
    probs_kept = S * p if eager and run.attention == "standard" else 0.0
    # Eager transformers layers keep the attention weights in a local until the layer returns.
    if spec.gated_mlp:
        mlp_tensors = 3  # act(gate), up, their product
    elif eager and spec.activation == "gelu_new":
        mlp_tensors = 4  # fc1 output, 0.5·x and two temporaries of the tanh formula
    else:
        mlp_tensors = 2  # fc1 output, activation output
    mlp = base + 2 * T * p + mlp_tensors * F * p + probs_kept
    logits = d["logits"]
    head = base + T * p + logits * p + logits * FP32
    if p < FP32 and eager:
        head += logits * FP32  # transformers' float32 upcast of the logits before the loss
    return {"attention": attention, "mlp": mlp, "output head": head}


def backward_transients(spec: TransformerSpec, run: RunSpec) -> dict[str, float]:
    """Activation bytes the backward pass holds on top of the stored activations, by phase, net
    of what that phase has already released (gradients of weights not included)."""
    d = _dims(spec, run)
    S, F, p = d["S"], d["F"], run.act_bytes
    # loss: nll gradient and d logits, both float32 (and d logits cast back when p < 4)
    head = 2 * d["logits"] * FP32
    if p < FP32 and run.implementation == "eager":
        head += d["logits"] * p  # d logits cast back to the activation dtype
    attention_half, mlp_half = layer_activation_split(spec, run)
    if run.attention == "flash":
        attention = 0.0
    else:
        # gradient of the probabilities and of the scores while the probabilities are still held
        attention = S * (p + _softmax_bytes(spec, run))
    # by the time the top layer runs its backward, the loss, the output head and the final norm
    # have released what they saved (token ids aside)
    head_released = sum(value for key, value in model_activation_terms(spec, run).items()
                        if key not in ("token ids and targets", "rotary cos/sin"))
    attention += -mlp_half - head_released
    mlp = 2 * F * p - head_released
    return {"output head": head, "attention": attention, "mlp": mlp}


def bp_activation_phases(spec: TransformerSpec, run: RunSpec,
                         checkpointed: int = 0) -> dict[str, float]:
    """Activation bytes of a BP step at each backward phase: the stored activations plus that
    phase's transient; with checkpointing, a layer phase also holds one recomputed layer (its
    forward temporaries, then its activations and their gradients)."""
    stored = stored_activations(spec, run, checkpointed)
    transients = backward_transients(spec, run)
    layer_backward = max(transients["attention"], transients["mlp"])
    phases = {"output head": stored + transients["output head"]}
    if checkpointed:
        recompute_forward = forward_working_set(spec, run)["attention"] \
            - forward_persistent(spec, run)
        phases["top layer"] = stored + max(layer_activations(spec, run) + layer_backward,
                                           recompute_forward)
    else:
        phases["top layer"] = stored + layer_backward
    return phases


def bp_activation_peak(spec: TransformerSpec, run: RunSpec, checkpointed: int = 0) -> float:
    """Peak activation bytes of a BP step (the largest of ``bp_activation_phases``)."""
    return max(bp_activation_phases(spec, run, checkpointed).values())


# ---------------------------------------------------------------------------------------------
# Totals
# ---------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class MethodMemory:
    method: str
    weights: float
    gradients: float
    optimizer_state: float
    stored_activations: float  # kept from the forward for the backward (Korthikanti's term)
    activations: float  # peak activation memory: stored + transients; MeZO: one forward's peak
    step_peak: float  # timeline of one first step from a fresh start (what validation measures)
    checkpointed_layers: int = 0

    @property
    def total(self) -> float:
        """weights + gradients + optimizer state + peak activations."""
        return self.weights + self.gradients + self.optimizer_state + self.activations


@dataclass(frozen=True)
class MemoryEstimate:
    spec: TransformerSpec
    run: RunSpec
    parameters: int
    bp: MethodMemory
    bp_checkpointed: MethodMemory
    mezo: MethodMemory

    @property
    def mezo_over_bp(self) -> float:
        return self.mezo.total / self.bp.total

    @property
    def mezo_over_bp_checkpointed(self) -> float:
        return self.mezo.total / self.bp_checkpointed.total

    def methods(self) -> list[MethodMemory]:
        return [self.bp, self.bp_checkpointed, self.mezo]


def _bp(spec, run, params, checkpointed, name) -> MethodMemory:
    weights = params * run.weight_bytes
    grads = params * run.gradient_bytes
    state = params * OPTIMIZERS[run.optimizer] * run.optimizer_state_bytes
    stored = stored_activations(spec, run, checkpointed)
    phases = bp_activation_phases(spec, run, checkpointed)
    peak_activations = max(phases.values())
    # Step timeline: gradients are allocated during the backward pass. The loss's backward runs
    # before any of them exists; at the top layer's backward only the output head's and that
    # layer's gradients do. The optimizer's first step then allocates its state, and torch's
    # per-tensor Adam (the default on CPU) about two temporaries of the largest weight.
    early_grads = (spec.vocab_size * spec.word_embed_dim + layer_parameters(spec)) \
        * run.gradient_bytes
    optimizer_temps = (2 * largest_parameter(spec) * run.optimizer_state_bytes
                       if run.optimizer == "adam" else 0.0)
    step_peak = weights + max(phases["output head"], phases["top layer"] + early_grads,
                              grads + state + optimizer_temps)
    return MethodMemory(name, weights, grads, state, stored, peak_activations, step_peak,
                        checkpointed)


def estimate(model, run: RunSpec | None = None, **run_settings) -> MemoryEstimate:
    """Memory of BP, BP with checkpointing of L′ layers, and MeZO for one model and run."""
    spec = load_spec(model)
    if run is None:
        run = RunSpec(**run_settings)
    elif run_settings:
        run = dataclasses.replace(run, **run_settings)
    params = count_parameters(spec)
    bp = _bp(spec, run, params, 0, "BP")
    bp_ckpt = _bp(spec, run, params, run.checkpointed(spec.num_layers), "BP+ckpt")
    weights = params * run.weight_bytes
    working = max(forward_working_set(spec, run).values())
    working = max(working, run.perturbation_workspace)
    mezo = MethodMemory("MeZO", weights, 0.0, 0.0, 0.0, working, weights + working)
    return MemoryEstimate(spec, run, params, bp, bp_ckpt, mezo)


def korthikanti_layer_bytes(spec: TransformerSpec, seq_len: int, batch_size: int) -> float:
    """s·b·h·(34 + 5·a·s/h): their per-layer count for 16-bit GPT layers with dropout."""
    s, b, h, a = seq_len, batch_size, spec.hidden_size, spec.num_heads
    return s * b * h * (34 + 5 * a * s / h)


# ---------------------------------------------------------------------------------------------
# Encoders (BERT, MPNet): fine-tuning a sentence encoder with a small head, on a CPU
# ---------------------------------------------------------------------------------------------

ENCODER_TYPES = ("bert", "mpnet")


@dataclass(frozen=True)
class EncoderSpec:
    """A BERT-like encoder (post-norm layers, GELU MLP, biases everywhere), as ``AutoModel``
    builds it: embeddings, ``num_layers`` layers and the pooler, plus a task head of
    ``head_classes`` outputs on the hidden size (fastzo finetune's embedding head)."""

    name: str
    model_type: str  # bert | mpnet
    hidden_size: int
    num_layers: int
    num_heads: int
    intermediate_size: int
    vocab_size: int
    max_positions: int
    type_vocab_size: int = 0  # BERT's token types; MPNet has none
    relative_buckets: int = 0  # MPNet's relative attention bias: a (buckets x heads) table
    pooler: bool = True
    attention_dropout: float = 0.1
    hidden_dropout: float = 0.1
    head_classes: int = 2

    def __post_init__(self):
        if self.model_type not in ENCODER_TYPES:
            raise ValueError(f"model_type must be one of {ENCODER_TYPES}, got {self.model_type!r}")
        for name in ("hidden_size", "num_layers", "num_heads", "intermediate_size", "vocab_size"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be positive, got {getattr(self, name)}")


def encoder_spec_from_config(config, name: str | None = None, head_classes: int = 2) -> EncoderSpec:
    """An encoder spec from a BERT or MPNet config (dict, path to config.json or its folder,
    or a ``PretrainedConfig``)."""
    config, name = _load_config(config, name)
    model_type = config.get("model_type", "")
    if model_type not in ENCODER_TYPES:
        raise ValueError(f"unsupported encoder model_type {model_type!r}: fastzo.memory knows {ENCODER_TYPES}")
    get = config.get
    return EncoderSpec(
        name=name or get("_name_or_path") or model_type, model_type=model_type,
        hidden_size=get("hidden_size", 768), num_layers=get("num_hidden_layers", 12),
        num_heads=get("num_attention_heads", 12), intermediate_size=get("intermediate_size", 3072),
        vocab_size=get("vocab_size", 30522), max_positions=get("max_position_embeddings", 512),
        type_vocab_size=get("type_vocab_size", 2) if model_type == "bert" else 0,
        relative_buckets=get("relative_attention_num_buckets", 32) if model_type == "mpnet" else 0,
        attention_dropout=float(get("attention_probs_dropout_prob", 0.1)),
        hidden_dropout=float(get("hidden_dropout_prob", 0.1)), head_classes=head_classes)


def is_encoder_config(model) -> bool:
    """Whether ``model`` (a path to a config.json or its folder, or a dict) is a BERT/MPNet config."""
    if isinstance(model, EncoderSpec):
        return True
    if isinstance(model, dict):
        return model.get("model_type") in ENCODER_TYPES
    if isinstance(model, (str, os.PathLike)) and os.path.exists(model):
        path = Path(model)
        path = path / "config.json" if path.is_dir() else path
        try:
            with open(path) as handle:
                return json.load(handle).get("model_type") in ENCODER_TYPES
        except (OSError, ValueError):
            return False
    return False


def encoder_parameters(spec: EncoderSpec, head: bool = False) -> int:
    """Exact parameter count of ``AutoModel`` for the config (with the task head if ``head``)."""
    h, f = spec.hidden_size, spec.intermediate_size
    embeddings = (spec.vocab_size + spec.max_positions + spec.type_vocab_size) * h + 2 * h
    layer = 4 * (h * h + h) + (h * f + f) + (f * h + h) + 2 * 2 * h
    total = embeddings + spec.num_layers * layer + spec.relative_buckets * spec.num_heads
    if spec.pooler:
        total += h * h + h
    if head:
        total += h * spec.head_classes + spec.head_classes
    return total


@dataclass(frozen=True)
class EncoderRun:
    batch_size: int = 16
    seq_len: int = 64
    weight_bytes: float = 4.0
    act_bytes: float = 4.0
    optimizer: str = "adam"  # Adam/AdamW: two state tensors per parameter
    baseline: float = 0.0  # bytes the process holds before the model (torch, tokenizer, data)

    def __post_init__(self):
        if self.batch_size < 1 or self.seq_len < 1:
            raise ValueError(f"batch_size and seq_len must be positive, got {self.batch_size}, {self.seq_len}")
        if self.optimizer not in OPTIMIZERS:
            raise ValueError(f"optimizer must be one of {tuple(OPTIMIZERS)}, got {self.optimizer!r}")


def encoder_layer_stored(spec: EncoderSpec, run: EncoderRun) -> float:
    """Bytes one layer keeps for the backward pass in training mode (eager PyTorch, dropout on):
    the inputs of the six linear layers (x once for q, k, v; the attention context; the norm
    output entering the MLP; the GELU output), q, k, v for the attention's backward, the GELU
    input, both norms' inputs, the scores and the attention probabilities before and after
    dropout with its mask, the two hidden dropout masks (1 byte per element), and one more
    hidden-sized tensor (the heads merged back). Checked against the storages autograd saves
    (``saved_tensors_hooks``) for all-MiniLM-L6-v2 and all-mpnet-base-v2 at batch 16 x 64
    tokens: 220.7 MiB and 765.4 MiB measured against 219.4 and 756.8 predicted."""
    tokens = run.batch_size * run.seq_len
    T, F = tokens * spec.hidden_size, tokens * spec.intermediate_size
    S = run.batch_size * spec.num_heads * run.seq_len ** 2
    p = run.act_bytes
    stored = 9 * T * p + 2 * F * p + 2 * S * p
    if spec.attention_dropout > 0:
        stored += S * (p + MASK_BYTES)
    if spec.hidden_dropout > 0:
        stored += 2 * T * MASK_BYTES
    return stored


def encoder_forward_working_set(spec: EncoderSpec, run: EncoderRun) -> float:
    """Peak bytes of a forward without autograd (MeZO, evaluation): the residual stream (and
    MPNet's relative position bias, computed once for all layers) plus the larger of the
    attention (input, q, k, v, scores, probabilities) and the MLP (input, intermediate, GELU
    output, output) of one layer."""
    tokens = run.batch_size * run.seq_len
    T, F = tokens * spec.hidden_size, tokens * spec.intermediate_size
    S = run.batch_size * spec.num_heads * run.seq_len ** 2
    p = run.act_bytes
    persistent = T * p + (S * p if spec.relative_buckets else 0.0)
    attention = 4 * T * p + 2 * S * p
    mlp = 2 * T * p + 2 * F * p
    return persistent + max(attention, mlp)


def encoder_estimate(model, run: EncoderRun | None = None, **run_settings) -> dict[str, MethodMemory]:
    """Predicted peak of a training step of backprop (with the optimizer) and of MeZO, in bytes,
    for an encoder with its task head; ``step_peak`` adds ``run.baseline``.

    BP, in the steady state of a long run (the optimizer state exists from the first step on,
    gradients are set to None before each forward): weights + optimizer state + the larger of
    (the stored activations of every layer and of the embeddings + the backward's transient of
    one layer, gradients of the scores and of the MLP intermediate, + all gradients) and (all
    gradients + the per-tensor optimizer's temporaries, about two of the largest weight, the
    word embeddings). All gradients, not those of one layer: on a CPU the allocator keeps the
    activations freed during the backward pass in its arenas until the step ends, so the
    process's peak RSS sees them together with the gradients. MeZO: weights + one forward's
    working set (the perturbation is in place: nothing else).

    ``run.baseline`` is what the process holds besides the model: interpreter, torch,
    transformers, tokenizer and data, and the compute libraries' code and buffers that the
    first forward pass loads (about 260 MiB on the 2-core Xeon of ``benchmarks/equal_memory.py``,
    measured with a toy model; see there).
    """
    spec = model if isinstance(model, EncoderSpec) else encoder_spec_from_config(model)
    if run is None:
        run = EncoderRun(**run_settings)
    elif run_settings:
        run = dataclasses.replace(run, **run_settings)
    params = encoder_parameters(spec, head=True)
    tokens = run.batch_size * run.seq_len
    T = tokens * spec.hidden_size
    S = run.batch_size * spec.num_heads * run.seq_len ** 2
    F = tokens * spec.intermediate_size
    p = run.act_bytes
    weights = params * run.weight_bytes
    embeddings_stored = 2 * T * p + (T * MASK_BYTES if spec.hidden_dropout > 0 else 0.0)
    stored = spec.num_layers * encoder_layer_stored(spec, run) + embeddings_stored
    if spec.relative_buckets:
        stored += S * p  # the position bias, an input of every layer's scores
    transient = max(2 * S * p, 2 * F * p) + 2 * T * p
    grads = params * run.weight_bytes
    state = params * OPTIMIZERS[run.optimizer] * run.weight_bytes
    largest = spec.vocab_size * spec.hidden_size * run.weight_bytes
    temps = 2 * largest if run.optimizer == "adam" else 0.0
    bp_peak = weights + state + grads + max(stored + transient, temps)
    bp = MethodMemory("BP", weights, grads, state, stored, stored + transient, run.baseline + bp_peak)
    working = encoder_forward_working_set(spec, run)
    mezo = MethodMemory("MeZO", weights, 0.0, 0.0, 0.0, working, run.baseline + weights + working)
    return {"BP": bp, "MeZO": mezo}


def format_encoder_table(spec: EncoderSpec, run: EncoderRun) -> str:
    est = encoder_estimate(spec, run)
    lines = [f"{spec.name} ({spec.model_type} encoder): {encoder_parameters(spec):,} parameters "
             f"(+{encoder_parameters(spec, head=True) - encoder_parameters(spec)} in a {spec.head_classes}-class head), "
             f"L={spec.num_layers}, h={spec.hidden_size}, heads={spec.num_heads}, f={spec.intermediate_size}, "
             f"V={spec.vocab_size}",
             f"batch {run.batch_size}, seq {run.seq_len}, {_fmt_num(run.weight_bytes)} B/weight, "
             f"{_fmt_num(run.act_bytes)} B/activation, {run.optimizer}, eager PyTorch on CPU, "
             f"process baseline {run.baseline / 2**20:.0f} MiB",
             "",
             f"{'MiB':<26}{'BP':>10}{'MeZO':>10}"]
    for label, field in [("weights", "weights"), ("gradients", "gradients"), ("optimizer state", "optimizer_state"),
                         ("activations stored", "stored_activations"), ("activations, peak", "activations"),
                         ("peak of a step (+baseline)", "step_peak")]:
        lines.append(f"{label:<26}" + "".join(f"{getattr(est[m], field) / 2**20:10.0f}" for m in ("BP", "MeZO")))
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------
# Largest model under a budget
# ---------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class FittingModel:
    method: str
    spec: TransformerSpec | None  # None: not even one layer fits
    parameters: int
    total: float


def family_member(spec: TransformerSpec, num_layers: int) -> TransformerSpec:
    """The family member with ``num_layers`` layers at the preset's width-to-depth ratio."""
    width = spec.hidden_size * num_layers / spec.num_layers
    head = spec.dim_head
    hidden = max(1, round(width / head)) * head
    return spec.scaled(num_layers, hidden)


def largest_fitting(model, budget_bytes: float, run: RunSpec | None = None,
                    max_layers: int = 4096) -> dict[str, FittingModel]:
    """For each method, the largest member of the preset's family (layers and width scaled
    together) whose total fits ``budget_bytes``."""
    spec = load_spec(model)
    run = run or RunSpec()
    if isinstance(run.checkpoint_layers, int):  # a count for the preset: keep its fraction
        run = dataclasses.replace(run, checkpoint_layers=run.checkpointed(spec.num_layers)
                                  / spec.num_layers)
    result = {}
    for method in ("BP", "BP+ckpt", "MeZO"):
        def total(layers):
            est = estimate(family_member(spec, layers), run)
            return {"BP": est.bp, "BP+ckpt": est.bp_checkpointed, "MeZO": est.mezo}[method].total

        lo, hi = 0, 1  # total(lo) fits (or lo = 0), total(hi) does not
        while hi <= max_layers and total(hi) <= budget_bytes:
            lo, hi = hi, hi * 2
        hi = min(hi, max_layers + 1)
        while hi - lo > 1:
            mid = (lo + hi) // 2
            if total(mid) <= budget_bytes:
                lo = mid
            else:
                hi = mid
        if lo == 0:
            result[method] = FittingModel(method, None, 0, total(1))
        else:
            member = family_member(spec, lo)
            result[method] = FittingModel(method, member, count_parameters(member), total(lo))
    return result


def parse_bytes(text: str | float | int) -> float:
    """'16GiB', '17 GB', '512MiB', '1e9' → bytes."""
    if isinstance(text, (int, float)):
        return float(text)
    match = re.fullmatch(r"\s*([0-9.eE+]+)\s*([KMGT]i?B?|B)?\s*", text, re.IGNORECASE)
    if not match:
        raise ValueError(f"cannot read a size from {text!r}; write e.g. 16GiB, 17GB or 5e9")
    value, unit = float(match.group(1)), (match.group(2) or "B").upper()
    if unit == "B":
        return value
    power = "KMGT".index(unit[0]) + 1
    base = 1024 if "I" in unit else 1000
    return value * base ** power


# ---------------------------------------------------------------------------------------------
# Figure
# ---------------------------------------------------------------------------------------------

def default_seq_lens() -> list[int]:
    return [2 ** k for k in range(7, 15)]  # 128 … 16384


def plot_memory_vs_seq_len(model, path, run: RunSpec | None = None,
                           seq_lens: list[int] | None = None) -> None:
    """Paper Fig. 3 layout: top BP vs MeZO, bottom BP with checkpointing vs MeZO; totals solid on
    the left axis, the MeZO/BP ratio dashed on the right axis."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import matplotlib.ticker

    spec = load_spec(model)
    run = run or RunSpec()
    seq_lens = seq_lens or default_seq_lens()
    rows = [estimate(spec, dataclasses.replace(run, seq_len=s)) for s in seq_lens]
    fig, axes = plt.subplots(2, 1, figsize=(6.4, 7.2), sharex=True)
    panels = [("BP", lambda e: e.bp), ("BP with checkpointing", lambda e: e.bp_checkpointed)]
    for axis, (label, pick) in zip(axes, panels):
        bp = [pick(e).total / GIB for e in rows]
        mezo = [e.mezo.total / GIB for e in rows]
        axis.plot(seq_lens, bp, "-o", color="tab:blue", label=label)
        axis.plot(seq_lens, mezo, "-s", color="tab:orange", label="MeZO")
        axis.set_xscale("log", base=2)
        axis.set_yscale("log")
        plain = matplotlib.ticker.FuncFormatter(lambda value, _: f"{value:g}")
        axis.xaxis.set_major_formatter(plain)
        axis.yaxis.set_major_formatter(plain)
        axis.yaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())
        axis.set_ylabel("total memory [GiB]")
        axis.grid(True, which="both", alpha=0.3)
        ratio_axis = axis.twinx()
        ratio_axis.plot(seq_lens, [m / b for m, b in zip(mezo, bp)], "--", color="tab:green",
                        label="MeZO / " + ("BP" if label == "BP" else "BP+ckpt"))
        ratio_axis.set_ylim(0, 1.05)
        ratio_axis.set_ylabel("MeZO / BP memory", color="tab:green")
        ratio_axis.tick_params(axis="y", colors="tab:green")
        lines = axis.get_legend_handles_labels()
        more = ratio_axis.get_legend_handles_labels()
        axis.legend(lines[0] + more[0], lines[1] + more[1], loc="upper left", fontsize=8)
    ckpt = rows[0].bp_checkpointed.checkpointed_layers
    axes[0].set_title(
        f"{spec.name}: batch {run.batch_size}, {run.optimizer}, {_fmt_num(run.weight_bytes)} B "
        f"weights, {_fmt_num(run.act_bytes)} B activations\n"
        f"checkpointing {ckpt}/{spec.num_layers} layers, {run.implementation} kernels, "
        f"{run.attention} attention", fontsize=9)
    axes[-1].set_xlabel("sequence length")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


# ---------------------------------------------------------------------------------------------
# CLI
# ---------------------------------------------------------------------------------------------

def _fmt_num(x: float) -> str:
    return f"{x:g}"


def _fmt_bytes(x: float) -> str:
    return f"{x / GIB:10.3f}"


def format_table(est: MemoryEstimate) -> str:
    spec, run = est.spec, est.run
    lines = [
        f"{spec.name}: {est.parameters:,} parameters, L={spec.num_layers}, h={spec.hidden_size}, "
        f"heads={spec.num_heads} (kv {spec.num_kv_heads}), f={spec.intermediate_size}, "
        f"V={spec.vocab_size}",
        f"batch {run.batch_size}, seq {run.seq_len}, {_fmt_num(run.weight_bytes)} B/weight, "
        f"{_fmt_num(run.act_bytes)} B/activation, {run.optimizer}, {run.implementation} kernels, "
        f"{run.attention} attention, checkpointing {est.bp_checkpointed.checkpointed_layers}"
        f"/{spec.num_layers} layers",
        "",
        f"{'GiB':<26}{'BP':>10}{'BP+ckpt':>12}{'MeZO':>10}",
    ]
    rows = [("weights", "weights"), ("gradients", "gradients"),
            ("optimizer state", "optimizer_state"),
            ("activations stored", "stored_activations"), ("activations, peak", "activations"),
            ("total", "total"), ("peak of one step", "step_peak")]
    for label, field in rows:
        values = [getattr(m, field) for m in est.methods()]
        lines.append(f"{label:<26}" + f"{_fmt_bytes(values[0])}  {_fmt_bytes(values[1])}"
                     + f"{_fmt_bytes(values[2])}")
    lines.append("")
    lines.append(f"MeZO / BP = {est.mezo_over_bp:.3f}   MeZO / (BP+ckpt) = "
                 f"{est.mezo_over_bp_checkpointed:.3f}")
    return "\n".join(lines)


def format_budget(model, budget: float, run: RunSpec) -> str:
    fits = largest_fitting(model, budget, run)
    lines = [f"largest {load_spec(model).name}-family model within {budget / GIB:.2f} GiB "
             f"(layers and width scaled together):"]
    for method, fit in fits.items():
        if fit.spec is None:
            lines.append(f"  {method:<8} none (one layer needs {fit.total / GIB:.2f} GiB)")
        else:
            lines.append(f"  {method:<8} {fit.parameters / 1e9:8.3f} B parameters  "
                         f"L={fit.spec.num_layers:<4d} h={fit.spec.hidden_size:<6d} "
                         f"total {fit.total / GIB:.2f} GiB")
    return "\n".join(lines)


def _checkpoint_arg(text: str):
    value = float(text)
    if "." in text or "e" in text.lower():
        return value
    return int(value)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="fastzo memory",
        description="Memory of BP, BP with activation checkpointing and MeZO fine-tuning "
                    "(see docs/memory.md).")
    parser.add_argument("model", help=f"a preset ({', '.join(PRESETS)}), a config.json path (decoders; BERT and "
                                      "MPNet encoders), or a named encoder of fastzo finetune "
                                      "(all-MiniLM-L6-v2, all-mpnet-base-v2; fetched if needed)")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--seq-len", type=int, default=2048)
    parser.add_argument("--weight-bytes", type=float, default=2.0)
    parser.add_argument("--act-bytes", type=float, default=2.0)
    parser.add_argument("--grad-bytes", type=float, default=None,
                        help="default: --weight-bytes")
    parser.add_argument("--state-bytes", type=float, default=None,
                        help="bytes per optimizer state element; default: --weight-bytes")
    parser.add_argument("--optimizer", choices=tuple(OPTIMIZERS), default="adam")
    parser.add_argument("--checkpoint-layers", type=_checkpoint_arg, default=None,
                        help="L′: layers recomputed in the backward pass; an integer count or "
                             "a fraction such as 0.41 (default: all layers)")
    parser.add_argument("--implementation", choices=IMPLEMENTATIONS, default="fused")
    parser.add_argument("--attention", choices=ATTENTIONS, default="standard")
    parser.add_argument("--no-dropout", action="store_true",
                        help="ignore the architecture's dropout (no masks stored)")
    parser.add_argument("--plot", metavar="PATH",
                        help="draw total memory against sequence length (PNG)")
    parser.add_argument("--budget", help="e.g. 16GiB: the largest family member that fits")
    parser.add_argument("--baseline", default="0",
                        help="encoders: bytes the process holds besides the model (torch, transformers, "
                             "tokenizer, data and the compute libraries a first forward loads; about 560MiB "
                             "on a 2-core Xeon), added to the predicted peak")
    return parser


def cli_main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        model = args.model
        if model.lower() in ("all-minilm-l6-v2", "minilm", "all-mpnet-base-v2", "mpnet"):
            from .integrations import assets

            model = str(assets.named_model_path(model))
        if is_encoder_config(model):
            run = EncoderRun(batch_size=args.batch, seq_len=args.seq_len, weight_bytes=args.weight_bytes,
                             act_bytes=args.act_bytes, optimizer=args.optimizer,
                             baseline=parse_bytes(args.baseline))
            print(format_encoder_table(encoder_spec_from_config(model), run))
            return 0
        spec = load_spec(model)
        run = RunSpec(batch_size=args.batch, seq_len=args.seq_len,
                      weight_bytes=args.weight_bytes, act_bytes=args.act_bytes,
                      grad_bytes=args.grad_bytes, state_bytes=args.state_bytes,
                      optimizer=args.optimizer, checkpoint_layers=args.checkpoint_layers,
                      implementation=args.implementation, attention=args.attention,
                      dropout=not args.no_dropout)
        print(format_table(estimate(spec, run)))
        if args.budget:
            print()
            print(format_budget(spec, parse_bytes(args.budget), run))
        if args.plot:
            plot_memory_vs_seq_len(spec, args.plot, run)
            print(f"\nwrote {args.plot}")
    except (ValueError, OSError, TypeError, RuntimeError) as exc:
        print(f"fastzo memory: error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(cli_main())

"""Validate fastzo.memory against the measured peak memory of one training step.

Each case builds a small GPT-2-, OPT- or Llama-style model from a config (random weights,
offline, eager attention, dropout 0), runs ONE step in a fresh process and reports the peak
memory above the baseline taken just before the step (weights, inputs and the interpreter
already resident). The prediction is ``fastzo.memory.estimate(...).<method>.step_peak`` minus the
weights, with ``implementation="eager"`` and 4-byte weights and activations.

Measurement (CPU): the kernel's resident-set high-water mark (VmHWM), reset through
/proc/self/clear_refs right before the step; ``ru_maxrss`` where that reset is not allowed.
Workers run with ``MALLOC_MMAP_THRESHOLD_=65536`` so glibc serves every tensor from its own
mapping and returns it on free: RSS then follows live tensor bytes, as
``torch.cuda.max_memory_allocated`` does on a GPU. The ``default_malloc`` column repeats the
measurement with glibc's defaults, where freed blocks stay resident (fragmentation included).
On a GPU the worker uses ``torch.cuda.max_memory_allocated`` instead.

    flock /tmp/fastzo-bench.lock python benchmarks/memory_validation.py            # all cases
    flock /tmp/fastzo-bench.lock python benchmarks/memory_validation.py --quick    # a few

Writes benchmarks/results/memory_validation.csv and prints a table.
"""

from __future__ import annotations

import argparse
import csv
import datetime
import json
import os
import platform
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

RESULTS = ROOT / "benchmarks" / "results" / "memory_validation.csv"
TOLERANCE = 0.15

# Small models where activations dominate the step: hidden 256, 4 layers, long sequences.
MODELS = {
    "gpt2-h256": dict(model_type="gpt2", n_embd=256, n_layer=4, n_head=4, n_inner=None,
                      vocab_size=2048, n_positions=2048, resid_pdrop=0.0, embd_pdrop=0.0,
                      attn_pdrop=0.0, activation_function="gelu_new"),
    "llama-h256-gqa": dict(model_type="llama", hidden_size=256, num_hidden_layers=4,
                           num_attention_heads=4, num_key_value_heads=2, intermediate_size=688,
                           vocab_size=2048, max_position_embeddings=2048, attention_dropout=0.0),
    "opt-h256": dict(model_type="opt", hidden_size=256, num_hidden_layers=4, ffn_dim=1024,
                     num_attention_heads=4, vocab_size=2048, max_position_embeddings=2048,
                     word_embed_proj_dim=256, dropout=0.0, attention_dropout=0.0,
                     activation_dropout=0.0),
    # vocabulary of Llama 2: the output head and the loss dominate MeZO's forward
    "llama-h512-v32k": dict(model_type="llama", hidden_size=512, num_hidden_layers=4,
                            num_attention_heads=8, num_key_value_heads=8,
                            intermediate_size=1376, vocab_size=32000,
                            max_position_embeddings=2048, attention_dropout=0.0),
}

METHODS = {  # name: (optimizer or None for MeZO, checkpointed layers: None none, -1 all, k)
    "bp-sgd": ("sgd", None),
    "bp-adam": ("adam", None),
    "bp-sgd-ckpt": ("sgd", -1),
    "bp-adam-ckpt": ("adam", -1),
    "bp-sgd-ckpt-half": ("sgd", 2),
    "mezo": (None, None),
}

CASES = [  # (model, batch, seq_len, methods)
    ("gpt2-h256", 2, 1024, list(METHODS)),
    ("gpt2-h256", 1, 2048, ["bp-sgd", "bp-sgd-ckpt", "mezo"]),
    ("llama-h256-gqa", 2, 1024, list(METHODS)),
    ("llama-h256-gqa", 1, 2048, ["bp-sgd", "bp-sgd-ckpt", "mezo"]),
    ("opt-h256", 2, 1024, list(METHODS)),
    ("llama-h512-v32k", 4, 512, ["bp-sgd", "bp-adam", "bp-sgd-ckpt", "mezo"]),
]
QUICK = [("gpt2-h256", 2, 1024, ["bp-sgd", "bp-sgd-ckpt", "mezo"]),
         ("llama-h256-gqa", 2, 1024, ["bp-adam", "mezo"])]


# ---------------------------------------------------------------------------------------------
# Worker: one step in this process
# ---------------------------------------------------------------------------------------------

def _resident_bytes() -> int:
    with open("/proc/self/statm") as handle:
        return int(handle.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def _high_water_bytes() -> int | None:
    try:
        with open("/proc/self/status") as handle:
            for line in handle:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        return None
    return None


def _reset_high_water() -> bool:
    try:
        with open("/proc/self/clear_refs", "w") as handle:
            handle.write("5")
        return True
    except OSError:
        return False


def build_model(config: dict):
    import torch  # noqa: F401
    from transformers import AutoConfig, AutoModelForCausalLM

    config = dict(config)
    model_type = config.pop("model_type")
    hf_config = AutoConfig.for_model(model_type, **config)
    hf_config.use_cache = False
    model = AutoModelForCausalLM.from_config(hf_config, attn_implementation="eager")
    return model


def _mezo_step(model, batch, fastzo):
    """One MeZO step: fastzo.MeZO when it exists, else the functional ops."""
    import torch

    def closure():
        return model(**batch).loss

    mezo_class = getattr(fastzo, "MeZO", None)
    if mezo_class is not None:
        optimizer = mezo_class(model.parameters(), lr=1e-6, eps=1e-3)
        optimizer.step(closure)
        return "fastzo.MeZO"
    params = [p for p in model.parameters() if p.requires_grad]
    seed, eps, lr = 1234, 1e-3, 1e-6
    with torch.no_grad():
        fastzo.perturb_(params, seed, eps)
        loss_plus = float(closure())
        fastzo.perturb_(params, seed, -2 * eps)
        loss_minus = float(closure())
        fastzo.restore_and_update_(params, seed, eps, lr, (loss_plus - loss_minus) / (2 * eps))
    return "fastzo.perturb_"


def run_worker(spec: dict) -> dict:
    import gc

    import torch

    import fastzo

    torch.manual_seed(0)
    torch.set_num_threads(int(os.environ.get("FASTZO_BENCH_THREADS", "2")))
    model = build_model(spec["config"])
    on_gpu = spec.get("device") == "cuda"
    if on_gpu:
        model = model.cuda()
    device = next(model.parameters()).device
    model.train()
    optimizer_name, checkpointed = METHODS[spec["method"]]
    num_layers = model.config.num_hidden_layers
    if checkpointed is not None:
        # transformers 5 renamed gradient_checkpointing_enable; either does the same
        enable = getattr(model, "activation_checkpointing_enable", None) \
            or model.gradient_checkpointing_enable
        enable()
        # checkpoint the last k layers only: the conservative case the model assumes
        count = num_layers if checkpointed < 0 else checkpointed
        layers = model.base_model.h if hasattr(model.base_model, "h") else (
            model.base_model.layers if hasattr(model.base_model, "layers")
            else model.base_model.decoder.layers)
        for index, layer in enumerate(layers):
            layer.gradient_checkpointing = index >= num_layers - count
    vocab = model.config.vocab_size

    def make_batch(batch_size, seq_len):
        ids = torch.randint(0, vocab, (batch_size, seq_len), device=device)
        return {"input_ids": ids, "labels": ids}

    optimizer = None
    if optimizer_name == "sgd":
        optimizer = torch.optim.SGD(model.parameters(), lr=1e-6)
    elif optimizer_name == "adam":
        optimizer = torch.optim.Adam(model.parameters(), lr=1e-6)

    # Warm-up at a tiny size: thread pools, kernel caches and lazy imports are not the step.
    tiny = make_batch(1, 8)
    if optimizer_name is None:
        from fastzo.backends import pick_backend

        mezo_impl = f"{_mezo_step(model, tiny, fastzo)} ({pick_backend(device)} backend)"
    else:
        model(**tiny).loss.backward()
        model.zero_grad(set_to_none=True)
        mezo_impl = ""
    batch = make_batch(spec["batch"], spec["seq_len"])
    del tiny
    gc.collect()

    counted_stored = None
    if on_gpu:
        torch.cuda.synchronize()
        baseline = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
    else:
        baseline = _resident_bytes()
        reset = _reset_high_water()
    if optimizer_name is None:
        _mezo_step(model, batch, fastzo)
    else:
        storages, params = {}, {p.untyped_storage().data_ptr() for p in model.parameters()}

        def pack(tensor):  # count saved tensors once per storage; keeps the tensor itself
            pointer = tensor.untyped_storage().data_ptr()
            if pointer not in params:
                storages[pointer] = tensor.untyped_storage().nbytes()
            return tensor

        if checkpointed is None:
            with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
                loss = model(**batch).loss
            counted_stored = sum(storages.values())
        else:
            loss = model(**batch).loss
        loss.backward()
        del loss
        optimizer.step()
    if on_gpu:
        torch.cuda.synchronize()
        peak = torch.cuda.max_memory_allocated()
        how = "cuda.max_memory_allocated"
    else:
        high_water = _high_water_bytes() if reset else None
        if high_water is None:
            import resource

            high_water = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
        peak = high_water
        how = "VmHWM after clear_refs" if reset else "ru_maxrss"
    return {"baseline": baseline, "peak": peak, "delta": peak - baseline, "how": how,
            "mezo_impl": mezo_impl, "counted_stored": counted_stored,
            "params": sum(p.numel() for p in model.parameters())}


# ---------------------------------------------------------------------------------------------
# Parent: cases, predictions, table
# ---------------------------------------------------------------------------------------------

def predict(config: dict, batch: int, seq_len: int, method: str) -> dict:
    from fastzo import memory

    from transformers import AutoConfig

    optimizer_name, checkpointed = METHODS[method]
    fields = dict(config)
    model_type = fields.pop("model_type")
    spec = memory.spec_from_config(AutoConfig.for_model(model_type, **fields).to_dict())
    run = memory.RunSpec(
        batch_size=batch, seq_len=seq_len, weight_bytes=4, act_bytes=4,
        optimizer=optimizer_name or "sgd", implementation="eager", attention="standard",
        checkpoint_layers=None if checkpointed in (None, -1) else checkpointed)
    est = memory.estimate(spec, run)
    if optimizer_name is None:
        chosen = est.mezo
    elif checkpointed is None:
        chosen = est.bp
    else:
        chosen = est.bp_checkpointed
    delta = chosen.step_peak - chosen.weights
    stored = memory.stored_activations(spec, run, 0)
    share = chosen.activations / delta if delta else 0.0
    return {"predicted": delta, "predicted_stored": stored if method.startswith("bp")
            and checkpointed is None else None, "activation_share": share,
            "params": est.parameters}


def spawn(spec: dict, default_malloc: bool) -> dict:
    env = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_VERBOSITY="error")
    # The Triton interpreter would run MeZO's passes on CPU 30x slower than the C++ backend.
    env.pop("TRITON_INTERPRET", None)
    if default_malloc:
        env.pop("MALLOC_MMAP_THRESHOLD_", None)
    else:
        env["MALLOC_MMAP_THRESHOLD_"] = "65536"
    out = subprocess.run([sys.executable, __file__, "--worker", json.dumps(spec)], env=env,
                         capture_output=True, text=True, check=False)
    if out.returncode:
        raise RuntimeError(f"worker failed for {spec}:\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    parser.add_argument("--quick", action="store_true", help="a few cases only")
    parser.add_argument("--no-default-malloc", action="store_true",
                        help="skip the second measurement with glibc's default malloc")
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    parser.add_argument("--out", default=str(RESULTS))
    args = parser.parse_args(argv)
    if args.worker:
        print(json.dumps(run_worker(json.loads(args.worker))))
        return 0

    import torch
    import transformers

    rows = []
    header = (f"{'model':<16}{'b':>3}{'s':>6} {'method':<17}{'predicted MiB':>14}"
              f"{'measured MiB':>14}{'error':>8}{'act share':>10}{'default malloc':>16}")
    print(header)
    for model_name, batch, seq_len, methods in (QUICK if args.quick else CASES):
        config = MODELS[model_name]
        for method in methods:
            spec = {"config": config, "batch": batch, "seq_len": seq_len, "method": method,
                    "device": args.device}
            pred = predict(config, batch, seq_len, method)
            meas = spawn(spec, default_malloc=False)
            default = None
            if not args.no_default_malloc and args.device == "cpu":
                default = spawn(spec, default_malloc=True)["delta"]
            error = (pred["predicted"] - meas["delta"]) / meas["delta"]
            row = {
                "model": model_name, "family": config["model_type"], "batch": batch,
                "seq_len": seq_len, "method": method, "params": meas["params"],
                "predicted_bytes": round(pred["predicted"]), "measured_bytes": meas["delta"],
                "rel_error": round(error, 4), "activation_share": round(pred["activation_share"], 3),
                "measured_default_malloc_bytes": default,
                "predicted_stored_bytes": None if pred["predicted_stored"] is None
                else round(pred["predicted_stored"]),
                "counted_stored_bytes": meas["counted_stored"],
                "baseline_bytes": meas["baseline"], "measurement": meas["how"],
                "mezo_impl": meas["mezo_impl"], "device": args.device,
                "torch": torch.__version__, "transformers": transformers.__version__,
                "machine": platform.machine(),
                "timestamp": datetime.datetime.now().isoformat(timespec="seconds"),
            }
            rows.append(row)
            default_text = f"{default / 2**20:14.1f}" if default is not None else f"{'-':>14}"
            print(f"{model_name:<16}{batch:>3}{seq_len:>6} {method:<17}"
                  f"{pred['predicted'] / 2**20:14.1f}{meas['delta'] / 2**20:14.1f}"
                  f"{error:+8.1%}{pred['activation_share']:10.2f}  {default_text}", flush=True)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    with open(out, "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    worst = max(abs(r["rel_error"]) for r in rows)
    print(f"\n{len(rows)} cases, worst |error| {worst:.1%} (target {TOLERANCE:.0%}); wrote {out}")
    return 0 if worst <= TOLERANCE else 1


if __name__ == "__main__":
    sys.exit(main())

"""End to end: MeZO fine-tuning of a small transformer in float32 and in bfloat16.

A tiny Llama (built from a config, random init) is first trained with backprop (AdamW, float32)
on a synthetic language A: sequences of a sparse random Markov chain over a small vocabulary.
It is then fine-tuned with fastzo.MeZO on language B, a second chain that shares half of A's
transitions, from the same start, with the same seeds, batches and steps, at each learning rate
(by default 5e-4, where a step moves a typical weight by about a bf16 ulp or more, and 1e-4, where it
moves it by about one ulp or less, as in the fine-tuning of large models), as:

- float32                      (the reference)
- bf16 plain                   exact_perturbation=False, stochastic_rounding=False
- bf16 SR only                 exact_perturbation=False, stochastic_rounding=True (the defaults)
- bf16 exact only              exact_perturbation=True,  stochastic_rounding=False
- bf16 exact + SR              exact_perturbation=True,  stochastic_rounding=True

Every run evaluates the loss on a fixed held-out batch of B (in its own dtype) along the way.
Writes benchmarks/results/lowprec_finetune.csv and .png.

    python benchmarks/lowprec_finetune.py                      # defaults below
    python benchmarks/lowprec_finetune.py --steps 500 --lrs 1e-3 --variants fp32,sr,exact_sr
"""

from __future__ import annotations

import argparse
import csv
import os
import sys
import time

import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

import fastzo  # noqa: E402

HERE = os.path.dirname(os.path.abspath(__file__))
VARIANTS = {
    "fp32": dict(dtype=torch.float32, exact_perturbation=None, stochastic_rounding=None,
                 label="float32"),
    "plain": dict(dtype=torch.bfloat16, exact_perturbation=False, stochastic_rounding=False,
                  label="bf16 plain (RNE perturbation, RNE update)"),
    "sr": dict(dtype=torch.bfloat16, exact_perturbation=False, stochastic_rounding=True,
               label="bf16 SR only (the default)"),
    "exact": dict(dtype=torch.bfloat16, exact_perturbation=True, stochastic_rounding=False,
                  label="bf16 exact only"),
    "exact_sr": dict(dtype=torch.bfloat16, exact_perturbation=True, stochastic_rounding=True,
                     label="bf16 exact + SR"),
}


def markov_chain(vocab: int, fanout: int, gen: torch.Generator) -> torch.Tensor:
    """Transition matrix: each token goes to `fanout` random successors with random weights."""
    probs = torch.zeros(vocab, vocab)
    for t in range(vocab):
        succ = torch.randperm(vocab, generator=gen)[:fanout]
        probs[t, succ] = torch.rand(fanout, generator=gen) + 0.2
    return probs / probs.sum(1, keepdim=True)


def sample(chain: torch.Tensor, batch: int, length: int, gen: torch.Generator) -> torch.Tensor:
    vocab = chain.shape[0]
    x = torch.empty(batch, length, dtype=torch.long)
    x[:, 0] = torch.randint(0, vocab, (batch,), generator=gen)
    for i in range(1, length):
        x[:, i] = torch.multinomial(chain[x[:, i - 1]], 1, generator=gen).squeeze(1)
    return x


def build_model(vocab: int, width: int, layers: int, seed: int):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=vocab, hidden_size=width, intermediate_size=2 * width,
                         num_hidden_layers=layers, num_attention_heads=4, num_key_value_heads=4,
                         max_position_embeddings=128, tie_word_embeddings=False)
    return LlamaForCausalLM(config)


def lm_loss(model, x: torch.Tensor) -> torch.Tensor:
    logits = model(input_ids=x).logits[:, :-1].float()
    return torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), x[:, 1:].reshape(-1))


def pretrain(model, chain, steps, batch, length, gen):
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    for step in range(steps):
        loss = lm_loss(model, sample(chain, batch, length, gen))
        opt.zero_grad()
        loss.backward()
        opt.step()
    return loss.item()


def finetune(start_state, variant, lr, seed, args, chain_b, eval_batch, rows):
    spec = VARIANTS[variant]
    model = build_model(args.vocab, args.width, args.layers, seed=0)
    model.load_state_dict(start_state)
    model = model.to(spec["dtype"])
    model.eval()
    opt = fastzo.MeZO(model.parameters(), lr=lr, eps=args.eps, seed=seed, backend=args.backend,
                      exact_perturbation=spec["exact_perturbation"],
                      stochastic_rounding=spec["stochastic_rounding"])
    data_gen = torch.Generator().manual_seed(99)  # the same batches for every variant
    flat = torch.cat([p.detach().float().reshape(-1) for p in model.parameters()])
    rms = flat.pow(2).mean().sqrt().item()
    weight_ulp = 2.0 ** (torch.floor(torch.log2(torch.tensor(rms))).item() - 7)  # bf16 ulp at rms
    t0 = time.perf_counter()
    with torch.no_grad():
        evaluation = lm_loss(model, eval_batch).item()
    rows.append(dict(lr=lr, seed=seed, variant=variant, label=spec["label"], step=0, train_loss="",
                     eval_loss=evaluation))
    window, grads = [], []
    for step in range(1, args.steps + 1):
        x = sample(chain_b, args.batch, args.length, data_gen)
        window.append(opt.step(lambda: lm_loss(model, x)))
        grads.append(abs(opt.last_step.projected_grad))
        if step % args.eval_every == 0 or step == args.steps:
            with torch.no_grad():
                evaluation = lm_loss(model, eval_batch).item()
            train = sum(window) / len(window)
            # a typical update lr·|g|·|z| in bf16 ulps at the weights' rms (0.8 = E|z|)
            update_ulps = lr * sorted(grads)[len(grads) // 2] * 0.8 / weight_ulp
            window, grads = [], []
            rows.append(dict(lr=lr, seed=seed, variant=variant, label=spec["label"], step=step,
                             train_loss=train, eval_loss=evaluation, median_update_ulps=update_ulps))
            print(f"  {variant:7s} seed {seed} step {step:5d}: train {train:.4f}  eval {evaluation:.4f}  "
                  f"median update {update_ulps:.2f} bf16 ulp  ({time.perf_counter() - t0:.0f} s)",
                  flush=True)
    return evaluation


def plot(rows, lrs, path, title):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(lrs), figsize=(6.5 * len(lrs), 4.5), squeeze=False)
    for ax, lr in zip(axes[0], lrs):
        for variant in VARIANTS:
            runs = {}
            for r in rows:
                if r["variant"] == variant and r["lr"] == lr:
                    runs.setdefault(r["step"], []).append(r["eval_loss"])
            if runs:
                xs = sorted(runs)
                mean = [sum(runs[x]) / len(runs[x]) for x in xs]
                line, = ax.plot(xs, mean, label=VARIANTS[variant]["label"] + " (mean of seeds)",
                                linestyle="--" if variant == "fp32" else "-")
                ax.fill_between(xs, [min(runs[x]) for x in xs], [max(runs[x]) for x in xs],
                                color=line.get_color(), alpha=0.12)
        ax.set_xlabel("MeZO step")
        ax.set_ylabel("held-out loss on language B")
        ax.set_title(f"lr {lr}", fontsize=10)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=130)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=3000)
    parser.add_argument("--pretrain-steps", type=int, default=400)
    parser.add_argument("--lrs", default="5e-4,1e-4", help="comma-separated learning rates")
    parser.add_argument("--eps", type=float, default=1e-3)
    parser.add_argument("--vocab", type=int, default=64)
    parser.add_argument("--width", type=int, default=64)
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--length", type=int, default=32)
    parser.add_argument("--eval-every", type=int, default=250)
    parser.add_argument("--backend", default=None)
    parser.add_argument("--variants", default="fp32,plain,sr,exact,exact_sr")
    parser.add_argument("--seeds", default="1234,1235,1236", help="MeZO base seeds (same batches)")
    parser.add_argument("--out", default=os.path.join(HERE, "results", "lowprec_finetune"))
    args = parser.parse_args(argv)
    torch.set_num_threads(min(2, torch.get_num_threads()))

    gen = torch.Generator().manual_seed(0)
    chain_a = markov_chain(args.vocab, 4, gen)
    chain_b = chain_a.clone()
    swapped = torch.randperm(args.vocab, generator=gen)[: args.vocab // 2]
    chain_b[swapped] = markov_chain(args.vocab, 4, gen)[swapped]  # half the rows changed
    eval_batch = sample(chain_b, 64, args.length, torch.Generator().manual_seed(7))

    model = build_model(args.vocab, args.width, args.layers, seed=0)
    n_params = sum(p.numel() for p in model.parameters())
    t0 = time.perf_counter()
    final = pretrain(model, chain_a, args.pretrain_steps, 32, args.length, gen)
    with torch.no_grad():
        start_b = lm_loss(model, eval_batch).item()
    print(f"tiny Llama, {n_params} parameters; backprop pretraining on A: {args.pretrain_steps} "
          f"steps, final train loss {final:.3f}; loss on B at the start {start_b:.3f} "
          f"({time.perf_counter() - t0:.0f} s)")
    start_state = {k: v.clone() for k, v in model.state_dict().items()}

    rows: list[dict] = []
    finals = {}
    lrs = [float(x) for x in args.lrs.split(",")]
    os.makedirs(os.path.dirname(args.out), exist_ok=True)
    seeds = [int(x) for x in args.seeds.split(",")]
    title = (f"MeZO fine-tuning of a tiny Llama ({n_params} params) from the same backprop-trained "
             f"start; eps {args.eps}, Gaussian z, same batches; band: min-max over {len(seeds)} seeds")
    for lr in lrs:
        for variant in args.variants.split(","):
            print(f"MeZO {VARIANTS[variant]['label']}: lr {lr}, eps {args.eps}, {args.steps} steps")
            for seed in seeds:
                finals.setdefault((lr, variant), []).append(
                    finetune(start_state, variant, lr, seed, args, chain_b, eval_batch, rows))
                with open(args.out + ".csv", "w", newline="") as f:  # written as it goes
                    writer = csv.DictWriter(f, fieldnames=["lr", "seed", "variant", "label", "step",
                                                           "train_loss", "eval_loss",
                                                           "median_update_ulps"])
                    writer.writeheader()
                    writer.writerows(rows)
                plot(rows, lrs, args.out + ".png", title)
    print(f"held-out loss on B at the start {start_b:.4f}; final (mean ± sd over seeds {seeds}):")
    for (lr, variant), xs in finals.items():
        mean = sum(xs) / len(xs)
        sd = (sum((x - mean) ** 2 for x in xs) / max(1, len(xs) - 1)) ** 0.5
        print(f"  lr {lr:g} {VARIANTS[variant]['label']:45s} {mean:.4f} ± {sd:.4f}  "
              f"({', '.join(f'{x:.4f}' for x in xs)})")
    print(f"wrote {args.out}.csv and .png")


if __name__ == "__main__":
    main()

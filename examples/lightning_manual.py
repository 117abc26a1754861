"""fastzo.MeZO in PyTorch Lightning: manual optimization, ``opt.step(closure)``.

    python examples/lightning_manual.py --epochs 3

Lightning's automatic optimization calls ``loss.backward()``; MeZO has no backward. With
``automatic_optimization = False`` the LightningModule calls ``self.optimizers().step(closure)``
itself, and the closure returns the loss (forward only). Lightning still handles the loop, the
LR scheduler, logging, and checkpoints: the MeZO state (step, seeds) goes into the ``.ckpt``
with the optimizer states and ``trainer.fit(..., ckpt_path=...)`` resumes it.

The task and model are the synthetic ones of examples/plain_loop.py.
"""

from __future__ import annotations

import argparse
import os
import sys

import torch
import torch.nn.functional as F

try:
    import lightning as L
except ImportError:  # the standalone package has the same API
    import pytorch_lightning as L

try:
    import fastzo
except ImportError:  # running from a checkout without `pip install -e .`
    sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
    import fastzo

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from plain_loop import accuracy, build_model, make_batch  # noqa: E402  the same task and model


class MeZOModule(L.LightningModule):
    def __init__(self, lr: float = 0.5, eps: float = 1e-3, seed: int = 0, backend: str | None = None):
        super().__init__()
        self.save_hyperparameters()
        self.automatic_optimization = False  # MeZO runs the forwards itself; no backward
        self.model = build_model(seed)

    def forward(self, tokens):
        return self.model(tokens)

    def configure_optimizers(self):
        h = self.hparams
        opt = fastzo.MeZO(self.parameters(), lr=h.lr, eps=h.eps, seed=h.seed, backend=h.backend)
        scheduler = torch.optim.lr_scheduler.StepLR(opt, step_size=1, gamma=0.7)  # per epoch
        return [opt], [scheduler]

    def training_step(self, batch, batch_idx):
        tokens, labels = batch
        opt = self.optimizers()
        self.model.eval()  # the two forwards must see the same function (no dropout)

        def closure():
            return F.cross_entropy(self.model(tokens), labels)

        loss = opt.step(closure=closure)  # runs closure() at θ+εz and θ−εz, then updates θ
        self.log("train_loss", loss, prog_bar=True)
        self.log("projected_grad", opt.optimizer.last_step.projected_grad)

    def on_train_epoch_end(self):
        self.lr_schedulers().step()

    def validation_step(self, batch, batch_idx):
        tokens, labels = batch
        self.log("val_acc", (self(tokens).argmax(-1) == labels).float().mean(), prog_bar=True)


def loaders(batch_size: int, batches_per_epoch: int, seed: int):
    g = torch.Generator().manual_seed(seed)
    train = torch.utils.data.TensorDataset(*make_batch(batch_size * batches_per_epoch, g))
    val = torch.utils.data.TensorDataset(*make_batch(2000, torch.Generator().manual_seed(12345)))
    return (torch.utils.data.DataLoader(train, batch_size=batch_size, shuffle=False),
            torch.utils.data.DataLoader(val, batch_size=500))


def make_trainer(epochs: int, root: str, quiet: bool) -> L.Trainer:
    return L.Trainer(max_epochs=epochs, accelerator="cpu", devices=1, default_root_dir=root,
                     logger=False, enable_progress_bar=not quiet, enable_model_summary=not quiet,
                     num_sanity_val_steps=0, deterministic=True)


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--batches-per-epoch", type=int, default=100)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--lr", type=float, default=0.5)
    parser.add_argument("--eps", type=float, default=1e-3)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--backend", default=None)
    parser.add_argument("--root", default="runs/lightning", help="checkpoints go here")
    parser.add_argument("--resume", default=None, help="a .ckpt to resume from")
    parser.add_argument("--quiet", action="store_true")
    args = parser.parse_args(argv)

    module = MeZOModule(lr=args.lr, eps=args.eps, seed=args.seed, backend=args.backend)
    train, val = loaders(args.batch_size, args.batches_per_epoch, args.seed + 1)
    test_tokens, test_labels = val.dataset.tensors
    before = accuracy(module.model, test_tokens, test_labels)
    trainer = make_trainer(args.epochs, args.root, args.quiet)
    trainer.fit(module, train, val, ckpt_path=args.resume)
    after = accuracy(module.model, test_tokens, test_labels)
    print(f"held-out accuracy: {before:.3f} -> {after:.3f}; checkpoint: {trainer.checkpoint_callback.best_model_path}")
    return {"before": before, "after": after, "module": module,
            "checkpoint": trainer.checkpoint_callback.best_model_path}


if __name__ == "__main__":
    main()

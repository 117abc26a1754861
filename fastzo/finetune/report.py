"""What ``fastzo finetune`` reports: the plot, load average and versions."""

from __future__ import annotations

import contextlib
import os
import platform
import sys
from pathlib import Path

import torch

from .loop import RunResult, _ema


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

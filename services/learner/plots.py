"""Learning curves as a PNG (matplotlib's object API on an Agg canvas: no display, no pyplot
global state, safe in any process or thread).

Rendering costs ~2 s on a busy 2-core CPU, so it is refreshed every ``plot_every`` steps (and
once at exit), never per step by default.

Written to a temporary file and renamed, so a reader (the api, a browser refreshing the file)
never sees half a PNG.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence
from pathlib import Path

log = logging.getLogger(__name__)

# (title, [(record key, label)])
PANELS: tuple[tuple[str, tuple[tuple[str, str], ...]], ...] = (
    ("loss", (("loss", "loss"),)),
    ("reward", (("reward_mean", "reward mean"), ("accuracy", "accuracy"))),
    ("signal", (("informative_frac", "informative groups"), ("dropped_frac", "stale dropped"))),
    ("contrast", (("score_gap", "score gap +/-"), ("mean_p_pos", "mean P+"))),
    ("policy", (("entropy", "entropy"), ("kl_ref", "KL to ref"))),
    ("optimizer", (("grad_norm", "grad norm"),)),
)


def _series(records: Sequence[dict], key: str) -> tuple[list[float], list[float]]:
    xs, ys = [], []
    for r in records:
        v = r.get(key)
        if isinstance(v, int | float):
            xs.append(float(r["step"]))
            ys.append(float(v))
    return xs, ys


def write_curves(train: Sequence[dict], evals: Sequence[dict], path: Path) -> Path | None:
    """Render the curves; returns the path, or None when there is nothing to draw."""
    if not train and not evals:
        return None
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    panels = [*PANELS, ("held-out accuracy", ())]
    fig = Figure(figsize=(14, 6))
    FigureCanvasAgg(fig)
    axes = fig.subplots(2, 4)
    flat = axes.ravel()
    for ax, (title, keys) in zip(flat, panels, strict=False):
        ax.set_title(title)
        ax.set_xlabel("step")
        for key, label in keys:
            xs, ys = _series(train, key)
            if xs:
                ax.plot(xs, ys, label=label, linewidth=1)
        if title == "held-out accuracy":
            names = {k for r in evals for k in r if k == "greedy" or k.startswith("avg@")}
            for key in sorted(names):
                xs, ys = _series(evals, key)
                if xs:
                    ax.plot(xs, ys, marker="o", label=key)
        if ax.lines:
            ax.legend(fontsize=8)
    lr_ax = flat[len(panels)]
    lr_ax.set_title("learning rate / margin")
    for key in ("lr", "margin"):
        xs, ys = _series(train, key)
        if xs:
            lr_ax.plot(xs, ys, label=key)
    if lr_ax.lines:
        lr_ax.legend(fontsize=8)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    fig.tight_layout()
    try:
        fig.savefig(tmp, format="png", dpi=72)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return path

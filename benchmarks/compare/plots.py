"""PNG figures of a report: the accuracy / trainable-parameter trade-off, and cost per arm.

matplotlib is imported lazily with the Agg backend so that the harness runs headless and so that a
missing matplotlib costs only the figures (with a message), not the run.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any


def write_plots(report: dict[str, Any], out: Path) -> list[Path]:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib is not installed: no PNG plots (pip install 'peftkit[compare]')")
        return []
    arms = report["arms"]
    names = list(arms)
    paths = [out / "metric_vs_params.png", out / "cost_per_arm.png"]

    figure, axis = plt.subplots(figsize=(6, 4))
    for name in names:
        s = arms[name]
        accuracy = s["accuracy"]
        axis.errorbar(
            s["trainable_parameters"],
            100 * accuracy["mean"],
            yerr=100 * accuracy["std"],
            fmt="o",
            capsize=4,
            label=name,
        )
        axis.annotate(
            name, (s["trainable_parameters"], 100 * accuracy["mean"]), textcoords="offset points", xytext=(6, 6)
        )
    axis.set_xscale("log")
    axis.set_xlabel("trainable parameters (log scale)")
    axis.set_ylabel("test accuracy % (mean ± sd over seeds)")
    axis.set_title(f"{report['experiment']['name']}: accuracy vs trainable parameters")
    axis.grid(alpha=0.3)
    figure.tight_layout()
    figure.savefig(paths[0], dpi=120)
    plt.close(figure)

    cuda = report["environment"]["device"].startswith("cuda")
    memory = [(arms[n]["cuda_peak_allocated_bytes"] if cuda else arms[n]["peak_rss_bytes"]) / 1e6 for n in names]
    state = [arms[n]["state_bytes"]["total"] / 1e6 for n in names]
    steps = [arms[n]["median_step_seconds"] for n in names]
    figure, (left, right) = plt.subplots(1, 2, figsize=(9, 4))
    positions = range(len(names))
    left.bar([p - 0.2 for p in positions], memory, width=0.4, label="CUDA peak allocated" if cuda else "peak RSS")
    left.bar([p + 0.2 for p in positions], state, width=0.4, label="params + grads + AdamW state")
    left.set_xticks(list(positions), names)
    left.set_ylabel("MB")
    left.set_title("training memory per arm")
    left.legend(loc="lower center", fontsize=8)
    right.bar(list(positions), steps, color="tab:green")
    right.set_xticks(list(positions), names)
    right.set_ylabel("median seconds per step")
    right.set_title("training step time per arm")
    figure.tight_layout()
    figure.savefig(paths[1], dpi=120)
    plt.close(figure)
    return paths

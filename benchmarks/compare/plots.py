"""PNG figures of a report: the task metric / trainable-parameter trade-off, and cost per arm.

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

    task = report["task"]
    scale = task["scale"]
    figure, axis = plt.subplots(figsize=(6, 4))
    for name in names:
        s = arms[name]
        score = s["score"]
        axis.errorbar(
            s["trainable_parameters"],
            scale * score["mean"],
            yerr=scale * score["std"],
            fmt="o",
            capsize=4,
            label=name,
        )
        axis.annotate(
            name, (s["trainable_parameters"], scale * score["mean"]), textcoords="offset points", xytext=(6, 6)
        )
    axis.set_xscale("log")
    axis.set_xlabel("trainable parameters (log scale)")
    split = report["environment"].get("eval_split", "test")
    better = "" if task.get("higher_is_better", True) else ", lower is better"
    axis.set_ylabel(f"{split} {task['metric']}{' %' if scale == 100 else ''} (mean ± sd over seeds{better})")
    axis.set_title(f"{report['experiment']['name']}: {task['metric']} vs trainable parameters")
    axis.grid(alpha=0.3)
    figure.tight_layout()
    figure.savefig(paths[0], dpi=120)
    plt.close(figure)

    cuda = report["environment"]["device"].startswith("cuda")
    memory = [(arms[n]["cuda_peak_allocated_bytes"] if cuda else arms[n]["peak_rss_bytes"]) / 1e6 for n in names]
    state = [arms[n]["state_bytes"]["total"] / 1e6 for n in names]
    steps = [arms[n]["median_step_seconds"] for n in names]
    figure, (left, right) = plt.subplots(1, 2, figsize=(max(9.0, 0.8 * len(names)), 4.5))
    positions = range(len(names))
    left.bar([p - 0.2 for p in positions], memory, width=0.4, label="CUDA peak allocated" if cuda else "peak RSS")
    left.bar([p + 0.2 for p in positions], state, width=0.4, label="params + grads + AdamW state")
    left.set_xticks(list(positions), names)
    left.set_ylabel("MB")
    left.set_title("training memory per arm")
    # in a band of its own above both panels, never over the bars
    figure.legend(loc="upper left", ncol=2, fontsize=8, frameon=False)
    right.bar(list(positions), steps, color="tab:green")
    right.set_xticks(list(positions), names)
    right.set_ylabel("median seconds per step")
    right.set_title("training step time per arm")
    for axis in (left, right):
        plt.setp(axis.get_xticklabels(), rotation=45, ha="right", rotation_mode="anchor")
    figure.tight_layout(rect=(0, 0, 1, 0.9))
    figure.savefig(paths[1], dpi=120)
    plt.close(figure)
    return paths

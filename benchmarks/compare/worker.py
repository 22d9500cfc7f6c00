"""One arm × one seed in a fresh process, so that its peak RSS is its own.

Run as ``python -m peftkit_benchmarks.compare.worker JOB.json``. Progress and the result go to stdout as
``@@compare {json}`` lines; the parent turns the step events into one progress bar for the whole run.
A ``probe`` job instead builds every arm in this one process and alternates single training steps on the
same batches, which gives step-time ratios that a busy machine cannot skew towards one arm.
"""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path
from typing import Any

import torch
from peftkit_benchmarks.compare import data, measure, modeling, scoring, tasks, train
from peftkit_benchmarks.compare.experiment import Arm, Experiment

EVENT_PREFIX = "@@compare "
DTYPES = {"fp32": None, "bf16": torch.bfloat16}


def emit(kind: str, **payload: Any) -> None:
    print(EVENT_PREFIX + json.dumps({"event": kind, **payload}), flush=True)


class Setup:
    """What every job needs: the experiment, the device, and the tokenised task."""

    def __init__(self, job: dict[str, Any]) -> None:
        self.experiment = Experiment.model_validate(job["experiment"])
        self.device = torch.device(job.get("device", "cpu"))
        self.dtype = DTYPES[job.get("dtype", "fp32")]
        if job.get("threads"):
            torch.set_num_threads(int(job["threads"]))
        self.loaded = tasks.load_task(self.experiment.task)
        self.task = self.loaded.data
        self.tokenizer = modeling.load_tokenizer(self.experiment.model)
        self.pad_id = self.tokenizer.pad_token_id
        self.generative = self.loaded.generative
        self.num_labels = None if self.generative else len(self.task.label_names)
        self.train_set = self.encode(self.task.train)

    def encode(self, split: data.TextSplit) -> data.Encoded:
        max_length = self.experiment.task.max_length
        if split.messages is not None:
            return data.encode_chat(self.tokenizer, split, max_length)
        if self.generative:
            return data.encode_generation(self.tokenizer, split, max_length)
        return data.encode(self.tokenizer, split, max_length)

    def evaluate(self, model: torch.nn.Module, split: data.TextSplit, encoded: data.Encoded) -> dict[str, float]:
        """The task's metrics on ``split``, the primary one first: accuracy and macro-F1 of the head's argmax; the
        score of what the model writes after each prompt (exact match of its first line, or the task's scorer); for
        causal-lm the completion's perplexity and loss (and the scorer's number, when there is a scorer)."""
        batch_size = self.experiment.budget.eval_batch_size
        if not self.generative:
            batches = data.eval_batches(encoded, batch_size, self.pad_id)
            predictions, labels = train.predict(model, batches, self.device, self.dtype)
            classes = len(self.task.label_names)
            return {
                "accuracy": train.accuracy(predictions, labels),
                "macro_f1": scoring.macro_f1(predictions, labels, classes),
            }
        config = self.experiment.task
        metrics: dict[str, float] = {}
        if config.kind == "causal-lm":
            loss = train.completion_loss(
                model, data.eval_batches(encoded, batch_size, self.pad_id), self.device, self.dtype
            )
            metrics = {"perplexity": math.exp(min(loss, 50.0)), "completion_loss": loss}
            if config.scorer is None:
                return metrics
        longest = max(len(self.tokenizer(t, add_special_tokens=False)["input_ids"]) for t in split.targets)
        batches = data.prompt_batches(encoded, batch_size, self.pad_id)
        written, rows = train.generate_texts(model, batches, self.tokenizer, longest + 1, self.device)
        references = [split.targets[i] for i in rows]
        if config.scorer is None:
            return {"exact_match": scoring.exact_match(written, references)}
        scored = scoring.score(config, [w.strip() for w in written], [r.strip() for r in references])
        return {scoring.metric_name(config): scored, **metrics}  # the primary metric first

    def build(self, arm: Arm, seed: int) -> tuple[torch.nn.Module, set[str], int]:
        """The arm's model on the device, its head parameter names, and the base model's parameter count."""
        loaded = modeling.load_model(self.experiment.model, self.num_labels, seed, arm.quantization, self.device)
        base_total = measure.count_parameters(loaded.model)[1]
        model = modeling.place(modeling.prepare_arm(loaded.model, arm, seed), self.device)
        return model, loaded.head, base_total

    def optimizer(self, model: torch.nn.Module, arm: Arm, head: set[str]):
        optimizer = train.make_optimizer(model, arm.lr, arm.head_lr, arm.weight_decay, head)
        budget = self.experiment.budget
        return optimizer, train.linear_schedule(optimizer, budget.steps, budget.warmup_fraction)

    def batches(self, seed: int, steps: int):
        budget = self.experiment.budget
        return data.train_batches(self.train_set, budget.batch_size, steps, seed, self.pad_id, budget.group_by_length)


def run_arm(job: dict[str, Any]) -> dict[str, Any]:
    rss_at_start = measure.peak_rss_bytes()
    setup = Setup(job)
    arm, seed, budget = setup.experiment.arm(job["arm"]), int(job["seed"]), setup.experiment.budget
    eval_split = job.get("eval_split", "test")
    eval_rows = getattr(setup.task, eval_split)
    test_set = setup.encode(eval_rows)

    rss_before_model = measure.peak_rss_bytes()  # imports, data and tokenizer: the same for every arm
    model, head, base_total = setup.build(arm, seed)
    trainable, total = measure.count_parameters(model)
    optimizer, scheduler = setup.optimizer(model, arm, head)
    rss_before_training = measure.peak_rss_bytes()
    measure.reset_cuda_peak(setup.device)
    grad_bytes: list[int] = []
    saved = measure.SavedActivations(model)
    log = train.train(
        model,
        setup.batches(seed, budget.steps),
        optimizer,
        scheduler,
        setup.device,
        setup.dtype,
        on_step=lambda step: emit("step", step=step),
        after_first_backward=lambda: grad_bytes.append(measure.gradient_bytes(model)),
        first_step_context=saved,
        total_steps=budget.steps,
    )
    memory = {
        "peak_rss_bytes": measure.peak_rss_bytes(),
        "rss_at_start_bytes": rss_at_start,
        "rss_before_model_bytes": rss_before_model,
        "rss_before_training_bytes": rss_before_training,
        "cuda_peak_allocated_bytes": measure.cuda_peak_bytes(setup.device),
        "parameter_bytes": measure.parameter_bytes(model),
        "weight_bytes": modeling.weight_bytes(model),
        "gradient_bytes": grad_bytes[0],
        "optimizer_state_bytes": measure.optimizer_state_bytes(optimizer),
        "saved_activation_bytes": saved.bytes,
    }
    emit("phase", phase="evaluate")
    metrics = setup.evaluate(model, eval_rows, test_set)
    checkpoint_bytes = modeling.save_checkpoint(model, arm, Path(job["checkpoint_dir"]))
    latency = None
    if job.get("measure_latency", True):
        emit("phase", phase="latency")
        latency = measure_latency(setup, arm, seed, model, test_set)
    steps_timed = log.seconds[1:] or log.seconds  # the first step pays one-off allocation costs
    tokens_per_s = [t / s for t, s in zip(log.tokens[1:] or log.tokens, steps_timed)]
    return {
        "arm": arm.name,
        "seed": seed,
        "trainable_parameters": trainable,
        "total_parameters": total,
        "base_parameters": base_total,
        "checkpoint_bytes": checkpoint_bytes,
        "memory": memory,
        "step_seconds": log.seconds,
        "step_tokens": log.tokens,
        "median_step_seconds": measure.median(steps_timed),
        "median_tokens_per_second": measure.median(tokens_per_s),
        "train_seconds": sum(log.seconds),
        "final_loss": sum(log.losses[-10:]) / len(log.losses[-10:]),
        "score": next(iter(metrics.values())),  # the task's primary metric, higher is better
        "metrics": metrics,
        "eval_split": eval_split,
        "eval_examples": len(eval_rows),
        "latency": latency,
    }


def measure_latency(setup: Setup, arm: Arm, seed: int, model: torch.nn.Module, test_set: data.Encoded):
    """Seconds per forward of one fixed batch padded to max_length: base, as trained, and merged."""
    budget, max_length = setup.experiment.budget, setup.experiment.task.max_length
    rows = list(range(min(budget.latency_batch_size, len(test_set))))
    batch = data.collate(test_set, rows, setup.pad_id, width=max_length)
    batch = train.to_device({k: v for k, v in batch.items() if k != "labels"}, setup.device)
    base = modeling.load_model(setup.experiment.model, setup.num_labels, seed, arm.quantization, setup.device).model
    base = modeling.place(base, setup.device)  # the arm's own base: quantised for a quantised arm
    variants = {"base": base, "unmerged": model}
    merged = modeling.merged_copy(model, arm)
    if merged is not None:
        variants["merged"] = merged
    for variant in variants.values():
        variant.eval()

    def forward(variant: torch.nn.Module):
        def call():
            with torch.inference_mode(), train.autocast(setup.device, setup.dtype):
                return variant(**batch).logits

        return call

    seconds = measure.round_robin_latency(
        {name: forward(v) for name, v in variants.items()}, budget.latency_repeats, setup.device
    )
    result: dict[str, Any] = {
        "batch_size": len(rows),
        "sequence_length": max_length,
        "seconds": {"base": seconds["base"], "unmerged": seconds["unmerged"], "merged": seconds.get("merged")},
    }
    if merged is not None:
        difference = (forward(merged)().float() - forward(model)().float()).abs().max()
        result["merged_max_abs_logit_difference"] = float(difference)
    return result


def run_probe(job: dict[str, Any]) -> dict[str, Any]:
    """Alternate single steps of every arm on identical batches; per-arm step seconds, paired by index."""
    setup = Setup(job)
    budget, seed = setup.experiment.budget, int(job["seed"])
    arms = [setup.experiment.arm(name) for name in job["arms"]]
    built = {}
    for arm in arms:
        model, head, _ = setup.build(arm, seed)
        built[arm.name] = (model, *setup.optimizer(model, arm, head))
        model.train()
    warmup = 2
    batches = list(setup.batches(seed, budget.speed_probe_steps + warmup))
    seconds: dict[str, list[float]] = {arm.name: [] for arm in arms}
    for index, batch in enumerate(batches):
        order = arms if index % 2 == 0 else arms[::-1]
        for arm in order:
            model, optimizer, scheduler = built[arm.name]
            step_s, _ = train.train_step(
                model,
                train.to_device(batch, setup.device),
                optimizer,
                scheduler,
                setup.device,
                setup.dtype,
                position=(index, len(batches)),
            )
            if index >= warmup:
                seconds[arm.name].append(step_s)
        emit("step", step=index + 1)
    return {"probe_seconds": seconds, "steps": budget.speed_probe_steps}


def main(argv: list[str]) -> int:
    job = json.loads(Path(argv[0]).read_text(encoding="utf-8"))
    result = run_probe(job) if job.get("mode") == "probe" else run_arm(job)
    emit("result", result=result)
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))

"""What a LoRA variant costs against plain LoRA, in peftkit and in HF PEFT: training step time, forward time, and the
bytes autograd keeps for the backward.

One process; a Llama-shaped model (hidden 768, 4 blocks by default) with the variant on every linear projection of
the blocks; every arm is a deep copy of one base with the same adapter values. Step times are interleaved round
robin (A B C D A B C D ...) and reported as medians of paired ratios to peftkit's LoRA; one torch thread by default
(``OMP_WAIT_POLICY=PASSIVE`` is advised on a shared machine). The saved bytes are counted exactly, with
``torch.autograd.graph.saved_tensors_hooks`` over one forward (distinct storages).

    python benchmarks/variant_cost.py [--variants dora] [--rank 8] [--json out.json]
"""

from __future__ import annotations

import argparse
import copy
import statistics
from pathlib import Path
from typing import Any

import torch
from peftkit_benchmarks.common import environment, run_and_report
from peftkit_benchmarks.lora_overhead import LORA_TARGETS, build_model, paired_ratio, round_robin, tokens
from torch import nn

import peftkit

# How each variant is spelled in peftkit and in HF PEFT's LoraConfig.
VARIANTS: dict[str, tuple[dict[str, Any], dict[str, Any]]] = {
    "lora": ({"method": "lora"}, {}),
    "dora": ({"method": "dora"}, {"use_dora": True}),
}


def peftkit_arm(base: nn.Module, variant: str, rank: int) -> nn.Module:
    entry = {**VARIANTS[variant][0], "target": LORA_TARGETS["llama"], "r": rank, "alpha": 2.0 * rank}
    return peftkit.attach(copy.deepcopy(base), {"adapters": {"default": [entry]}})


def peft_arm(base: nn.Module, variant: str, rank: int) -> nn.Module:
    from peft import LoraConfig, get_peft_model

    config = LoraConfig(r=rank, lora_alpha=2 * rank, target_modules=LORA_TARGETS["llama"], **VARIANTS[variant][1])
    return get_peft_model(copy.deepcopy(base), config)


def moved_off_init(model: nn.Module) -> nn.Module:
    """A and B drawn at random, as after training, with the same values in every arm (both libraries visit a host's
    A before its B, hosts in model order); a DoRA magnitude keeps its initial ‖W0‖."""
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            factor = name.lower().split("lora_")[-1][:1] if "lora_" in name.lower() else ""
            if parameter.requires_grad and factor in ("a", "b"):
                scale = 0.1 if factor == "a" else 0.01
                parameter.copy_(torch.randn(parameter.shape, generator=generator) * scale)
    return model


def saved_bytes(model: nn.Module, ids: torch.Tensor) -> int:
    """Bytes of the distinct storages autograd saves for the backward of one training forward."""
    storages: dict[int, int] = {}

    def pack(tensor: torch.Tensor) -> torch.Tensor:
        if tensor.device.type != "meta":
            storage = tensor.untyped_storage()
            storages[storage.data_ptr()] = storage.nbytes()
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        loss = model(input_ids=ids, labels=ids).loss
    del loss
    return sum(storages.values())


def step(model: nn.Module, optimizer: torch.optim.Optimizer, ids: torch.Tensor) -> None:
    optimizer.zero_grad(set_to_none=True)
    model(input_ids=ids, labels=ids).loss.backward()
    optimizer.step()


def measure(args: argparse.Namespace) -> dict[str, Any]:
    base = build_model("llama", args)
    arms: dict[str, nn.Module] = {}
    for variant in ["lora", *args.variants]:
        arms[f"peftkit_{variant}"] = moved_off_init(peftkit_arm(base, variant, args.rank))
        if args.peft:
            arms[f"peft_{variant}"] = moved_off_init(peft_arm(base, variant, args.rank))
    ids = tokens(args, args.batch)
    outputs = {}
    with torch.no_grad():
        for name, model in arms.items():
            outputs[name] = model.eval()(input_ids=ids).logits
    agreement = {
        variant: (outputs[f"peftkit_{variant}"] - outputs[f"peft_{variant}"]).abs().max().item()
        for variant in ["lora", *args.variants]
        if args.peft
    }
    optimizers = {}
    for name, model in arms.items():
        model.train()
        optimizers[name] = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    memory = {name: saved_bytes(model, ids) for name, model in arms.items()}
    train = round_robin({n: (lambda n=n: step(arms[n], optimizers[n], ids)) for n in arms}, args.repeats)
    for model in arms.values():
        model.eval()
    with torch.no_grad():
        forward = round_robin({n: (lambda n=n: arms[n](input_ids=ids)) for n in arms}, args.repeats)
    rows = [
        {
            "arm": name,
            "train_step_s": statistics.median(train["cpu"][name]),
            "train_over_peftkit_lora": paired_ratio(train["cpu"], name, "peftkit_lora"),
            "forward_s": statistics.median(forward["cpu"][name]),
            "forward_over_peftkit_lora": paired_ratio(forward["cpu"], name, "peftkit_lora"),
            "saved_for_backward_bytes": memory[name],
            "trainable": sum(p.numel() for p in arms[name].parameters() if p.requires_grad),
        }
        for name in arms
    ]
    return {
        "benchmark": "variant_cost",
        "environment": environment(),
        "config": {k: v for k, v in vars(args).items() if k != "json"},
        "peftkit_vs_peft_max_abs_logit_diff": agreement,
        "results": rows,
    }


def markdown(report: dict[str, Any]) -> str:
    config = report["config"]
    lines = [
        f"Llama-shaped, hidden {config['hidden']}, {config['layers']} blocks, batch {config['batch']} x "
        f"{config['seq']} tokens, rank {config['rank']}, {report['environment']['torch_threads']} thread(s), "
        f"{report['environment']['cpu']}; medians of {config['repeats']} interleaved rounds (CPU time)",
        "",
        "| arm | trainable | train step | / peftkit LoRA | forward | / peftkit LoRA | saved for backward |",
        "| --- | --- | --- | --- | --- | --- | --- |",
    ]
    for row in report["results"]:
        lines.append(
            f"| {row['arm']} | {row['trainable']:,} | {row['train_step_s'] * 1e3:.1f} ms | "
            f"{row['train_over_peftkit_lora']:.3f} | {row['forward_s'] * 1e3:.1f} ms | "
            f"{row['forward_over_peftkit_lora']:.3f} | {row['saved_for_backward_bytes'] / 2**20:.1f} MiB |"
        )
    for variant, diff in report["peftkit_vs_peft_max_abs_logit_diff"].items():
        lines.append(f"\n{variant}: peftkit and PEFT logits differ by at most {diff:.2e}")
    return "\n".join(lines)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--variants", nargs="+", choices=[v for v in VARIANTS if v != "lora"], default=["dora"])
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--hidden", type=int, default=768)
    parser.add_argument("--vocab", type=int, default=8192)
    parser.add_argument("--seq", type=int, default=128)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--rank", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=15)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--no-peft", dest="peft", action="store_false", help="skip HF PEFT even if installed")
    parser.add_argument("--quick", action="store_true", help="CI smoke run: 1 block, hidden 64, 2 rounds")
    parser.add_argument("--json", type=Path, help="also write the results here")
    args = parser.parse_args(argv)
    if args.peft:
        try:
            import peft  # noqa: F401
        except ImportError:
            args.peft = False
    if args.quick:
        args.layers, args.hidden, args.vocab, args.seq, args.batch, args.repeats = 1, 64, 256, 16, 2, 2
    return args


def main(argv: list[str] | None = None) -> dict[str, Any]:
    return run_and_report(parse_args(argv), measure, markdown)


if __name__ == "__main__":
    main()

"""How far repeated merge/unmerge cycles move the base weights, per method and dtype (docs/rules.md).

Each round trip adds an update to the weights in float32 and casts once to the weight's dtype, then takes it out
again the same way; the rounding of that cast is what can be left behind. Reported per cycle count: the worst,
over the adapted weights, of max |W_after - W| / max(|W|, |W + dW|) (the rounding scales with the larger of the
two magnitudes the weight took). Adapters are moved far from their initialisation (randomise_adapters), so the
updates are large: a worst case, not a typical run.

    python benchmarks/merge_drift.py [--cycles 200]
"""

from __future__ import annotations

import argparse

import torch

import peftkit
from peftkit.testing import randomise_adapters
from peftkit.zoo import build_model

ENTRIES = {
    "lora": {"method": "lora", "target": ["q_proj", "v_proj", "down_proj"]},
    "ia3": {"method": "ia3"},
}


def drift(method: str, dtype: torch.dtype, cycles: int) -> float:
    torch.manual_seed(0)
    model = peftkit.attach(build_model("llama-tiny").to(dtype).eval(), {"adapters": {"a": [ENTRIES[method]]}})
    randomise_adapters(model)
    before = {k: v.clone() for k, v in model.state_dict().items() if "peftkit" not in k}
    peftkit.merge(model)
    largest = {
        k: torch.maximum(v.double().abs().max(), model.state_dict()[k].double().abs().max()) for k, v in before.items()
    }
    peftkit.unmerge(model)
    for _ in range(cycles - 1):
        peftkit.merge(model)
        peftkit.unmerge(model)
    after = model.state_dict()
    return max(
        ((after[k].double() - v.double()).abs().max() / largest[k].clamp_min(1e-12)).item() for k, v in before.items()
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--cycles", type=int, default=200)
    args = parser.parse_args()
    print(f"| method | dtype | after 1 cycle | after {args.cycles} cycles |")
    print("| --- | --- | --- | --- |")
    for method in ENTRIES:
        for dtype in (torch.float32, torch.bfloat16):
            one, many = drift(method, dtype, 1), drift(method, dtype, args.cycles)
            print(f"| {method} | {str(dtype).removeprefix('torch.')} | {one:.1e} | {many:.1e} |")


if __name__ == "__main__":
    main()

"""Parameters each mixer adds, per hyper-connection site and per decoder layer (two sites), against SPEC §5.

One site holds Φ (2n + r, nC) when dynamic, the bias b (2n + r) and the scales α (3), r being the mixer's
logit count (SPEC §1). SPEC §5 quotes the dynamic projection's complexity: mHC O(n³C), mHC-lite O(nC·n!),
KromHC O(n²C). The counts come from the real modules (``HyperConnection`` around ``build_mixer``).

    python benchmarks/param_counts.py                       # hidden 512, n = 4 and 8
    python benchmarks/param_counts.py --hidden 576 --streams 4
"""

from __future__ import annotations

import argparse
import math

from transformers import LlamaConfig
from transformers.models.llama.modeling_llama import LlamaDecoderLayer

from hf_jpmhc.models.hyper_connection import HyperConnection, StreamCollapse
from hf_jpmhc.models.mixers import MIXERS, PermutationMixer, build_mixer, validate_mixer

# The leading term of Φ's size nC·(2n + r) for each mixer's r (SPEC §2), and the claim SPEC §5 makes for it.
GROWTH = {
    "identity": ("2n²C", ""),
    "unconstrained": ("n³C", ""),
    "sinkhorn": ("n³C", "mHC: O(n³C)"),
    "permutation": ("nC·n!", "mHC-lite: O(nC·n!)"),
    "kronecker": ("2n²C", "KromHC: O(n²C)"),
    "spectral": ("n³C", ""),
    "transport": ("n³C", ""),
    "stiefel": ("n³C/2", ""),
    "grassmann": ("n³C/2 (p = n−1)", ""),
}


def count(module) -> int:
    return sum(p.numel() for p in module.parameters())


def llama_layer_parameters(hidden: int) -> int:
    """A Llama decoder layer of the same width (8 heads, MLP 3× wide) for scale."""
    config = LlamaConfig(hidden_size=hidden, intermediate_size=3 * hidden, num_attention_heads=8, num_key_value_heads=8)
    return count(LlamaDecoderLayer(config, layer_idx=0))


def rows(hidden: int, streams: list[int]) -> list[list[str]]:
    base = llama_layer_parameters(hidden)
    table = []
    for n in streams:
        for name in MIXERS:
            try:
                validate_mixer(name, n)
            except ValueError:
                table.append([name, str(n), "—", "not defined at this n", "", "", "", "", GROWTH[name][1]])
                continue
            mixer = build_mixer(name, n)
            dynamic = count(HyperConnection(hidden, mixer, dynamic=True))
            static = count(HyperConnection(hidden, build_mixer(name, n), dynamic=False))
            table.append([
                name, str(n), str(mixer.num_logits), f"{dynamic:,}", f"{2 * dynamic:,}",
                f"{100 * 2 * dynamic / base:.1f}%", f"{static:,}", f"{2 * static:,}",
                f"{GROWTH[name][0]}" + (f" — {GROWTH[name][1]}" if GROWTH[name][1] else ""),
            ])  # fmt: skip
    return table


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--hidden", type=int, default=512, help="C, the hidden size")
    parser.add_argument("--streams", type=int, nargs="+", default=[4, 8], help="n values")
    args = parser.parse_args()
    if args.hidden < 1 or any(n < 1 for n in args.streams):
        raise ValueError(f"--hidden and --streams must be positive, got {args.hidden} and {args.streams}")

    header = ["mixer", "n", "r", "site (dyn.)", "layer (dyn.)", "vs Llama layer", "site (static)", "layer (static)",
              "Φ grows as — SPEC §5 claim"]  # fmt: skip
    table = rows(args.hidden, args.streams)
    print(f"Parameters added with hidden C = {args.hidden}; a site is nC·(2n + r) + (2n + r) + 3 when dynamic, "
          f"(2n + r) + 3 when static; a decoder layer has two sites.")  # fmt: skip
    print(f"Llama decoder layer of the same width (8 heads, MLP {3 * args.hidden}): "
          f"{llama_layer_parameters(args.hidden):,} parameters.")  # fmt: skip
    print("| " + " | ".join(header) + " |")
    print("|" + "---|" * len(header))
    for row in table:
        print("| " + " | ".join(row) + " |")
    for n in args.streams:
        collapse = count(StreamCollapse(args.hidden, n))
        print(f"Once per model at n = {n}: the learned collapse head adds {collapse:,} (n·nC + n + 1).")
    limit = PermutationMixer.MAX_STREAMS
    print(f"permutation is refused above n = {limit} ({limit}! = {math.factorial(limit)} logits; "
          f"{limit + 1}! = {math.factorial(limit + 1)}).")


if __name__ == "__main__":
    main()

"""Benchmark 2: our mHC (JPmHC ``mixer="sinkhorn"``, n = 4) against the public ``hyper-connections`` package.

The peer is ``hyper_connections.mHC`` (PyPI 0.4.11, lucidrains) wired into the same Llama-shaped model as
benchmark 1: every decoder layer's attention and MLP residual goes through one ``mHC(4, dim=512)``, with
its own stream layout (streams folded into the batch, expanded at layer 0 and summed after the last
layer). Same shape, data, optimiser; training steps interleaved; medians. Ours runs the eager torch path and,
in one more row, ``kernel_backend="compiled"`` (the CPU training path). Target: ours faster than the peer.

    python benchmarks/bench_peer_mhc.py [--repeats 4] [--threads 1] [--default-malloc]
"""

from __future__ import annotations

import argparse

from einops import rearrange, repeat
from hyper_connections import mHC
from torch import nn

from bench_train_step import (BATCH, SEQ, interleaved_times, jpmhc, llama, parse_process_args, print_table,
                              train_step_fn)

NUM_STREAMS = 4


class PeerMHCDecoderLayer(nn.Module):
    """A LlamaDecoderLayer whose two residuals are the package's mHC; streams live in the batch axis (b·s)."""

    def __init__(self, layer: nn.Module, index: int, num_layers: int, hidden_size: int):
        super().__init__()
        self.layer, self.first, self.last = layer, index == 0, index == num_layers - 1
        self.attn_hc = mHC(NUM_STREAMS, dim=hidden_size, layer_index=2 * index)
        self.mlp_hc = mHC(NUM_STREAMS, dim=hidden_size, layer_index=2 * index + 1)

    def forward(self, hidden_states, attention_mask=None, position_embeddings=None, **kwargs):
        if self.first:
            hidden_states = repeat(hidden_states, "b ... -> (b s) ...", s=NUM_STREAMS)
        branch_input, add_residual = self.attn_hc(hidden_states)  # (b, t, d), closure over (b·s, t, d)
        attn_output, _ = self.layer.self_attn(hidden_states=self.layer.input_layernorm(branch_input),
                                              attention_mask=attention_mask, position_embeddings=position_embeddings,
                                              **kwargs)  # fmt: skip
        hidden_states = add_residual(attn_output)
        branch_input, add_residual = self.mlp_hc(hidden_states)
        hidden_states = add_residual(self.layer.mlp(self.layer.post_attention_layernorm(branch_input)))
        if self.last:
            hidden_states = rearrange(hidden_states, "(b s) ... -> b s ...", s=NUM_STREAMS).sum(1)
        return hidden_states


def peer_mhc_llama() -> nn.Module:
    model = llama()
    layers = model.model.layers
    for i, layer in enumerate(layers):
        layers[i] = PeerMHCDecoderLayer(layer, i, len(layers), model.config.hidden_size)
    return model


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=4)
    args = parse_process_args(parser)
    steps = {
        "llama": train_step_fn(llama()),
        "hyper-connections 0.4.11 mHC n=4": train_step_fn(peer_mhc_llama()),
        "jpmhc n=4 sinkhorn (ours, mHC)": train_step_fn(jpmhc("sinkhorn")),
        "jpmhc n=4 sinkhorn, compiled backend": train_step_fn(jpmhc("sinkhorn", kernel_backend="compiled")),
        "jpmhc n=4 stiefel (ours)": train_step_fn(jpmhc("stiefel")),
    }
    times = interleaved_times(steps, args.repeats)
    print_table(f"train step vs the public mHC, batch {BATCH}, seq {SEQ}, {args.process}, "
                f"{args.repeats} interleaved rounds", times, "hyper-connections 0.4.11 mHC n=4",
                target="ratio = time / time of the peer mHC; target: ours < 1.0×")  # fmt: skip


if __name__ == "__main__":
    main()

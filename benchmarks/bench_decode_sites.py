"""Where eager decoding's hyper-connection time goes, measured in place (benchmark 5's model and loop shape).

Inside a real greedy decode loop (KV cache, batch 1, eager torch path) one part of the hyper-connections at a time
— the coefficients, the mixer, the collapse, the stream update — returns a precomputed one-token result instead of
computing it; the time that saves, divided by the calls it replaced, is the part's cost in place. Hot-loop
microbenchmarks of the same ops read 1.3–4× lower: between two sites the weights streamed by attention and MLP
evict the interpreter's and the dispatcher's working set. Rounds interleave the variants; medians.

    python benchmarks/bench_decode_sites.py [--mixer stiefel] [--repeats 5] [--new-tokens 64] [--threads 1]
"""

from __future__ import annotations

import argparse
import contextlib
import statistics
import time

import torch
from transformers import DynamicCache

import hf_jpmhc.models.stream_passes as hc
from bench_train_step import interleaved_times, jpmhc, llama


def decode_fn(model: torch.nn.Module, new_tokens: int):
    """A closure timing ``new_tokens`` one-token forwards after a 32-token prefill (the prefill is not timed)."""
    model.eval()
    prompt = torch.randint(3, model.config.vocab_size, (1, 32), generator=torch.Generator().manual_seed(0))

    @torch.inference_mode()
    def run() -> float:
        cache = DynamicCache(config=model.config)
        token = model(input_ids=prompt, cache=cache, use_cache=True).logits[:, -1:].argmax(-1)
        start = time.perf_counter()
        for _ in range(new_tokens):
            token = model(input_ids=token, cache=cache, use_cache=True).logits[:, -1:].argmax(-1)
        return time.perf_counter() - start

    return run


@contextlib.contextmanager
def precomputed(owner, name: str, result, token_arg: int, calls: list[int]):
    """Within the block ``owner.name`` returns ``result`` whenever its argument ``token_arg`` holds one token
    (axis 1), counting those calls in ``calls[0]``; the prefill still computes."""
    original = getattr(owner, name)

    def replacement(*args, **kwargs):
        if args[token_arg].shape[1] != 1:
            return original(*args, **kwargs)
        calls[0] += 1
        return result

    setattr(owner, name, replacement)
    try:
        yield
    finally:
        setattr(owner, name, original)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--mixer", default="stiefel")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--threads", type=int, default=1, help="intra-op threads")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    model = jpmhc(args.mixer, kernel_backend="torch").eval()
    site = model.model.layers[0].attn_hc
    with torch.inference_mode():  # one token's results, the shapes every site returns at decode
        streams = torch.randn(1, 1, site.num_streams, model.config.hidden_size)
        pre, post, z_res = coefficients = hc.dynamic_coefficients(
            streams, site.phi, site.alpha, site.bias, site.split_sizes, site.pre_eps, site.norm_eps
        )
        mixer = site.mixer(z_res)
        u = hc.collapse_streams(streams, pre)
        updated = hc.update_streams(streams, mixer, post, u)
    parts = {  # part: (owner, attribute, result, index of the argument that holds the tokens)
        "coefficients": (hc, "dynamic_coefficients", coefficients, 0),
        "mixer": (type(site.mixer), "forward", mixer, 1),
        "collapse": (hc, "collapse_streams", u, 0),
        "stream update": (hc.StreamPasses, "update_streams", updated, 0),
    }
    calls = {name: [0] for name in parts}

    def variant(name: str):
        run = decode_fn(model, args.new_tokens)

        def timed() -> float:
            with precomputed(*parts[name], calls[name]):
                return run()

        return timed

    runs = {"llama": decode_fn(llama(), args.new_tokens), f"jpmhc {args.mixer}": decode_fn(model, args.new_tokens)}
    runs |= {f"without {name}": variant(name) for name in parts}
    times = interleaved_times(runs, args.repeats)  # + a warm-up round
    medians = {name: statistics.median(ts) for name, ts in times.items()}
    full, tokens = medians[f"jpmhc {args.mixer}"], args.new_tokens
    print(f"\neager decoding, batch 1, {tokens} new tokens, JPmHC n=4 {args.mixer}, {args.repeats} interleaved rounds")
    print(f"{'model':<26} {'ms/token':>9} {'vs llama':>9} {'calls/token':>12} {'µs per call':>12}")
    for name, seconds in medians.items():
        part = name.removeprefix("without ")
        per_token = calls[part][0] / tokens / (args.repeats + 1) if part in calls else 0  # + 1: the warm-up round
        saved = f"{(full - seconds) / tokens / per_token * 1e6:12.1f}" if per_token else f"{'':>12}"
        per_token_text = f"{per_token:12.0f}" if per_token else f"{'':>12}"
        print(f"{name:<26} {seconds / tokens * 1e3:9.3f} {seconds / medians['llama']:8.3f}× {per_token_text} {saved}")
    print(f"hyper-connection time per token: {(full - medians['llama']) / tokens * 1e3:.3f} ms")


if __name__ == "__main__":
    main()

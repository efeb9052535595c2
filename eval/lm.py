"""The model side of evaluation: batched log-likelihoods and batched generation for any causal LM.

Two request types cover every task (the split of EleutherAI's lm-eval harness):

* ``loglikelihood(context, continuation)`` = Σ_t log p(cont_t | context, cont_<t), summed over the
  continuation's tokens. Requests are sorted by length (longest first) and **right-padded**: with a
  causal mask a real token never attends to the padding after it, and position ids stay 0..T−1.
* ``generate(prompt)`` continues a prompt greedily (or by seeded sampling). Prompts are **left-padded**
  so every row's last real token sits at the same position; transformers derives the position ids from
  the attention mask. Generation stops per row at a stop string.

Tokenisation follows lm-eval's HF model: no special tokens are added, and trailing whitespace of the
context moves into the continuation ("Answer:" + " Paris"), so both models of a comparison see the same
tokens. Every number is computed in float32 from the model's logits; results come back in request order,
so the same inputs give the same numbers whatever the batch size's sort order.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from tqdm.auto import tqdm
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedModel, StoppingCriteria, StoppingCriteriaList


@dataclass(frozen=True)
class LoglikelihoodRequest:
    context: str
    continuation: str


class StopOnStrings(StoppingCriteria):
    """Per-row stop: a row is done once its generated text contains any of ``stop``."""

    def __init__(self, tokenizer, prompt_length: int, stop: Sequence[str]):
        self.tokenizer, self.prompt_length, self.stop = tokenizer, prompt_length, tuple(stop)

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor, **kwargs) -> torch.BoolTensor:
        texts = self.tokenizer.batch_decode(input_ids[:, self.prompt_length :], skip_special_tokens=True)
        return torch.tensor([any(s in text for s in self.stop) for text in texts], device=input_ids.device)


def truncate_at_stop(text: str, stop: Sequence[str]) -> str:
    cut = min((text.find(s) for s in stop if s in text), default=len(text))
    return text[:cut]


class CausalLM:
    """A causal LM and its tokenizer, answering log-likelihood and generation requests in batches."""

    def __init__(self, model: PreTrainedModel, tokenizer, *, batch_size: int = 8, max_length: int | None = None):
        if batch_size < 1:
            raise ValueError(f"batch_size must be a positive integer, got {batch_size}")
        self.model = model.eval()
        self.tokenizer = tokenizer
        self.batch_size = batch_size
        self.max_length = max_length or getattr(model.config, "max_position_embeddings", 2048)
        self.pad_token_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
        if self.pad_token_id is None:
            raise ValueError("the tokenizer has neither pad_token_id nor eos_token_id; set one before evaluating")

    @classmethod
    def from_pretrained(
        cls,
        path: str | Path,
        *,
        dtype: torch.dtype = torch.float32,
        device: str = "cpu",
        trust_remote_code: bool = False,
        batch_size: int = 8,
        max_length: int | None = None,
    ) -> CausalLM:
        """Load a checkpoint directory (or Hub name) with ``hf_jpmhc.loading.load_pretrained``: the path is checked
        first and weights that do not match the config are refused (importing hf_jpmhc registers JPmHC models)."""
        from hf_jpmhc.loading import load_pretrained

        model = load_pretrained(AutoModelForCausalLM, path, dtype=dtype, trust_remote_code=trust_remote_code)
        tokenizer = AutoTokenizer.from_pretrained(path, trust_remote_code=trust_remote_code)
        return cls(model.to(device), tokenizer, batch_size=batch_size, max_length=max_length)

    @property
    def device(self) -> torch.device:
        return self.model.device

    def encode(self, text: str) -> list[int]:
        return self.tokenizer(text, add_special_tokens=False).input_ids

    # ----------------------------------------------------------------------------------- log-likelihood

    def _encode_pair(self, request: LoglikelihoodRequest) -> tuple[list[int], list[int]]:
        context, continuation = request.context, request.continuation
        n_spaces = len(context) - len(context.rstrip())
        if n_spaces:
            context, continuation = context[:-n_spaces], context[-n_spaces:] + continuation
        context_ids = self.encode(context)
        whole_ids = self.encode(context + continuation)
        if not context_ids:  # an empty context conditions on the BOS (or EOS) token
            prefix = self.tokenizer.bos_token_id if self.tokenizer.bos_token_id is not None else self.pad_token_id
            return [prefix], whole_ids
        continuation_ids = whole_ids[len(context_ids) :]  # lm-eval's split, also when tokens merge across it
        if not continuation_ids:
            raise ValueError(f"continuation {request.continuation!r} encodes to no tokens after its context")
        return context_ids, continuation_ids

    @torch.no_grad()
    def loglikelihood(self, requests: Sequence[LoglikelihoodRequest], desc: str = "loglikelihood") -> list[float]:
        """Σ log p(continuation | context) per request, in request order."""
        encoded = [self._encode_pair(r) for r in requests]
        tokens = [(c + k)[-(self.max_length + 1) :] for c, k in encoded]
        order = sorted(range(len(requests)), key=lambda i: (-len(tokens[i]), i))
        results: list[float] = [0.0] * len(requests)
        for start in tqdm(range(0, len(order), self.batch_size), desc=desc, unit="batch"):
            batch = order[start : start + self.batch_size]
            inputs = [tokens[i][:-1] for i in batch]
            width = max(len(x) for x in inputs)
            input_ids = torch.full((len(batch), width), self.pad_token_id, dtype=torch.long)  # (B, T)
            attention_mask = torch.zeros((len(batch), width), dtype=torch.long)  # (B, T)
            for row, ids in enumerate(inputs):
                input_ids[row, : len(ids)] = torch.tensor(ids)
                attention_mask[row, : len(ids)] = 1
            logits = self.model(input_ids=input_ids.to(self.device), attention_mask=attention_mask.to(self.device)).logits
            logprobs = torch.log_softmax(logits.float(), dim=-1)  # (B, T, V)
            for row, i in enumerate(batch):
                n_cont = len(encoded[i][1])
                end = len(inputs[row])
                targets = torch.tensor(tokens[i][end - n_cont + 1 : end + 1], device=self.device)  # (n_cont,)
                picked = logprobs[row, end - n_cont : end].gather(-1, targets[:, None])  # (n_cont, 1)
                results[i] = float(picked.sum())
        return results

    # ------------------------------------------------------------------------------------- generation

    @torch.no_grad()
    def generate(
        self,
        prompts: Sequence[str],
        *,
        max_new_tokens: int,
        stop: Sequence[str] = (),
        do_sample: bool = False,
        temperature: float = 1.0,
        seed: int | None = None,
        desc: str = "generate",
        progress: bool = True,
    ) -> list[str]:
        """Continuations of ``prompts`` (cut at the first stop string), in prompt order.

        Sampling is seeded once per call (``torch.manual_seed(seed)``), so a call is reproducible.
        """
        if max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be ≥ 1, got {max_new_tokens}")
        budget = self.max_length - max_new_tokens
        if budget < 1:
            raise ValueError(f"max_new_tokens must be < max_length={self.max_length}, got {max_new_tokens}")
        encoded = [self.encode(p)[-budget:] for p in prompts]
        order = sorted(range(len(prompts)), key=lambda i: (-len(encoded[i]), i))
        outputs: list[str] = [""] * len(prompts)
        if do_sample:
            torch.manual_seed(0 if seed is None else seed)
            sampling = {"do_sample": True, "temperature": temperature, "top_p": 1.0, "top_k": 0}
        else:  # override any sampling defaults in the checkpoint's generation_config
            sampling = {"do_sample": False, "temperature": None, "top_p": None, "top_k": None}
        batches = range(0, len(order), self.batch_size)
        for start in tqdm(batches, desc=desc, unit="batch", disable=not progress):
            batch = order[start : start + self.batch_size]
            width = max(len(encoded[i]) for i in batch)
            input_ids = torch.full((len(batch), width), self.pad_token_id, dtype=torch.long)  # (B, T), left-padded
            attention_mask = torch.zeros((len(batch), width), dtype=torch.long)
            for row, i in enumerate(batch):
                input_ids[row, width - len(encoded[i]) :] = torch.tensor(encoded[i])
                attention_mask[row, width - len(encoded[i]) :] = 1
            generated = self.model.generate(
                input_ids=input_ids.to(self.device),
                attention_mask=attention_mask.to(self.device),
                max_new_tokens=max_new_tokens,
                pad_token_id=self.pad_token_id,
                stopping_criteria=StoppingCriteriaList([StopOnStrings(self.tokenizer, width, stop)]) if stop else None,
                **sampling,
            )  # (B, T + new)
            texts = self.tokenizer.batch_decode(generated[:, width:], skip_special_tokens=True)
            for i, text in zip(batch, texts):
                outputs[i] = truncate_at_stop(text, stop)
        return outputs

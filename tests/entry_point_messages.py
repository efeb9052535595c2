"""Print the markdown table of every bad input tried at every entry point, with the exact line it prints.

    PYTHONPATH=. python tests/entry_point_messages.py > messages.md

Runs the cases of tests/test_entry_points.py in-process, on the same real bad inputs (built in a temporary
directory, shown as ``<inputs>``; the output directory is ``<out>``), offline (HF_HUB_OFFLINE=1, as the tests).
"""

import tempfile
from pathlib import Path

import tests.conftest  # noqa: F401  (the tests' environment: offline Hub, temporary HF_HOME, Triton interpreter)
from tests.test_entry_points import CASES, build_bad_inputs, run_case


def main() -> None:
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        inputs = build_bad_inputs(root / "inputs")
        print("| entry point | bad input | exit status | what it prints (stderr's last line) |")
        print("|---|---|---:|---|")
        for number, case in enumerate(CASES):
            out = root / f"run-{number}" / "out"
            out.parent.mkdir()
            status, stderr = run_case(case, inputs, out)
            line = stderr.rstrip("\n").splitlines()[-1].replace(str(out), "<out>").replace(str(root / "inputs"), "<inputs>")
            print(f"| `{case.entry}` | {case.bad_input} | {status} | `` {line.replace('|', '¦')} `` |", flush=True)


if __name__ == "__main__":
    main()

"""Counts of the hyper-connection code's structure, for a tree of this repository (default: this one):

* backend decisions: the branches the stream passes take on the backend, autograd, compiling, mixer types,
  device and dtype, counted in hf_jpmhc/models and hf_jpmhc/ops (comments and docstrings excluded);
* lines of code in hf_jpmhc/models and hf_jpmhc/ops;
* places that implement each piece of shared maths (references in ops/*/naive.py counted apart);
* constants defined in more than one place: each numerical constant the C++ loops or Triton kernels need,
  counted where its value (or its layout rule) is written out, in Python and in C++.

    python benchmarks/architecture_counts.py [ROOT ...]   # e.g. a `git worktree add /tmp/old <commit>` beside .
"""

from __future__ import annotations

import argparse
import io
import re
import tokenize
from pathlib import Path

DECISIONS = {
    "backend lookup": r"\bkernels_for\(|\b_fused_ops\(|\bresolve_backend\(",
    "autograd on?": r"torch\.is_grad_enabled\(\)",
    "compiling?": r"torch\.compiler\.is_compiling\(\)",
    "mixer type": r"isinstance\([^)]*Mixer\)|type\(mixer\) is",
    "compiled flag": r"\buse_compiled\b(?!:)|\bmaybe_compiled\(",
    "device / dtype": r"\.is_cuda\b|\.is_cpu\b|\.device\.type\b|dtype == torch\.float32",
}
# piece of maths → where it is implemented (references apart)
MATHS = {
    "Sinkhorn rounds": r"def _division_rounds|def _sinkhorn_kernel|^void sinkhorn\(",
    "Newton polish": r"def _newton_steps|^void sinkhorn\(",
    "coefficient backward glue": r"sig_pre, sig_post = |gain = torch\.cat\(\[sig\.new_ones",
    "Cayley solve": r"solve_small\(eye - a, eye \+ a\)|solve_small\(lhs, rhs",
}
REFERENCES = r"def \w+_reference\("
# constant → (pattern of its value or rule in Python, in C++)
CONSTANTS = {
    "NEWTON_BASIN 2e-2": (r"NEWTON_BASIN\b[^\n]*=\s*2e-2", r"2e-2"),
    "Newton step clamp ±2": (r"clamp\(-2\.0, 2\.0\)|NEWTON_STEP_CLAMP = 2\.0", r"-2\.0, 2\.0"),
    "scaling ridge 1e-9": (r"ridge = [^\n]*1e-9|SCALING_RIDGE = 1e-9", r"1e-9"),
    "8-ulp tolerance": (r"8 \* torch\.finfo|EARLY_EXIT_ULPS = 8", r"8 \* std::numeric_limits"),
    "every-4th-round check": (r"i % 4 ==|ROUND_CHECK_EVERY = 4", r"% 4 =="),
    "NEWTON_FROM_BASIN 4": (r"NEWTON_FROM_BASIN\b[^\n]*=\s*[^\n]*\b4\b|NEWTON_FROM_BASIN = 4", r"kFromBasin = 4"),
    "mixer kind codes": (r"return 1, mixer\.iters|MIXER_KINDS = \{", r"kSinkhorn = 1"),
    "skew-basis order": (r"triu_indices\(m, m, offset=1\)", r"j = i \+ 1; j < n; \+\+j, \+\+k"),
    "Kronecker factor order": (r"1 << torch\.arange", r">> \(bits - 1 - k\)"),
    "α-segment layout": (r"alpha\.float\(\)\.repeat_interleave|torch\.repeat_interleave\(torch\.arange\(3\)",
                         r"m < n \? 0 : m < n \+ n_post \? 1 : 2"),
    "decoding threshold": (r"numel\(\) <= 16|FEW_TOKENS = \d+", r"T < 8\b"),
}


def python_code(path: Path) -> str:
    """A Python file with its comments and docstrings (strings that stand alone as statements) blanked out."""
    lines = path.read_text().splitlines(keepends=True)
    previous = tokenize.NEWLINE
    for token in tokenize.generate_tokens(io.StringIO("".join(lines)).readline):
        standalone = token.type == tokenize.STRING and previous in (tokenize.NEWLINE, tokenize.INDENT, tokenize.DEDENT)
        if token.type == tokenize.COMMENT or standalone:
            (row0, col0), (row1, col1) = token.start, token.end
            for row in range(row0 - 1, row1):
                start, end = (col0 if row == row0 - 1 else 0), (col1 if row == row1 - 1 else len(lines[row].rstrip("\n")))
                lines[row] = lines[row][:start] + " " * (end - start) + lines[row][end:]
        if token.type not in (tokenize.NL, tokenize.COMMENT):
            previous = token.type
    return "".join(lines)


def cpp_code(path: Path) -> str:
    return re.sub(r"//[^\n]*|/\*.*?\*/", "", path.read_text(), flags=re.S)


def sources(root: Path) -> dict[Path, str]:
    files = sorted((root / "hf_jpmhc" / "models").glob("*.py")) + sorted((root / "hf_jpmhc" / "ops").rglob("*.py"))
    code = {path: python_code(path) for path in files}
    code.update({path: cpp_code(path) for path in (root / "hf_jpmhc" / "ops").rglob("*.cpp")})
    return code


def report(root: Path) -> None:
    code = sources(root)
    print(f"\n== {root.resolve()}")
    print("backend decisions (hf_jpmhc/models + hf_jpmhc/ops):")
    total = 0
    for name, pattern in DECISIONS.items():
        hits = {p: len(re.findall(pattern, text)) for p, text in code.items() if p.suffix == ".py"}
        where = ", ".join(f"{p.relative_to(root / 'hf_jpmhc')} {n}" for p, n in hits.items() if n)
        total += sum(hits.values())
        print(f"  {name:<16} {sum(hits.values()):>3}   {where}")
    print(f"  {'total':<16} {total:>3}")
    lines = {part: sum(len(p.read_text().splitlines()) for p in code if part in p.parts) for part in ("models", "ops")}
    print(f"lines: hf_jpmhc/models {lines['models']}, hf_jpmhc/ops {lines['ops']} (code and docs, .py and .cpp)")
    print("places implementing each piece of maths (besides ops/*/naive.py references):")
    for name, pattern in MATHS.items():
        where = [f"{p.relative_to(root / 'hf_jpmhc')}" for p, text in code.items() if "naive" not in p.name
                 for _ in re.findall(pattern, text, flags=re.M)]  # fmt: skip
        print(f"  {name:<26} {len(where)}   {', '.join(where)}")
    references = [p.relative_to(root / "hf_jpmhc") for p, text in code.items() if re.search(REFERENCES, text)]
    print(f"  standalone references: {len(references)}   {', '.join(map(str, references))}")
    print("constants written out in more than one place (Python, C++):")
    repeated = 0
    for name, (py, cc) in CONSTANTS.items():
        n_py = sum(len(re.findall(py, t)) > 0 for p, t in code.items() if p.suffix == ".py" and "naive" not in p.name)
        n_cc = sum(len(re.findall(cc, t)) > 0 for p, t in code.items() if p.suffix == ".cpp")
        repeated += n_py + n_cc > 1
        print(f"  {name:<24} {n_py} + {n_cc}{'   ← more than one' if n_py + n_cc > 1 else ''}")
    print(f"  constants defined in more than one place: {repeated}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("roots", nargs="*", default=[str(Path(__file__).resolve().parents[1])])
    for root in parser.parse_args().roots:
        report(Path(root))


if __name__ == "__main__":
    main()

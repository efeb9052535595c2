"""What holds the backends together, checked so that a change in one place cannot silently leave another behind:
the C++ loops are compiled with the Python constants (and contain no copies of them), the C++ passes mirror the
torch passes by name and signature, every fast path a mixer declares is one its backend knows, and a killed build
cannot leave the extension loader waiting forever."""

from __future__ import annotations

import inspect
import os
import re
import time
from pathlib import Path

import pytest

from hf_jpmhc.models.mixers import MIXERS, build_mixer
from hf_jpmhc.models.stream_passes import StreamPasses
from hf_jpmhc.ops import cpu
from hf_jpmhc.ops.triton_backend import MIXER_KERNELS

KERNELS_CPP = Path(cpu.__file__).with_name("kernels.cpp")
# Every variant of every mixer that has options: the fast paths a mixer declares depend on them.
MIXER_VARIANTS = [(name, {}) for name in MIXERS] + [
    ("sinkhorn", {"sinkhorn_backward": "unrolled"}),
    ("sinkhorn", {"sinkhorn_eps": 1e-6, "sinkhorn_backward": "unrolled"}),
    ("stiefel", {"cayley_method": "iterative"}),
]


def _code(path: Path) -> str:
    """C++ source without comments and string literals."""
    text = re.sub(r"//[^\n]*|/\*.*?\*/", "", path.read_text(), flags=re.S)
    return re.sub(r'"(\\.|[^"\\])*"', '""', text)


def test_cpu_loops_are_built_with_the_python_constants():
    """The library reports the values it was compiled with: those of NUMERICS, their one definition."""
    assert cpu.load() is not None, "the C++ CPU kernels did not build (see the warning)"
    assert list(cpu.load().numerics()) == [float(value) for value in cpu.NUMERICS.values()]


def test_kernels_cpp_holds_no_copy_of_a_constant():
    """kernels.cpp names every constant by its HF_ macro and spells none of the fractional ones as a literal (whole
    numbers are too common to tell apart — tile sizes, array bounds — and are covered by the macro names)."""
    code = _code(KERNELS_CPP)
    for name in cpu.NUMERICS:
        assert f"HF_{name}" in code, f"kernels.cpp does not use HF_{name}"
    literals = {float(m.rstrip("fF")) for m in re.findall(r"(?<![\w.])\d+\.?\d*(?:[eE][-+]?\d+)?[fF]?(?![\w.])", code)}
    distinctive = {float(v) for v in cpu.NUMERICS.values() if float(v) != int(v)}
    assert not literals & distinctive, f"kernels.cpp spells constants as literals: {sorted(literals & distinctive)}"


def test_native_passes_mirror_the_torch_passes():
    """The compiled backend finds each C++ loop under its torch pass's name: renaming one without the other fails
    here instead of silently moving that pass to inductor."""
    native = {name: member for name, member in vars(cpu.NativePasses).items() if not name.startswith("_")}
    torch_passes = {name: member for name, member in vars(StreamPasses).items() if not name.startswith("_")}
    assert native, "no C++ passes"
    assert set(native) <= set(torch_passes), f"C++ passes without a torch pass: {set(native) - set(torch_passes)}"
    for name, member in native.items():
        theirs = inspect.signature(torch_passes[name].__func__).parameters
        ours = inspect.signature(member.__func__).parameters
        assert list(ours) == list(theirs), f"{name}: C++ pass takes {list(ours)}, the torch pass {list(theirs)}"


@pytest.mark.parametrize(("name", "options"), MIXER_VARIANTS, ids=[f"{n}{o}" if o else n for n, o in MIXER_VARIANTS])
def test_declared_mixer_kernels_exist(name, options):
    mixer = build_mixer(name, 4, **options)
    cpu_kernel, triton_kernel = mixer.kernel("cpu"), mixer.kernel("triton")
    assert cpu_kernel is None or cpu_kernel[0] in cpu.MIXER_KINDS, cpu_kernel
    assert triton_kernel is None or triton_kernel[0] in MIXER_KERNELS, triton_kernel
    assert mixer.kernel("cuda-graphs") is None  # a backend a mixer does not know gets its torch forward


def test_the_mixers_with_fast_paths_declare_them():
    """The declarations the fast paths rely on (a mixer that stopped declaring would silently lose its kernel)."""
    declared = {(name, str(options)): (build_mixer(name, 4, **options).kernel("cpu") is not None,
                                       build_mixer(name, 4, **options).kernel("triton") is not None)
                for name, options in MIXER_VARIANTS}  # fmt: skip
    assert declared[("sinkhorn", "{}")] == (True, True)
    assert declared[("stiefel", "{}")] == (True, False)
    assert declared[("stiefel", "{'cayley_method': 'iterative'}")] == (False, True)
    assert declared[("kronecker", "{}")] == (True, False)
    assert declared[("sinkhorn", "{'sinkhorn_backward': 'unrolled'}")] == (True, False)


def test_a_killed_builds_lock_is_removed_and_a_running_builds_is_kept(tmp_path, monkeypatch):
    """torch's extension loader waits, without a word, for as long as a build's lock file exists."""
    from torch.utils.cpp_extension import _get_build_directory

    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", str(tmp_path))
    locks = {name: Path(_get_build_directory(name, verbose=False)) / "lock" for name in ("killed", "running")}
    for lock in locks.values():
        lock.touch()
    stale = time.time() - 2 * cpu.STALE_BUILD_LOCK_SECONDS
    os.utime(locks["killed"], (stale, stale))
    with pytest.warns(UserWarning, match="interrupted build"):
        cpu.remove_stale_build_lock("killed")
    cpu.remove_stale_build_lock("running")
    assert not locks["killed"].exists() and locks["running"].exists()

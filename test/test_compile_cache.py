""".ci/compile_cache, the compiler launcher of .ci/cached_build: an object comes
from the cache only while every file its compile read has the same content,
from any clone's path; failures and non-compile calls pass through."""

import os
import pathlib
import shutil
import subprocess
import sys

import pytest

REPO = pathlib.Path(__file__).resolve().parent.parent
LAUNCHER = REPO / ".ci" / "compile_cache"

pytestmark = pytest.mark.skipif(shutil.which("c++") is None, reason="no C++ compiler")


def clone(tmp_path, name):
    """A checkout holding the launcher (it takes the checkout's path from its own)
    and two sources, one reading a header."""
    root = tmp_path / name
    (root / ".ci").mkdir(parents=True)
    shutil.copy(LAUNCHER, root / ".ci" / "compile_cache")
    (root / "src").mkdir()
    (root / "src" / "answer.h").write_text("constexpr int kAnswer = 42;\n")
    (root / "src" / "a.cpp").write_text('#include "answer.h"\nint answer() { return kAnswer; }\n')
    (root / "src" / "b.cpp").write_text("int other() { return 7; }\n")
    (root / "build").mkdir()
    return root


@pytest.fixture
def compiler(tmp_path):
    """c++ behind a script that logs each call, so a test can tell a hit from a compile."""
    log = tmp_path / "calls.log"
    script = tmp_path / "logging-c++"
    script.write_text(f'#!/bin/sh\necho "$*" >> {log}\nexec c++ "$@"\n')
    script.chmod(0o755)
    return script, log


def compile_(root, compiler, source, cache, check=True):
    """As torch's ninja rule runs it: $cxx -MMD -MF $out.d $cflags -c $in -o $out."""
    out = root / "build" / (pathlib.Path(source).stem + ".o")
    result = subprocess.run(
        [sys.executable, str(root / ".ci" / "compile_cache"), str(compiler), "-MMD", "-MF", f"{out}.d",
         "-O2", f"-I{root / 'src'}", "-c", str(root / "src" / source), "-o", str(out)],
        capture_output=True, text=True, env={**os.environ, "TORCH_MOE_OPS_COMPILE_CACHE": str(cache)})
    if check:
        assert result.returncode == 0, result.stderr
    return result, out


def calls(log):
    return log.read_text().count(" -c ") if log.exists() else 0


def test_hit_needs_the_same_content_of_every_file_read(tmp_path, compiler):
    script, log = compiler
    cache = tmp_path / "cache"
    root = clone(tmp_path, "clone1")
    _, obj = compile_(root, script, "a.cpp", cache)
    first = obj.read_bytes()
    assert calls(log) == 1 and len(os.listdir(cache)) == 1

    obj.unlink()
    compile_(root, script, "a.cpp", cache)
    assert calls(log) == 1, "the same sources compiled again"
    assert obj.read_bytes() == first
    # ninja reads the depfile of a hit too: it names this clone's files
    assert str(root / "src" / "answer.h") in pathlib.Path(f"{obj}.d").read_text()

    # A header the source reads changes: compiled again, a different object.
    (root / "src" / "answer.h").write_text("constexpr int kAnswer = 43;\n")
    compile_(root, script, "a.cpp", cache)
    assert calls(log) == 2 and obj.read_bytes() != first
    # b.cpp does not read it: its entry is its own
    compile_(root, script, "b.cpp", cache)
    compile_(root, script, "b.cpp", cache)
    assert calls(log) == 3

    # Back to the first header: the entry now holds 43's object, so a compile.
    (root / "src" / "answer.h").write_text("constexpr int kAnswer = 42;\n")
    compile_(root, script, "a.cpp", cache)
    assert calls(log) == 4 and obj.read_bytes() == first


def test_a_clone_elsewhere_hits_and_gets_its_own_paths(tmp_path, compiler):
    script, log = compiler
    cache = tmp_path / "cache"
    compile_(clone(tmp_path, "clone1"), script, "a.cpp", cache)
    root2 = clone(tmp_path, "clone2")
    _, obj = compile_(root2, script, "a.cpp", cache)
    assert calls(log) == 1
    depfile = pathlib.Path(f"{obj}.d").read_text()
    assert str(root2) in depfile and "clone1" not in depfile and "<root>" not in depfile
    # The same sources with other flags are another entry.
    subprocess.run([sys.executable, str(root2 / ".ci" / "compile_cache"), str(script), "-MMD", "-MF",
                    f"{obj}.d", "-O0", f"-I{root2 / 'src'}", "-c", str(root2 / "src" / "a.cpp"), "-o", str(obj)],
                   check=True, env={**os.environ, "TORCH_MOE_OPS_COMPILE_CACHE": str(cache)})
    assert calls(log) == 2


def test_failures_and_other_calls_pass_through(tmp_path, compiler):
    script, log = compiler
    cache = tmp_path / "cache"
    root = clone(tmp_path, "clone1")
    (root / "src" / "a.cpp").write_text("int answer() { return kMissing; }\n")
    result, obj = compile_(root, script, "a.cpp", cache, check=False)
    assert result.returncode != 0 and "kMissing" in result.stderr
    assert not obj.exists() and not (cache.exists() and [n for n in os.listdir(cache) if not n.startswith(".")])
    # no -c: the compiler as it is (torch asks `$CXX -v`; links)
    version = subprocess.run([sys.executable, str(LAUNCHER), str(script), "--version"],
                             capture_output=True, text=True, check=True)
    assert version.stdout == subprocess.run(["c++", "--version"], capture_output=True, text=True).stdout


def test_the_shim_as_its_own_compiler_fails_at_once(tmp_path):
    """CXX=.ci/cached_cxx with TORCH_MOE_OPS_REAL_CXX naming the shim again would
    exec in a loop (it did, when .ci/cached_build read CXX after setting it)."""
    root = clone(tmp_path, "clone1")
    shutil.copy(REPO / ".ci" / "cached_cxx", root / ".ci" / "cached_cxx")
    shim = root / ".ci" / "cached_cxx"
    result = subprocess.run([str(shim), "-v"], capture_output=True, text=True, timeout=60,
                            env={**os.environ, "TORCH_MOE_OPS_REAL_CXX": str(shim)})
    assert result.returncode != 0 and "this launcher's own shim" in result.stderr

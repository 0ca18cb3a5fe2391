"""A clone works on its own (issue 11).

- No tracked file names a path outside the repository, and the shape table
  is read only through torch_moe_ops.shapes.
- From a git clone of this checkout, placed in an empty directory with an
  empty HOME, MoEConfig.from_shapes and `make demo`'s command run.
- README's "Using your own torch": each pip command, from a bare clone, into
  a fresh venv that holds only torch, then README's example from another
  directory.
- setup.py builds the CUDA sources only with a real CUDA toolkit, and says so.

The clones carry the checkout's uncommitted changes to tracked files (applied
as a diff), not its untracked files: a file the code needs must be added to
git, as it must be for any other clone.
"""

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import torch_moe_ops

ROOT = Path(__file__).resolve().parents[1]
PY_DIR = f"python{sys.version_info.major}.{sys.version_info.minor}"

# Paths that leave the repository: the shared directory beside it, where the
# shape table was read from (relative, or as a path component), two ".."
# components joined (from a file one level down, the repository's parent),
# absolute paths of our machines. This file's own text matches none of them.
ESCAPES = [re.compile(p) for p in (r"\.\./shared", r"""["']shared[/"']""", r"""["']\.\.["']\s*,\s*["']\.\.["']""",
                                   r"/work/(shared|main|wt-)")]
SHAPES_FILE = "moe_shapes" + ".json"  # spelt in two so that this file does not name it


def run(args, timeout=600, **kwargs) -> subprocess.CompletedProcess:
    proc = subprocess.run([str(a) for a in args], capture_output=True, text=True, timeout=timeout, **kwargs)
    assert proc.returncode == 0, (f"{' '.join(map(str, args))} exited {proc.returncode}\n"
                                  f"stdout:\n{proc.stdout[-5000:]}\nstderr:\n{proc.stderr[-5000:]}")
    return proc


def require_git_checkout() -> None:
    if not (ROOT / ".git").exists():
        pytest.skip("not a git checkout")


def tracked_files() -> list[str]:
    require_git_checkout()
    return run(["git", "-C", ROOT, "ls-files"]).stdout.splitlines()


def clone_checkout(dest: Path) -> Path:
    """A git clone of this checkout at dest, at its HEAD plus its uncommitted
    changes to tracked files."""
    require_git_checkout()
    head = run(["git", "-C", ROOT, "rev-parse", "HEAD"]).stdout.strip()
    run(["git", "clone", "--quiet", "--no-checkout", ROOT, dest])
    run(["git", "-C", dest, "checkout", "--quiet", "--detach", head])
    diff = subprocess.run(["git", "-C", str(ROOT), "diff", "HEAD", "--binary"], capture_output=True, check=True).stdout
    if diff:
        subprocess.run(["git", "-C", str(dest), "apply", "--whitespace=nowarn"], input=diff, check=True)
    return dest


def alone_env(home: Path, **extra: str) -> dict:
    """This environment with HOME set to an empty directory, and nothing
    that points into the checkout or the real HOME's caches."""
    env = {k: v for k, v in os.environ.items()
           if k not in ("PYTHONPATH", "TORCHINDUCTOR_CACHE_DIR", "XDG_CACHE_HOME", "VIRTUAL_ENV")}
    home.mkdir(exist_ok=True)
    env.update(HOME=str(home), **extra)
    return env


def readme_example() -> str:
    """README's example of the ops and an MoE layer (its Python block that
    imports torch_moe_ops)."""
    blocks = re.findall(r"```python\n(.*?)```", (ROOT / "README.md").read_text(), re.S)
    (example,) = [b for b in blocks if b.startswith("import torch, torch_moe_ops\n")]
    return example


def test_no_tracked_file_reads_outside_the_tree():
    escapes, readers = [], []
    for name in tracked_files():
        path = ROOT / name
        if path.is_symlink() or not path.is_file():
            continue
        try:
            text = path.read_text()
        except UnicodeDecodeError:
            continue
        for n, line in enumerate(text.splitlines(), 1):
            if any(p.search(line) for p in ESCAPES):
                escapes.append(f"{name}:{n}: {line.strip()}")
        if name.endswith(".py") and SHAPES_FILE in text:
            readers.append(name)
    assert not escapes, "paths outside the repository:\n" + "\n".join(escapes)
    assert readers == ["torch_moe_ops/shapes.py"], f"the shape table is read outside torch_moe_ops.shapes: {readers}"


@pytest.mark.slow
def test_clone_stands_alone(tmp_path):
    """Proves that the package, its shape table and the demo read nothing
    outside a clone's tracked files and nothing in HOME: the clone sits in an
    otherwise empty directory, where a path to a directory beside it finds
    nothing. The C++ extension is this checkout's build, copied in (a build
    costs minutes; test_pip_install_from_bare_clone builds from a clone);
    make's venv set-up is not repeated."""
    clone = clone_checkout(tmp_path / "clone")
    shutil.copy2(torch_moe_ops._C.__file__, clone / "torch_moe_ops")
    env = alone_env(tmp_path / "home", PYTHONPATH=str(clone))
    check = f"""
import torch, torch_moe_ops
from torch_moe_ops import shapes
from torch_moe_ops.nn import MoE, MoEConfig
assert torch_moe_ops.__file__.startswith({str(clone)!r}), torch_moe_ops.__file__
for name, entry in shapes.models().items():
    config = MoEConfig.from_shapes(name)
    assert (config.hidden, config.intermediate, config.num_experts, config.top_k) == (
        entry["hidden"], entry["expert_intermediate"], entry["experts"], entry["top_k"]), name
moe = MoE(MoEConfig.from_shapes("deepseek-v3", scale=64))
out, counts = moe(torch.randn(5, moe.config.hidden))
assert out.shape == (5, 112) and int(counts.sum()) == 5 * 8
"""
    run([sys.executable, "-c", check], cwd=clone, env=env)
    demo = run([sys.executable, "benchmarks/bench_moe_layer.py", "--quick"], cwd=clone, env=env)
    assert "qwen3-30b-a3b" in demo.stdout and (clone / "benchmarks/results/moe_layer-quick.json").is_file()
    assert sorted(os.listdir(tmp_path)) == ["clone", "home"]


def torch_only_site_packages() -> Path:
    """site-packages of a venv holding only this torch's release and what pip
    installs with it (setuptools among them). It takes ~70 s and 5.5 GB to
    make, so it is kept outside the checkout, as make's venv is, keyed by the
    torch and Python versions, and only ever read."""
    version = torch.__version__.split("+")[0]
    base = Path.home() / ".cache" / "torch-moe-ops" / f"torch-only-{version}-{PY_DIR}"
    if not (base / ".installed").is_file():
        shutil.rmtree(base, ignore_errors=True)
        run([sys.executable, "-m", "venv", base])
        run([base / "bin" / "python", "-m", "pip", "install", "--quiet", f"torch=={version}"], timeout=1800)
        (base / ".installed").touch()
    return base / "lib" / PY_DIR / "site-packages"


def fresh_venv_with_torch(path: Path) -> Path:
    """A new venv that sees the torch-only venv's packages (pip included)
    behind its own empty site-packages, so that installing into it leaves the
    cached torch-only venv untouched. Returns its python."""
    run([sys.executable, "-m", "venv", "--without-pip", path])
    python = path / "bin" / "python"
    site = Path(run([python, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"]).stdout.strip())
    # addsitedir, not a bare path: the torch-only venv's own .pth files
    # (setuptools' distutils shim) must apply as they would there.
    (site / "torch_only.pth").write_text(f"import site; site.addsitedir({str(torch_only_site_packages())!r})\n")
    return python


@pytest.mark.slow
@pytest.mark.parametrize("command", ["pip install --no-build-isolation .", "pip install --no-build-isolation -e ."])
def test_pip_install_from_bare_clone(command, tmp_path):
    """README's "Using your own torch" as a user runs it: the command, in a
    bare clone, with a venv holding only torch (a CPU-only build to keep CI
    short: the CUDA sources are compiled by make test's own build), then
    README's example from another directory, on the installed package and its
    shape table."""
    assert command in (ROOT / "README.md").read_text()
    clone = clone_checkout(tmp_path / "clone")
    python = fresh_venv_with_torch(tmp_path / "venv")
    env = alone_env(tmp_path / "home", TORCH_MOE_OPS_CUDA="0", MAX_JOBS=os.environ.get("MAX_JOBS", "2"))
    run([python, "-m", *command.split()], cwd=clone, env=env, timeout=1800)
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    installed_in = clone if command.endswith("-e .") else tmp_path / "venv"
    check = (f"\nassert torch_moe_ops.__file__.startswith({str(installed_in)!r}), torch_moe_ops.__file__\n"
             "assert out.shape == (8, 128) and int(tokens_per_expert.sum()) == 8 * 8\n")
    run([python, "-c", readme_example() + check], cwd=elsewhere, env=env)


@pytest.fixture
def fake_toolkit(tmp_path) -> Path:
    """A directory whose bin/nvcc is a wrapper script and that has no CUDA
    headers, as /usr/local is where nvcc on PATH is /usr/local/bin/nvcc."""
    nvcc = tmp_path / "wrapper" / "bin" / "nvcc"
    nvcc.parent.mkdir(parents=True)
    nvcc.write_text("#!/bin/sh\nexec /usr/local/cuda/bin/nvcc \"$@\"\n")
    nvcc.chmod(0o755)
    return nvcc.parent.parent


def setup_py_cuda_line(env: dict) -> subprocess.CompletedProcess:
    """setup.py's choice of CUDA build, made without building anything."""
    return subprocess.run([sys.executable, "setup.py", "--name"], cwd=ROOT, env=env, capture_output=True, text=True)


def build_env(**extra: str) -> dict:
    env = {k: v for k, v in os.environ.items() if k not in ("CUDA_HOME", "CUDA_PATH", "TORCH_MOE_OPS_CUDA")}
    env.update(extra)
    return env


needs_cuda_torch = pytest.mark.skipif(torch.version.cuda is None, reason="a CPU build of torch builds no CUDA sources")


@needs_cuda_torch
def test_setup_forced_cuda_names_what_is_missing(fake_toolkit):
    proc = setup_py_cuda_line(build_env(CUDA_HOME=str(fake_toolkit), TORCH_MOE_OPS_CUDA="1"))
    assert proc.returncode != 0
    assert f"TORCH_MOE_OPS_CUDA=1 but no CUDA toolkit found ({fake_toolkit} has no include/cuda_runtime.h)" in proc.stderr


@needs_cuda_torch
def test_setup_auto_builds_cpu_only_without_toolkit(fake_toolkit):
    proc = setup_py_cuda_line(build_env(CUDA_HOME=str(fake_toolkit), TORCH_MOE_OPS_CUDA="auto"))
    assert proc.returncode == 0, proc.stderr
    assert f"CPU-only build: no CUDA toolkit found ({fake_toolkit} has no include/cuda_runtime.h)" in proc.stderr


@needs_cuda_torch
def test_setup_passes_over_a_wrapper_nvcc_on_path(fake_toolkit):
    """torch guesses CUDA_HOME from a wrapper nvcc on PATH; setup.py passes
    over the guess and takes /usr/local/cuda if that is a toolkit."""
    proc = setup_py_cuda_line(build_env(PATH=f"{fake_toolkit / 'bin'}:{os.environ['PATH']}", TORCH_MOE_OPS_CUDA="auto"))
    assert proc.returncode == 0, proc.stderr
    guess = f"{fake_toolkit} has no include/cuda_runtime.h"
    usual = Path("/usr/local/cuda")
    missing = [f for f in ("bin/nvcc", "include/cuda_runtime.h", "include/crt/host_defines.h") if not (usual / f).is_file()]
    if missing:
        assert f"CPU-only build: no CUDA toolkit found ({guess}; {usual} has no {missing[0]})" in proc.stderr
    else:
        assert f"building the CUDA sources with the toolkit in {usual} (passed over: {guess})" in proc.stderr

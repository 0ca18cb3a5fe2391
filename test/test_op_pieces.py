"""Every moe_ops op has all of its pieces, or a stated reason for a missing one,
and is what its declaration (torch_moe_ops/native_functions.yaml) says.

An op users call needs: a CPU kernel; a CUDA kernel in a CUDA build; a fake
kernel in its family's ops module; autograd where its OpInfo says it is
differentiable; an OpInfo with error inputs in its family's OpInfo module
(test_ops runs the generic checks on it); an entry in the upstream series
(the core series' native_functions.yaml dispatches its CPU kernel, the very
function library.cpp registers) or the reason it stays here; a benchmark; a
row in README.md's table of ops. Adding an op without one of them fails here,
naming the op and the piece.

The declaration is the one list of ops: csrc/library.cpp's schemas and C++
registrations are generated from it (RegisterMoeOps.h, written by setup.py),
every kernel they name must be declared in the headers library.cpp includes,
and the dispatcher must hold exactly its ops, each key's kernel registered
from where the declaration says (library.cpp's C++ or the named module).
"""

import importlib
import pathlib
import re

import pytest
import torch

import torch_moe_ops
from torch_moe_ops import native_functions

from common import family_op_db

ROOT = pathlib.Path(__file__).resolve().parents[1]
CSRC = ROOT / "torch_moe_ops/csrc"
LIBRARY = CSRC / "library.cpp"
OPS = native_functions.load()


def _family_op_db(family):
    return family_op_db(family)


OPINFOS = {info.name.split(".", 1)[1]: (family, info)
           for family in native_functions.families() for info in _family_op_db(family)}


def _registered_ops():
    return sorted(n.split("::", 1)[1] for n in torch._C._dispatch_get_all_op_names() if n.startswith("moe_ops::"))


def _cpp_strings(text):
    """The value of adjacent C++ string literals ("a" "b" -> ab), unescaped."""
    return "".join(bytes(s, "utf-8").decode("unicode_escape") for s in re.findall(r'"((?:[^"\\]|\\.)*)"', text))


def _function_body(text, name):
    (body,) = re.findall(rf"^inline void {name}\(torch::Library& m\) \{{(.*?)^\}}", text, re.S | re.M)
    return body


def test_generated_registration_is_the_declaration():
    """The header the build generates defines exactly the declared schemas
    (C++ escaping included) and registers exactly the declared C++ kernels."""
    # setup.py's reader (no PyYAML) sees what the full load sees.
    assert native_functions._registration_entries() == [(op.func, op.dispatch) for op in OPS]
    text = native_functions.registrations_header()
    defs = [_cpp_strings(args) for args in re.findall(r"m\.def\((.*?)\);$", _function_body(text, "define_schemas"),
                                                      re.M)]
    assert sorted(defs) == sorted(op.func for op in OPS)
    for key in native_functions.CPP_KEYS:
        impls = dict(re.findall(r'm\.impl\("(\w+)", &at::native::(\w+)\);', _function_body(text, f"register_{key}")))
        assert impls == {op.name: op.cpp_dispatch()[key] for op in OPS if key in op.cpp_dispatch()}, key


@pytest.mark.parametrize("line, error", [
    ('- func: "grouped_mm(Tensor mat_a) -> Tensor"', r"an entry must start with `- func: <schema>`"),
    ("    CPU: grouped_mm_cached_cpu  # ours", r"dispatch takes plain `KEY: function` lines"),
    ("    CUDA: 'grouped_mm_cuda'", r"dispatch takes plain `KEY: function` lines"),
])
def test_registration_reader_refuses_what_it_does_not_read(tmp_path, monkeypatch, line, error):
    """setup.py's reader errs, naming the line, rather than misread the yaml."""
    text = pathlib.Path(native_functions.PATH).read_text()
    if line.startswith("-"):
        text = text.replace("- func: grouped_mm(", line + "\n- func: grouped_mm(", 1)
    else:
        text = text.replace("    CPU: grouped_mm_cached_cpu\n", line + "\n", 1)
    bad = tmp_path / "native_functions.yaml"
    bad.write_text(text)
    monkeypatch.setattr(native_functions, "PATH", str(bad))
    with pytest.raises(native_functions.DeclarationError, match=rf"native_functions.yaml:\d+: {error}"):
        native_functions.registrations_header()


def test_library_cpp_leaves_registration_to_the_generated_header():
    text = LIBRARY.read_text()
    assert "m.def(" not in text and "m.impl(" not in text, "csrc/library.cpp registers by hand: declare the op in " \
        "torch_moe_ops/native_functions.yaml instead"
    assert f"#include <{native_functions.REGISTRATIONS_HEADER}>" in text
    assert re.search(r"^TORCH_LIBRARY\(moe_ops, m\) \{\s*torch_moe_ops::generated::define_schemas\(m\);", text, re.M)
    for key in native_functions.CPP_KEYS:
        assert re.search(rf"^TORCH_LIBRARY_IMPL\(moe_ops, {key}, m\) \{{\s*torch_moe_ops::generated::register_{key}\(m\);",
                         text, re.M), key


def test_declared_kernels_exist():
    """Every at::native function the declaration dispatches to is declared in
    a header csrc/library.cpp includes (a typo would otherwise surface as a
    compile error in the generated header, far from the yaml)."""
    includes = re.findall(r"^#include <((?:ATen/native|moe)/\w+\.h)>", LIBRARY.read_text(), re.M)
    headers = {h: (CSRC / h).read_text() for h in includes}
    for op in OPS:
        for key, fn in op.cpp_dispatch().items():
            assert any(re.search(rf"\b{fn}\s*\(", text) for text in headers.values()), (
                f"{op.name}: dispatch {key}: at::native::{fn} is declared in none of library.cpp's headers {includes}")


def test_dispatcher_holds_the_declared_ops():
    assert _registered_ops() == sorted(op.name for op in OPS)
    for op in OPS:
        registered = getattr(torch.ops.moe_ops, op.name).default._schema
        assert registered == torch._C.parse_schema(op.qualname + op.func[len(op.name):]), op.name
        for key, value in op.dispatch.items():
            if key == "CUDA" and not torch_moe_ops._C.WITH_CUDA:
                continue
            if value.startswith(native_functions.PY):
                module = value[len(native_functions.PY):]
                importlib.import_module(module)
                where = module.replace(".", "/") + ".py"
            else:
                where = "torch_moe_ops/csrc/library.cpp"
            # The kernel at this key: a C++ function (unboxed) registered by
            # library.cpp's generated registration, or a Python one registered
            # by the module named. (Paths are those of the checkout that built
            # _C, which may be a cached build of another clone.)
            line = re.search(rf"^{key}: registered at (\S+):\d+ :: .*\[ ([\w ]+) \]$",
                             torch._C._dispatch_dump(op.qualname), re.M)
            assert line is not None, (op.name, key, value)
            assert line[1].endswith(where), (op.name, key, value, line[0])
            assert ("unboxed" in line[2].split()) == (where.endswith(".cpp")), (op.name, key, value, line[0])


def test_readme_table_of_ops_is_generated():
    """README.md's table of ops is what the declaration renders (each public
    op's call signature and readme text)."""
    text = pathlib.Path(native_functions.README).read_text()
    assert native_functions.render_readme(text) == text, (
        "README.md's table of ops is stale: run `python torch_moe_ops/native_functions.py readme`")


def test_device_generic_code_includes_no_cpu_header():
    """Only native/cpu/ (and testing/cpu/, the test-only kernels built on its
    headers) includes native/cpu/ headers: those are compiled once per CPU
    capability (each copy in its own CPU_CAPABILITY namespace and flags), so
    code compiled once that includes one gets a second, default copy of
    vectorised inline code, as ATen's layering forbids."""
    per_capability = (CSRC / "ATen/native/cpu", CSRC / "testing/cpu")
    offenders = []
    for path in sorted(CSRC.rglob("*")):
        if path.suffix in (".h", ".cpp", ".cu", ".cuh") and path.parent not in per_capability:
            for line in path.read_text().splitlines():
                if re.match(r'#include [<"](ATen/native/)?cpu/', line):
                    offenders.append(f"{path.relative_to(ROOT)}: {line}")
    assert not offenders


def test_opinfo_modules_hold_their_families_ops():
    """Each family's OpInfo module has exactly the family's public ops (an op's variants, OpInfos with a
    variant_test_name such as scaled_grouped_mm_v2's "structured", are more OpInfos of one of them)."""
    for family in native_functions.families():
        ops = sorted(op.name for op in native_functions.public_ops(family))
        db = _family_op_db(family)
        assert sorted(info.name.split(".", 1)[1] for info in db if not info.variant_test_name) == ops, family
        assert {info.name.split(".", 1)[1] for info in db if info.variant_test_name} <= set(ops), family


@pytest.mark.parametrize("old, new, error", [
    ("  family: routing\n", "  famliy: routing\n", r"router_topk|entry \d+: unknown keys \['famliy'\]"),
    # upstream.dispatch names the kernel the series registers in place of another of ours: never ours
    # itself, never a key ours lacks.
    ("      CPU: grouped_mm_cpu\n", "      CPU: grouped_mm_cached_cpu\n", r"grouped_mm: upstream dispatch .* names keys"),
    ("      CPU: grouped_mm_cpu\n", "      XLA: grouped_mm_cpu\n", r"grouped_mm: upstream dispatch .* names keys"),
])
def test_declaration_errors_are_caught(tmp_path, monkeypatch, old, new, error):
    """A typo in the declaration fails at load, naming the op."""
    text = pathlib.Path(native_functions.PATH).read_text()
    assert old in text
    bad = tmp_path / "native_functions.yaml"
    bad.write_text(text.replace(old, new, 1))
    monkeypatch.setattr(native_functions, "PATH", str(bad))
    native_functions.load.cache_clear()
    try:
        with pytest.raises(native_functions.DeclarationError, match=error):
            native_functions.load()
    finally:
        native_functions.load.cache_clear()


@pytest.mark.parametrize("op", [op.name for op in native_functions.public_ops()])
def test_op_has_every_piece(op):
    decl = native_functions.op(op)
    name = decl.qualname
    missing = []
    has = torch._C._dispatch_has_kernel_for_dispatch_key
    if not has(name, "CPU"):
        missing.append("CPU kernel")
    if torch_moe_ops._C.WITH_CUDA and not has(name, "CUDA"):
        missing.append("CUDA kernel (a CUDA build)")
    entry = torch._library.simple_registry.singleton.find(name)
    if entry.fake_impl.kernel is None:
        missing.append("fake kernel (register_fake)")
    elif not entry.fake_impl.kernel.source.rsplit(":", 1)[0].endswith(decl.ops_module):
        missing.append(f"fake kernel in {decl.ops_module} (it is at {entry.fake_impl.kernel.source})")
    family, opinfo = OPINFOS.get(op, (None, None))
    if opinfo is None:
        missing.append(f"OpInfo (test/opinfo_{decl.family}.py)")
    else:
        if opinfo.error_inputs_func is None:
            missing.append("error inputs in its OpInfo")
        if opinfo.supports_autograd and not has(name, "Autograd"):
            missing.append("autograd (register_autograd), which its OpInfo claims")
    if decl.upstream is not None:
        kernel = decl.upstream_dispatch()["CPU"]
        series = "".join(p.read_text() for p in sorted((ROOT / "patches/core").glob("*.patch")))
        # A dispatch line the series adds whose keys include CPU ("CPU:" or "CPU, CUDA:").
        dispatch = re.compile(rf"^\+    [\w, ]*\bCPU\b[\w, ]*: {kernel}$", re.M)
        if not dispatch.search(series):
            missing.append(f"upstream entry (core series dispatching CPU: {kernel}); regenerate patches/")
    if decl.benchmarked_through is None:
        benches = [p.name for p in (ROOT / "benchmarks").glob("bench_*.py") if re.search(rf"\b{op}\b", p.read_text())]
        if not benches:
            missing.append("benchmark (benchmarks/bench_*.py) or a benchmarked_through reason")
    readme = (ROOT / "README.md").read_text()
    if f"| `moe_ops::{op}(" not in readme:
        missing.append("row in README.md's table of ops")
    assert not missing, f"{op} lacks: {', '.join(missing)}"


def test_patch_messages_list_ops_through_placeholders():
    """A message names a family's ops through a placeholder filled from the
    declaration (patches/changes.py PLACEHOLDER), so a new op needs no message
    edit: no message lists two or more aten ops by hand, and the placeholders
    fill to the declared ops."""
    from patches import changes, manifest
    from patches.errors import PatchError

    aten = "|".join(sorted(native_functions.upstream_names().values(), key=len, reverse=True))
    by_hand = re.compile(rf"(?<!\w)(?:{aten})(?:,\s+(?:and\s+)?|\s+and\s+|\s+or\s+)(?:{aten})(?!\w)")
    for series in manifest.SERIES:
        for patch in series.patches:
            raw = (pathlib.Path(changes.MESSAGES) / patch.message).read_text()
            assert not by_hand.search(raw), f"patches/messages/{patch.message} lists ops by hand: {by_hand.search(raw)[0]}"
    routing = [o for o in native_functions.upstreamed("routing") if o.backward_of is None]
    assert changes.fill_message("{new_ops:routing}", "x") == ", ".join(o.upstream.name for o in routing)
    assert changes.fill_message("{moe_ops:fp8: or }", "x") == " or ".join(
        o.qualname for o in native_functions.upstreamed("fp8") if not o.upstream.extends)
    assert changes.fill_message("{backward_nodes:routing}", "x").split(", ")[0] == "MoeRouterTopkBackward0"
    # A PR of some of a family's ops (the ops= of its changes) lists those only.
    quantize = next(p for p in manifest.SERIES[0].patches if p.message == "core/0006-fp8-cpu.txt")
    assert quantize.selection == {"fp8": {"quantize_fp8"}}
    assert changes.fill_message("{ops:fp8: and }", "x", quantize.selection) == "_quantize_fp8"
    assert changes.fill_message("{ops:fp8: and }", "x", {"fp8": {"quantize_fp8", "dequantize_fp8"}}) == (
        "_quantize_fp8 and _dequantize_fp8")
    assert changes.fill_message("{ops:fp8: and }", "x", {"routing": {"permute"}}) == " and ".join(
        o.upstream.name for o in native_functions.upstreamed("fp8"))
    assert changes.fill_message("GroupedMM.{h,cpp}", "x") == "GroupedMM.{h,cpp}"
    with pytest.raises(PatchError, match=r"x: placeholder \{opz:routing\}: kind must be one of"):
        changes.fill_message("{opz:routing}", "x")
    with pytest.raises(PatchError, match=r"x: placeholder \{ops:routng\}: no family 'routng'"):
        changes.fill_message("{ops:routng}", "x")

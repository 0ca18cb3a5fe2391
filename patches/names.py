"""Upstream names, derived from the op declaration (torch_moe_ops/native_functions.yaml)
and from our Python, never listed by hand.

* An op's aten name is its declaration's ``upstream.name``.
* A family's meta function carries the checks of torch_moe_ops/_checks.py its
  fake kernels reach (the transitive closure of the ``_checks.<name>`` they
  call); checks an earlier family already carries are shared, not repeated.
* A check's upstream name: the op it is about, renamed to the aten op, leads
  (``check_permute_inputs`` -> ``_moe_permute_check_inputs``,
  ``grouped_mm_out_size`` -> ``_grouped_mm_out_size``); a check about no one
  op takes the family's prefix (``_c10`` -> ``_grouped_mm_c10``,
  ``ROUTER_SCORE_FUNCS`` -> ``_MOE_ROUTER_SCORE_FUNCS``) unless it already
  starts with it (``fp8_check_recipe`` -> ``_fp8_check_recipe``). Constants
  stay upper case.
* A fake kernel is the function decorated ``register_fake("moe_ops::<op>")``;
  its meta function is ``meta_`` + the aten name without its underscore.
"""

from __future__ import annotations

import ast
import functools
import os

from torch_moe_ops import native_functions

from .errors import PatchError

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CHECKS = "torch_moe_ops/_checks.py"
DECLARATION = os.path.relpath(native_functions.PATH, REPO_ROOT)

# The upstream namespace of each family's checks that are about no one op
# (families whose meta functions go upstream, in the order the compile series
# carries them).
HELPER_PREFIX = {"grouped_mm": "_grouped_mm", "routing": "_moe", "fp8": "_fp8"}


def _read(rel: str) -> str:
    with open(os.path.join(REPO_ROOT, rel), encoding="utf-8") as f:
        return f.read()


def aten_name(op: str) -> str:
    """The aten name of moe_ops::op (its declaration's upstream.name)."""
    names = native_functions.upstream_names()
    if op not in names:
        raise PatchError(DECLARATION, None, f"{op} does not go upstream: it has no aten name")
    return names[op]


def meta_name(op: str) -> str:
    return "meta_" + aten_name(op).lstrip("_")


def op_prefix(family: str) -> str:
    """The prefix that makes each upstreamed op of the family its aten name
    ("_moe_" for routing, "_" for fp8); an error if there is none."""
    ops = native_functions.upstreamed(family)
    prefixes = {o.upstream.name[:-len(o.name)] for o in ops if o.upstream.name.endswith(o.name)}
    if len(prefixes) != 1 or any(not o.upstream.name.endswith(o.name) for o in ops):
        raise PatchError(DECLARATION, None, f"the {family} ops' aten names share no prefix: "
                                            f"{[o.upstream.name for o in ops]}")
    return prefixes.pop()


def helper_name(name: str, family: str) -> str:
    """The upstream name of the check ``name`` of family (see the module docstring)."""
    upper = name.isupper()
    core = name.lstrip("_").lower()
    check = core.startswith("check_")
    if check:
        core = core[len("check_"):]
    ops = sorted(native_functions.upstream_names(), key=len, reverse=True)  # longest first: unpermute_backward
    op = next((o for o in ops if core == o or core.startswith(o + "_")), None)
    if op is not None:
        new = aten_name(op) + ("_check" if check else "") + core[len(op):]
    else:
        prefix = HELPER_PREFIX[family]
        core = ("check_" if check else "") + core
        new = "_" + core if core.startswith(prefix.lstrip("_") + "_") else f"{prefix}_{core}"
    return new.upper() if upper else new


def _top(source: str, path: str) -> dict[str, ast.stmt]:
    from .rewrite import parse, top_level_names
    return {n: node for node in parse(source, path).body for n in top_level_names(node)}


def fake_kernels(family: str) -> dict[str, str]:
    """op -> the name of its fake kernel in the family's ops module, for the
    family's ops that go upstream."""
    path = f"torch_moe_ops/ops/{family}.py"
    found = {}
    for node in _top(_read(path), path).values():
        for d in getattr(node, "decorator_list", []):
            if (isinstance(d, ast.Call) and ast.unparse(d.func) == "torch.library.register_fake"
                    and isinstance(d.args[0], ast.Constant)):
                found[d.args[0].value.split("::", 1)[1]] = node.name
    ops = [o.name for o in native_functions.upstreamed(family)]
    missing = [op for op in ops if op not in found]
    if missing:
        raise PatchError(path, None, f"no register_fake of {missing}")
    return {op: found[op] for op in ops}


def _closure(checks: dict[str, ast.stmt], roots: set[str]) -> set[str]:
    seen: set[str] = set()
    todo = list(roots)
    while todo:
        name = todo.pop()
        if name in seen:
            continue
        if name not in checks:
            raise PatchError(CHECKS, None, f"_checks.{name} is called by a fake kernel but not defined")
        seen.add(name)
        todo += [n.id for n in ast.walk(checks[name]) if isinstance(n, ast.Name) and n.id in checks]
    return seen


@functools.cache
def family_checks(family: str, ops: tuple[str, ...] | None = None) -> dict[str, str]:
    """The checks the family's meta functions carry (not those an earlier
    family carries), each -> its upstream name, in _checks.py's order; with
    ops, those that the fake kernels of these ops reach (a block of the
    family's meta functions that a later patch carries)."""
    checks = _top(_read(CHECKS), CHECKS)
    path = f"torch_moe_ops/ops/{family}.py"
    top = _top(_read(path), path)
    roots = set()
    for op, fake in fake_kernels(family).items():
        if ops is not None and op not in ops:
            continue
        roots |= {n.attr for n in ast.walk(top[fake]) if isinstance(n, ast.Attribute)
                  and isinstance(n.value, ast.Name) and n.value.id == "_checks"}
    earlier = shared_checks(family)
    order = list(checks)
    mine = sorted(_closure(checks, roots) - set(earlier), key=order.index)
    return {name: helper_name(name, family) for name in mine}


def shared_checks(family: str) -> dict[str, str]:
    """The checks of the families carried before family, with their upstream names."""
    out: dict[str, str] = {}
    for earlier in HELPER_PREFIX:
        if earlier == family:
            return out
        out.update(family_checks(earlier))
    raise KeyError(family)

"""OpInfos: test/opinfo_<family>.py becomes a module of
torch/testing/_internal/opinfo/definitions/, with the plain-torch references
it imports from torch_moe_ops/reference.py inlined (they are its refs) and
its op_db built for the aten ops instead of moe_ops."""

from __future__ import annotations

import ast
import re
from dataclasses import dataclass, field

from torch_moe_ops import native_functions


from . import names, rewrite
from .changes import declared_at, read_source
from .errors import PatchError

REFERENCE = "torch_moe_ops/reference.py"
DEFINITIONS = "torch/testing/_internal/opinfo/definitions"


def _closure(source: str, roots: list[str]) -> list[str]:
    """roots and the top-level names of source they use, transitively."""
    top = {n: node for node in rewrite.parse(source, REFERENCE).body for n in rewrite.top_level_names(node)}
    seen, todo = [], list(roots)
    while todo:
        name = todo.pop()
        if name not in seen:
            seen.append(name)
            todo += [n.id for n in ast.walk(top[name]) if isinstance(n, ast.Name) and n.id in top]
    return seen


@dataclass
class OpInfoModule:
    """``module``.py of the OpInfo definitions from test/opinfo_<family>.py:
    the first paragraph of its docstring becomes ``title``; the statement
    ``op_db = make_<family>_op_db(lambda op: f"moe_ops.{op}", lambda op:
    getattr(torch.ops.moe_ops, op).default)`` names and calls the aten ops
    (the family's aten prefix, from the declaration), or, for a module built
    otherwise, ``op_db_call`` gives (ours, upstream's). ``edits``, anchored
    (old, new) pairs, are applied to the result (e.g. an OpInfo flag a later
    patch of the stack flips).

    With ``ops`` (our names; a stack that adds a family's ops one PR at a
    time), the module holds the OpInfos of these ops only: each element of
    a list in the module that is a call naming another op of the family
    first (``opinfo("router_topk", ...)``) is left out with the comment lines
    above it, then every top-level definition and imported name no kept code
    uses. A later patch's OpInfoModule of the same module with more ops
    rewrites the file: its diff adds their OpInfos."""

    family: str
    module: str
    title: str
    op_db_call: tuple[str, str] | None = None
    edits: list[tuple[str, str]] = field(default_factory=list)
    ops: tuple[str, ...] = ()
    declared_at: str = field(default_factory=declared_at)

    @property
    def path(self) -> str:
        return f"{DEFINITIONS}/{self.module}.py"

    @property
    def source(self) -> str:
        return f"test/opinfo_{self.family}.py"

    @property
    def sources(self) -> list[str]:
        return [self.source, REFERENCE]

    def apply(self, upstream: str | None) -> str:
        src, reference_src = (read_source(s, self.declared_at) for s in self.sources)
        tree = rewrite.parse(src, self.source)
        lines = src.splitlines(keepends=True)
        doc = tree.body[0]
        if not (isinstance(doc, ast.Expr) and isinstance(doc.value, ast.Constant) and lines[0].startswith('"""')):
            raise PatchError(self.source, 1, "an OpInfo module starts with its docstring")
        first = src.index("\n\n")
        src = '"""' + self.title + src[first:]
        if self.ops:
            src = _select_ops(src, self.source, self.family, self.ops)
        src = "# mypy: ignore-errors\n\n" + src
        src = rewrite.replace_once(src, "from __future__ import annotations\n\n", "", self.source)
        if "from functools import partial\n" in src:
            src = rewrite.replace_once(src, "from functools import partial\n",
                                       "from functools import partial\nfrom typing import Optional\n", self.source)
        else:
            src = rewrite.replace_once(src, "\nimport torch\n", "\nfrom typing import Optional\n\nimport torch\n",
                                       self.source)
        # The references come along, in reference.py's order, where the import was.
        imports = [n for n in rewrite.parse(src, self.source).body
                   if isinstance(n, ast.ImportFrom) and n.module == "torch_moe_ops.reference"]
        if len(imports) != 1:
            raise PatchError(self.source, None, "expected one import from torch_moe_ops.reference")
        (imp,) = imports
        references = rewrite.definitions(reference_src, REFERENCE,
                                         _closure(reference_src, [a.name for a in imp.names]))
        lines = src.splitlines(keepends=True)
        start, end = imp.lineno - 1, imp.end_lineno
        while start and not lines[start - 1].strip():
            start -= 1
        while end < len(lines) and not lines[end].strip():
            end += 1
        src = "".join(lines[:start]) + "\n\n" + references + "\n\n\n" + "".join(lines[end:])
        if self.op_db_call is not None:
            ours, theirs = self.op_db_call
        else:
            prefix = names.op_prefix(self.family)
            ours = f'lambda op: f"moe_ops.{{op}}", lambda op: getattr(torch.ops.moe_ops, op).default)'
            theirs = f'lambda op: f"{prefix}{{op}}", lambda op: getattr(torch.ops.aten, f"{prefix}{{op}}").default)'
        src = rewrite.replace_once(src, ours, theirs, self.source)
        # Our op names in the inlined docstrings become the aten ones.
        aten = {op.name: op.upstream.name for op in native_functions.upstreamed()}
        src = re.sub(r"``moe_ops::(\w+)``", lambda m: f"``aten::{aten[m.group(1)]}``" if m.group(1) in aten
                     else m.group(0), src)
        for old, new in self.edits:
            src = rewrite.replace_once(src, old, new, self.source)
        return src


def _select_ops(src: str, path: str, family: str, ops: tuple[str, ...]) -> str:
    """src without the OpInfos of the family's other ops and what only they use (see OpInfoModule)."""
    family_ops = {o.name for o in native_functions.upstreamed(family)}
    unknown = [op for op in ops if op not in family_ops]
    if unknown:
        raise PatchError(path, None, f"ops={unknown}: no such op of the {family} family goes upstream")
    lines = src.splitlines(keepends=True)
    drop: set[int] = set()  # 0-based line numbers
    found: set[str] = set()
    for node in ast.walk(rewrite.parse(src, path)):
        if not isinstance(node, ast.List):
            continue
        previous_end = node.lineno  # 1-based; the line of the list's "["
        for elt in node.elts:
            first = (elt.args[0] if isinstance(elt, ast.Call) and elt.args else None)
            op = first.value if isinstance(first, ast.Constant) and isinstance(first.value, str) else None
            if op in family_ops:
                found.add(op)
                if op not in ops:
                    start = previous_end  # the lines after the previous element: its comments
                    while start < elt.lineno - 1 and not lines[start].strip().startswith("#"):
                        start += 1
                    drop |= set(range(start, elt.end_lineno))
            previous_end = elt.end_lineno
    missing = [op for op in ops if op not in found]
    if missing:
        raise PatchError(path, None, f"no OpInfo of {missing} (a list element naming the op first)")
    src = "".join(line for i, line in enumerate(lines) if i not in drop)
    # Then what no kept code uses, to a fixed point (a definition may be all that used another).
    while True:
        tree = rewrite.parse(src, path)
        used = {"op_db"}
        for node in tree.body:
            used |= {n.id for n in ast.walk(node) if isinstance(n, ast.Name)} - set(rewrite.top_level_names(node))
        lines = src.splitlines(keepends=True)
        cut: list[tuple[int, int, str | None]] = []  # (first line, last line, replacement), 1-based
        for node in tree.body:
            names = rewrite.top_level_names(node)
            if names and not any(n in used for n in names):
                cut.append((rewrite._first_line(node), node.end_lineno, None))
            elif isinstance(node, ast.ImportFrom) and node.module != "__future__":
                kept = [a for a in node.names if (a.asname or a.name) in used]
                if not kept:
                    cut.append((node.lineno, node.end_lineno, None))
                elif len(kept) < len(node.names):
                    names_text = ", ".join(a.name + (f" as {a.asname}" if a.asname else "") for a in kept)
                    cut.append((node.lineno, node.end_lineno, f"from {node.module} import {names_text}\n"))
        if not cut:
            return src
        for first, last, new in sorted(cut, reverse=True):
            lines[first - 1:last] = [new] if new else []
        src = re.sub(r"\n{4,}", "\n\n\n", "".join(lines))

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


def _closure(source: str, roots: list[str], skip=()) -> list[str]:
    """roots and the top-level names of source they use, transitively (none of skip, nor what only they use)."""
    top = {n: node for node in rewrite.parse(source, REFERENCE).body for n in rewrite.top_level_names(node)}
    seen, todo = [], [r for r in roots if r not in skip]
    while todo:
        name = todo.pop()
        if name not in seen and name not in skip:
            seen.append(name)
            todo += [n.id for n in ast.walk(top[name]) if isinstance(n, ast.Name) and n.id in top]
    return seen


def _bound_name(alias: ast.alias) -> str:
    """The module-level name an import binds for alias ("os.path" binds "os")."""
    return (alias.asname or alias.name).split(".")[0]


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
    rewrites the file: its diff adds their OpInfos. A module whose OpInfos
    are built by a function per op (test/opinfo_fp8.py) is cut otherwise:
    ``carried`` names
    the top-level definitions of the source a PR carries (with the references
    and imports they use) and ``op_db`` its op_db statement: the first such PR
    writes the module (its docstring ``title``), each later one
    (``extends=True``) appends its definitions before the op_db statement and
    replaces that statement with its own. ``source_edits``, anchored on the
    source, apply before the selection (an op whose samples land over
    several PRs, one per recipe: a list of the recipes' sample functions
    without the later PRs' ones). ``source_file`` (with ``carried``): a test
    module of one op (test/opinfo_<op>.py) whose definitions extend the
    family's module; what it imports from another OpInfo test module must be
    defined there already (an earlier PR's). ``imports`` (with ``carried``):
    references another upstream OpInfo module defines already, {name:
    module}, imported from there instead of inlined again (a later PR of the
    module finds them bound by that import)."""

    family: str
    module: str
    title: str
    op_db_call: tuple[str, str] | None = None
    edits: list[tuple[str, str]] = field(default_factory=list)
    ops: tuple[str, ...] = ()
    carried: list[str] | None = None
    op_db: str | None = None
    extends: bool = False
    source_edits: list[tuple[str, str]] = field(default_factory=list)
    source_file: str | None = None
    imports: dict[str, str] = field(default_factory=dict)
    declared_at: str = field(default_factory=declared_at)

    @property
    def path(self) -> str:
        return f"{DEFINITIONS}/{self.module}.py"

    @property
    def source(self) -> str:
        return self.source_file or f"test/opinfo_{self.family}.py"

    @property
    def sources(self) -> list[str]:
        return [self.source, REFERENCE]

    def apply(self, upstream: str | None) -> str:
        if self.carried is not None:
            return self._apply_selection(upstream)
        if self.extends or self.op_db is not None:
            raise PatchError(self.declared_at, None, "extends= and op_db= go with carried=")
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

    def _apply_selection(self, upstream: str | None) -> str:
        if self.op_db is None:
            raise PatchError(self.declared_at, None, "carried= needs op_db= (the module's op_db statement)")
        if self.extends != (upstream is not None):
            raise PatchError(self.path, None, "exists already: extend it (extends=True)" if upstream is not None
                             else "does not exist yet: the first OpInfoModule of a module adds it (extends=False)")
        src, reference_src = (read_source(s, self.declared_at) for s in self.sources)
        for old, new in self.source_edits:
            src = rewrite.replace_once(src, old, new, self.source)
        tree = rewrite.parse(src, self.source)
        defined: list[str] = []
        if upstream is not None:
            defined = [n for node in rewrite.parse(upstream, self.path).body for n in rewrite.top_level_names(node)
                       + [_bound_name(a) for a in getattr(node, "names", []) if isinstance(node, ast.ImportFrom)]]
            again = [n for n in self.carried if n in defined]
            if again:
                raise PatchError(self.path, None, f"already defines {again}: carry each definition once")
        body = rewrite.definitions(src, self.source, self.carried, provided=tuple(defined))
        used = {n.id for n in ast.walk(rewrite.parse(body, self.source)) if isinstance(n, ast.Name)}
        # The references the carried definitions call, inlined (those an earlier PR inlined are there).
        imports = [n for n in tree.body if isinstance(n, ast.ImportFrom) and n.module == "torch_moe_ops.reference"]
        if len(imports) != 1:
            raise PatchError(self.source, None, "expected one import from torch_moe_ops.reference")
        roots = [a.name for a in imports[0].names if a.name in used and a.name not in defined]
        refs = [n for n in _closure(reference_src, roots, skip=self.imports) if n not in defined]
        references = rewrite.definitions(reference_src, REFERENCE, refs,
                                         provided=(*defined, *self.imports)) if refs else ""
        new = (references + "\n\n\n" if references else "") + body
        code = rewrite.parse(new + "\n" + self.op_db, self.path)
        used = {n.id for n in ast.walk(code) if isinstance(n, ast.Name)} | \
            {n.value.id for n in ast.walk(code) if isinstance(n, ast.Attribute) and isinstance(n.value, ast.Name)}
        lines = src.splitlines(keepends=True)
        statements = []  # (text, names bound) of the source's imports the new code uses (this package's excepted)
        for node in tree.body:
            if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("opinfo_"):
                # a sibling OpInfo test module's definitions: the upstream module's own by now
                absent = [a.name for a in node.names if (a.asname or a.name) in used and a.name not in defined]
                if absent or any(a.asname for a in node.names):
                    raise PatchError(self.source, node.lineno, f"imports {absent or node.names} from {node.module}, "
                                     f"which {self.path} does not define (carry them in an earlier PR)")
                continue
            if isinstance(node, (ast.Import, ast.ImportFrom)) and not (
                    isinstance(node, ast.ImportFrom) and (node.module or "").split(".")[0] in ("__future__",
                                                                                               "torch_moe_ops")):
                names = {_bound_name(a) for a in node.names}
                if names & used:
                    statements.append(("".join(lines[node.lineno - 1:node.end_lineno]), names))
        statements += [(f"from {module} import {name}\n", {name}) for name, module in self.imports.items()
                       if name in used]
        if "Optional" in used:  # the references annotate with it (the module has no __future__ annotations)
            statements.append(("from typing import Optional\n", {"Optional"}))
        new = new.rstrip("\n")
        if upstream is None:
            # The standard library's imports, then torch's, as upstream groups them.
            std = sorted((t for t, _ in statements if not t.startswith(("import torch", "from torch"))),
                         key=lambda t: (t.startswith("from "), t))
            torch_imports = [t for t, _ in statements if t.startswith(("import torch", "from torch"))]
            text = ('# mypy: ignore-errors\n\n"""' + self.title + '"""\n\n' + "".join(std)
                    + ("\n" if std and torch_imports else "") + "".join(torch_imports) + "\n\n"
                    + new + "\n\n\n" + self.op_db.rstrip("\n") + "\n")
        else:
            text = upstream
            imports = [n for n in rewrite.parse(text, self.path).body if isinstance(n, (ast.Import, ast.ImportFrom))]
            bound = {_bound_name(a) for n in imports for a in n.names}
            # (an import whose used names the module binds already, differently grouped, is not missing)
            missing = [t for t, names in statements if t not in text and (names & used) - bound]
            if missing:
                at = sum(len(line) for line in text.splitlines(keepends=True)[:imports[-1].end_lineno])
                text = text[:at] + "".join(missing) + text[at:]
            dbs = [n for n in rewrite.parse(text, self.path).body if "op_db" in rewrite.top_level_names(n)]
            if len(dbs) != 1:
                raise PatchError(self.path, None, f"expected one op_db statement, found {len(dbs)}")
            tlines = text.splitlines(keepends=True)
            start, end = dbs[0].lineno - 1, dbs[0].end_lineno
            text = ("".join(tlines[:start]).rstrip("\n") + "\n\n\n" + new + "\n\n\n" + self.op_db.rstrip("\n") + "\n"
                    + "".join(tlines[end:]))
        aten = {op.name: op.upstream.name for op in native_functions.upstreamed()}
        text = re.sub(r"``moe_ops::(\w+)``", lambda m: f"``aten::{aten[m.group(1)]}``" if m.group(1) in aten
                      else m.group(0), text)
        for old, new_text in self.edits:
            text = rewrite.replace_once(text, old, new_text, self.source)
        rewrite.parse(text, self.path)
        return text


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

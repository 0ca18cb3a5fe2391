"""Source rewrites shared by the manifest's changes.

Python sources are rewritten token by token (``tokenize``), so comments,
docstrings and layout survive unchanged and only identifiers are renamed. Text
edits are anchored: the anchor must occur exactly once, otherwise the edit no
longer applies and the error names the file (and the line, when there are
several matches).
"""

from __future__ import annotations

import ast
import io
import re
import tokenize

from .errors import PatchError


def replace_once(text: str, old: str, new: str, path: str) -> str:
    """Replaces the single occurrence of old in text (the file at path)."""
    count = text.count(old)
    if count == 1:
        return text.replace(old, new)
    first_line = old.splitlines()[0] if old else old
    if count == 0:
        raise PatchError(path, None, f"edit no longer applies: anchor {first_line!r} not found")
    lines = []
    start = 0
    for _ in range(count):
        start = text.index(old, start)
        lines.append(text.count("\n", 0, start) + 1)
        start += 1
    raise PatchError(path, lines[0], f"edit is ambiguous: anchor {first_line!r} occurs at lines {lines}")


def parse(source: str, path: str) -> ast.Module:
    try:
        return ast.parse(source, filename=path)
    except SyntaxError as e:
        raise PatchError(path, e.lineno, f"not valid Python: {e.msg}") from None


def _first_line(node: ast.stmt) -> int:
    decorators = getattr(node, "decorator_list", [])
    return min([node.lineno] + [d.lineno for d in decorators])


def top_level_names(node: ast.stmt) -> list[str]:
    if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
        return [node.name]
    if isinstance(node, ast.Assign):
        return [t.id for t in node.targets if isinstance(t, ast.Name)]
    if isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name):
        return [node.target.id]
    return []


def definition(source: str, path: str, name: str) -> str:
    """The source of the top-level definition name, decorators included."""
    for node in parse(source, path).body:
        if name in top_level_names(node):
            lines = source.splitlines(keepends=True)
            return "".join(lines[_first_line(node) - 1:node.end_lineno])
    raise PatchError(path, None, f"no top-level definition named {name!r}")


def definitions(source: str, path: str, names: list[str], provided: tuple[str, ...] = ()) -> str:
    """The top-level definitions names, in source order, two blank lines apart.

    A carried definition that uses another top-level name of the module that
    is not carried (nor provided upstream by an earlier patch) would fail
    upstream with a NameError: that is an error here.
    """
    tree = parse(source, path)
    top = {name: node for node in tree.body for name in top_level_names(node)}
    missing = [n for n in names if n not in top]
    if missing:
        raise PatchError(path, None, f"no top-level definitions named {missing}")
    nodes = sorted({id(top[n]): top[n] for n in names}.values(), key=lambda n: n.lineno)
    for node in nodes:
        for used in ast.walk(node):
            if isinstance(used, ast.Name) and used.id in top and used.id not in names and used.id not in provided:
                raise PatchError(path, used.lineno, f"{used.id} is used by {top_level_names(node)[0]} "
                                                    "but not carried upstream: give it an upstream name")
    lines = source.splitlines(keepends=True)
    return "\n\n".join("".join(lines[_first_line(n) - 1:n.end_lineno]) for n in nodes)


def replace_definitions(source: str, path: str, names: list[str], new: str) -> str:
    """Replaces the top-level definitions names (decorators included, each
    followed by its blank lines) with new, placed where the first one was."""
    tree = parse(source, path)
    lines = source.splitlines(keepends=True)
    spans = []
    for name in names:
        nodes = [n for n in tree.body if name in top_level_names(n)]
        if len(nodes) != 1:
            raise PatchError(path, None, f"edit no longer applies: expected one top-level {name!r}, "
                                         f"found {len(nodes)}")
        start, end = _first_line(nodes[0]) - 1, nodes[0].end_lineno
        while end < len(lines) and not lines[end].strip():
            end += 1
        spans.append((start, end))
    spans.sort()
    out = lines[:spans[0][0]] + [new]
    for (_, end), (next_start, _) in zip(spans, spans[1:] + [(len(lines), None)]):
        out += lines[end:next_start]
    return "".join(out)


def rename(source: str, path: str, names: dict[str, str], module_alias: str | None = None) -> tuple[str, set[str]]:
    """Renames identifiers: bare names in names, and ``module_alias.attr`` to
    names[attr]. Attributes of other objects and strings are left alone.
    Returns the new source and the new names that module_alias references."""
    tokens = list(tokenize.generate_tokens(io.StringIO(source).readline))
    edits = []  # ((row, col) start, (row, col) end, text)
    used = set()
    for i, tok in enumerate(tokens):
        if tok.type == tokenize.STRING and _is_fstring(tok.string):
            text = _rename_in_fstring(tok.string, names, module_alias, used, path, tok.start[0])
            if text != tok.string:
                edits.append((tok.start, tok.end, text))
            continue
        if tok.type != tokenize.NAME:
            continue
        prev = tokens[i - 1] if i else None
        if prev is not None and prev.string == ".":
            owner = tokens[i - 2]
            if module_alias is not None and owner.string == module_alias:
                if tok.string not in names:
                    raise PatchError(path, tok.start[0],
                                     f"{module_alias}.{tok.string} has no upstream name in the manifest")
                edits.append((owner.start, tok.end, names[tok.string]))
                used.add(names[tok.string])
            continue
        if tok.string in names:
            edits.append((tok.start, tok.end, names[tok.string]))
    lines = source.splitlines(keepends=True)
    for (srow, scol), (erow, ecol), text in reversed(edits):
        if srow != erow:
            raise PatchError(path, srow, "cannot rename inside a string that spans lines")
        line = lines[srow - 1]
        lines[srow - 1] = line[:scol] + text + line[ecol:]
    return "".join(lines), used


def _is_fstring(token: str) -> bool:
    prefix = token[:len(token) - len(token.lstrip("rRbBuUfF"))]
    return "f" in prefix.lower()


_FIELD = re.compile(r"\{[^{}]*\}")


def _rename_in_fstring(token: str, names: dict[str, str], module_alias: str | None, used: set[str],
                       path: str, line: int) -> str:
    """Before Python 3.12, tokenize returns an f-string as one STRING token;
    rename in its replacement fields (which never nest braces in our code)."""
    def field(match: re.Match) -> str:
        text = match.group(0)
        if module_alias is not None:
            def attr(m: re.Match) -> str:
                if m.group(1) not in names:
                    raise PatchError(path, line, f"{module_alias}.{m.group(1)} has no upstream name in the manifest")
                used.add(names[m.group(1)])
                return names[m.group(1)]
            text = re.sub(rf"(?<![\w.]){re.escape(module_alias)}\.(\w+)", attr, text)
        for old, new in names.items():
            text = re.sub(rf"(?<![\w.]){re.escape(old)}(?!\w)", new, text)
        return text
    return _FIELD.sub(field, token)

"""Meta functions: a family's checks (torch_moe_ops/_checks.py) and fake
kernels (torch_moe_ops/ops/<family>.py) become helpers and meta functions of
torch/_meta_registrations.py, names rewritten to their upstream spelling
(patches/names.py derives which checks and what names)."""

from __future__ import annotations

from dataclasses import dataclass, field

from . import names, rewrite
from .changes import declared_at, read_source

META_REGISTRATIONS = "torch/_meta_registrations.py"


@dataclass
class Meta:
    """The family's block for torch/_meta_registrations.py: header, the
    checks it carries, then a meta function per fake kernel (register_fake
    turned into register_meta of the aten op). The block replaces the
    upstream definitions ``replaces`` or follows the definition ``after``.
    Ops in ``cpu_branch`` keep upstream's meta function: their fake becomes
    the helper ``_meta_<aten name>_cpu`` that ``edits`` (anchored on the
    upstream file) call. ``edits`` are applied to the upstream file first.

    ``ops`` selects some of the family's ops (all when empty), for a PR of
    one op: the block carries their meta functions and the checks they reach
    but those of ``earlier_ops``, the family's ops an earlier PR's block
    carries (and whose checks it may use); the manifest derives them from
    the series order.

    An op that lands over several PRs (one per recipe: _scaled_grouped_mm)
    has a block per PR: ``source_edits`` (anchored on torch_moe_ops/_checks.py)
    and ``leave_out`` (checks, our names) give the earlier PRs' checks without
    what a later one adds; that later block (``update=True``) is the same
    block grown, replacing the definitions the earlier one wrote (its header
    stays), so its diff is what it adds."""

    family: str
    header: str
    ops: tuple[str, ...] = ()
    earlier_ops: tuple[str, ...] = ()
    replaces: list[str] = field(default_factory=list)
    after: str | None = None
    cpu_branch: tuple[str, ...] = ()
    edits: list[tuple[str, str]] = field(default_factory=list)
    source_edits: list[tuple[str, str]] = field(default_factory=list)
    leave_out: tuple[str, ...] = ()
    update: bool = False
    path: str = META_REGISTRATIONS
    declared_at: str = field(default_factory=declared_at)

    @property
    def fake_source(self) -> str:
        return f"torch_moe_ops/ops/{self.family}.py"

    @property
    def sources(self) -> list[str]:
        return [names.CHECKS, self.fake_source]

    def carried_checks(self) -> dict[str, str]:
        """The checks this block carries -> their upstream names."""
        checks = names.op_checks(self.family, tuple(self.ops), tuple(self.earlier_ops))
        return {k: v for k, v in checks.items() if k not in self.leave_out}

    def meta_names(self) -> dict[str, str]:
        """fake kernel -> its upstream name."""
        out = {}
        for op, fake in names.fake_kernels(self.family, tuple(self.ops)).items():
            out[fake] = (f"_meta_{names.aten_name(op).lstrip('_')}_cpu" if op in self.cpu_branch
                         else names.meta_name(op))
        return out

    def apply(self, upstream: str | None) -> str:
        checks_src, fake_src = (read_source(s, self.declared_at) for s in self.sources)
        for old, new in self.source_edits:
            checks_src = rewrite.replace_once(checks_src, old, new, names.CHECKS)
        mine = self.carried_checks()
        shared = {**names.shared_checks(self.family),
                  **(names.op_checks(self.family, tuple(self.earlier_ops)) if self.earlier_ops else {})}
        # Shared checks are carried by an earlier block (another family's, or an earlier op's of this
        # family): renamed, not repeated.
        used_shared = {k: v for k, v in shared.items() if k not in mine}
        checks = rewrite.rename(checks_src, names.CHECKS, {**mine, **used_shared})[0]
        checks = rewrite.definitions(checks, names.CHECKS, list(mine.values()), provided=tuple(used_shared.values()))
        metas = self.meta_names()
        # Renamed as a whole file first, so that errors give the line in the ops module.
        # (every check of the family: the file's other fake kernels, not carried here, read theirs)
        every = {**names.shared_checks(self.family), **names.family_checks(self.family)}
        fakes = rewrite.rename(fake_src, self.fake_source, {**every, **metas}, module_alias="_checks")[0]
        blocks = []
        for op, fake in names.fake_kernels(self.family, tuple(self.ops)).items():
            meta = rewrite.definition(fakes, self.fake_source, metas[fake])
            register = "" if op in self.cpu_branch else f"@register_meta(aten.{names.aten_name(op)})\n"
            blocks.append(rewrite.replace_once(meta, f'@torch.library.register_fake("moe_ops::{op}")\n', register,
                                               self.fake_source))
        body = (checks + "\n\n" if checks else "") + "\n\n".join(blocks) + "\n\n"
        if self.update:
            # The earlier block's definitions, replaced by this one's in place (new checks among them).
            written = {n for node in rewrite.parse(upstream, self.path).body for n in rewrite.top_level_names(node)}
            mine = [n for node in rewrite.parse(body, self.path).body for n in rewrite.top_level_names(node)
                    if n in written]
            return rewrite.replace_definitions(upstream, self.path, mine, body)
        # Two blank lines between the header and a function (pycodestyle's E302), one before a constant.
        block = self.header + ("\n\n" if body.startswith(("def ", "@")) else "\n") + body
        for old, new in self.edits:
            upstream = rewrite.replace_once(upstream, old, new, self.path)
        if self.replaces:
            return rewrite.replace_definitions(upstream, self.path, self.replaces, block)
        after = rewrite.definition(upstream, self.path, self.after)
        return rewrite.replace_definitions(upstream, self.path, [self.after], after + "\n\n" + block)

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
    ``ops`` limits the block to these ops' meta functions and the checks
    only they reach; ``later`` leaves out ops a later patch's block carries."""

    family: str
    header: str
    replaces: list[str] = field(default_factory=list)
    after: str | None = None
    cpu_branch: tuple[str, ...] = ()
    edits: list[tuple[str, str]] = field(default_factory=list)
    ops: tuple[str, ...] | None = None
    later: tuple[str, ...] = ()
    path: str = META_REGISTRATIONS
    declared_at: str = field(default_factory=declared_at)

    @property
    def fake_source(self) -> str:
        return f"torch_moe_ops/ops/{self.family}.py"

    @property
    def sources(self) -> list[str]:
        return [names.CHECKS, self.fake_source]

    def fake_kernels(self) -> dict[str, str]:
        """op -> its fake kernel, of the ops this block carries."""
        return {op: fake for op, fake in names.fake_kernels(self.family).items()
                if (self.ops is None or op in self.ops) and op not in self.later}

    def checks(self) -> tuple[dict[str, str], dict[str, str]]:
        """(the checks this block carries, those earlier blocks carry), each -> its upstream name."""
        ops = tuple(self.fake_kernels())
        shared = names.shared_checks(self.family)
        if self.ops is None and not self.later:
            return names.family_checks(self.family), shared
        others = tuple(op for op in names.fake_kernels(self.family) if op not in ops)
        earlier = {} if self.ops is None else names.family_checks(self.family, others)
        mine = {k: v for k, v in names.family_checks(self.family, ops).items() if k not in earlier}
        return mine, {**shared, **earlier}

    def meta_names(self) -> dict[str, str]:
        """fake kernel -> its upstream name."""
        out = {}
        for op, fake in self.fake_kernels().items():
            out[fake] = (f"_meta_{names.aten_name(op).lstrip('_')}_cpu" if op in self.cpu_branch
                         else names.meta_name(op))
        return out

    def apply(self, upstream: str | None) -> str:
        checks_src, fake_src = (read_source(s, self.declared_at) for s in self.sources)
        mine, shared = self.checks()
        # Shared checks are carried by an earlier family's block: renamed, not repeated.
        used_shared = {k: v for k, v in shared.items() if k not in mine}
        checks = rewrite.rename(checks_src, names.CHECKS, {**mine, **used_shared})[0]
        checks = rewrite.definitions(checks, names.CHECKS, list(mine.values()), provided=tuple(used_shared.values()))
        metas = self.meta_names()
        # Renamed as a whole file first, so that errors give the line in the ops module.
        # (every check of the family named: the module also holds the fakes of other blocks' ops)
        every = {**names.shared_checks(self.family), **names.family_checks(self.family)}
        fakes = rewrite.rename(fake_src, self.fake_source, {**every, **mine, **used_shared, **metas},
                               module_alias="_checks")[0]
        blocks = []
        for op, fake in self.fake_kernels().items():
            meta = rewrite.definition(fakes, self.fake_source, metas[fake])
            register = "" if op in self.cpu_branch else f"@register_meta(aten.{names.aten_name(op)})\n"
            blocks.append(rewrite.replace_once(meta, f'@torch.library.register_fake("moe_ops::{op}")\n', register,
                                               self.fake_source))
        block = self.header + "\n" + checks + "\n\n" + "\n\n".join(blocks) + "\n\n"
        for old, new in self.edits:
            upstream = rewrite.replace_once(upstream, old, new, self.path)
        if self.replaces:
            return rewrite.replace_definitions(upstream, self.path, self.replaces, block)
        after = rewrite.definition(upstream, self.path, self.after)
        return rewrite.replace_definitions(upstream, self.path, [self.after], after + "\n\n" + block)

"""Bookkeeping of permutation groups while a spec is traced: which raw groups are one, and which are pinned.

Every layer output starts as a raw group; element-wise ops of two tracked tensors merge groups
(:meth:`Groups.union`), the network output pins them (never permuted), and a gate computed over a ``cat``
turns a group into an alias of the concatenated groups.

Examples:
    >>> groups = Groups()
    >>> a, b = groups.new("a", 4), groups.new("b", 4)
    >>> groups.union(a, b, "node 'add'")
    >>> groups.find(b)
    'a'
"""

from __future__ import annotations

from lightning_dimat.permutation.spec import Layout, Segment


class UnsupportedModelError(ValueError):
    """The automatic spec cannot see through part of the model; the message names the node and module."""


class Groups:
    """Union-find over raw group ids, with sizes and a pinned (never permuted) flag."""

    def __init__(self) -> None:
        self.parent: dict[str, str] = {}
        self.size: dict[str, int] = {}
        self.pinned: set[str] = set()
        self.order: list[str] = []
        self.aliases: dict[str, Layout] = {}  # a group that turned out to be a concatenation of others

    def new(self, name: str, size: int) -> str:
        """A fresh group of ``size`` units, named ``name`` unless that name is taken."""
        gid = name if name not in self.parent else f"{name}#{len(self.parent)}"
        self.parent[gid], self.size[gid] = gid, size
        self.order.append(gid)
        return gid

    def find(self, gid: str) -> str:
        """The root of ``gid``'s set (the group it stands for)."""
        while self.parent[gid] != gid:
            self.parent[gid] = self.parent[self.parent[gid]]
            gid = self.parent[gid]
        return gid

    def union(self, a: str, b: str, where: str) -> None:
        """Makes ``a`` and ``b`` one group (the older one names it); ``where`` goes into errors."""
        ra, rb = self.find(a), self.find(b)
        if ra == rb:
            return
        if ra in self.aliases or rb in self.aliases:
            raise UnsupportedModelError(f"{where}: ties a concatenation of channel groups to another group.")
        if self.size[ra] != self.size[rb]:
            raise UnsupportedModelError(f"{where}: ties {self.size[ra]} units to {self.size[rb]} units.")
        first, second = sorted((ra, rb), key=self.order.index)
        self.parent[second] = first
        if second in self.pinned:
            self.pinned.add(first)

    def pin(self, gid: str) -> None:
        """Marks ``gid`` (and the groups it is an alias of) as never permuted."""
        root = self.find(gid)
        self.pinned.add(root)
        for segment in self.aliases.get(root, ()):
            if segment.group is not None:
                self.pin(segment.group)

    def make_alias(self, gid: str, layout: Layout) -> None:
        """Declares that group ``gid``'s units are the concatenation ``layout`` (a gate over a ``cat``)."""
        root = self.find(gid)
        if root in self.pinned:
            for segment in layout:
                if segment.group is not None:
                    self.pin(segment.group)
        self.aliases[root] = layout

    def expand(self, segment: Segment) -> list[Segment]:
        """``segment`` with aliases replaced by the segments they stand for (groups as roots)."""
        if segment.group is None:
            return [segment]
        root = self.find(segment.group)
        if root not in self.aliases:
            return [Segment(root, segment.size, segment.block)]
        return [
            part
            for inner in self.aliases[root]
            for part in self.expand(Segment(inner.group, inner.size, inner.block * segment.block))
        ]


def _as_alias(groups: Groups, a: Layout, b: Layout) -> Layout | None:
    """If one layout is a single plain group as long as the other's plain segments, aliases it to them."""
    for single, several in ((a, b), (b, a)):
        if (
            len(single) == 1
            and single[0].group is not None
            and single[0].block == 1
            and all(s.block == 1 for s in several)
            and sum(s.size for s in several) == single[0].size
        ):
            groups.make_alias(single[0].group, several)
            return several
    return None


def unify_layouts(groups: Groups, a: Layout, b: Layout, where: str) -> Layout:
    """The layout of an element-wise combination of tensors laid out as ``a`` and ``b``.

    Matching segments become one group; a segment against an unpermuted one pins it; a single group
    against a concatenation becomes an alias of it. ``where`` names the node in errors.
    """
    if [(s.size, s.block) for s in a] != [(s.size, s.block) for s in b]:
        alias = _as_alias(groups, a, b)
        if alias is None:
            raise UnsupportedModelError(f"{where}: combines tensors whose channels are laid out differently.")
        return alias
    merged = []
    for left, right in zip(a, b, strict=True):
        if left.group is None or right.group is None:
            for segment in (left, right):
                if segment.group is not None:
                    groups.pin(segment.group)
            merged.append(Segment(None, left.size, left.block))
            continue
        groups.union(left.group, right.group, where)
        merged.append(left)
    return tuple(merged)

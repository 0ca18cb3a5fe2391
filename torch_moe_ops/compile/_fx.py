"""Matching helpers for Dynamo's torch-level graphs (the pre-grad IR).

That IR is not normalised: ``x.reshape(-1)`` is a ``call_method`` node,
``torch.reshape(x, -1)`` a ``call_function`` one, ``x[i]`` is
``operator.getitem`` and arguments come positionally or by keyword. These
helpers read a node the same way whichever spelling the model used, and read
dtypes and shapes from the fake tensors Dynamo stores in ``meta``.
"""

from __future__ import annotations

import logging
import operator
from typing import Any, Callable, Optional

import torch
import torch.fx as fx

# What the rewrites did: torch._dynamo.utils.counters[COUNTER][<op>] (and "matcher_error").
COUNTER = "torch_moe_ops"
log = logging.getLogger(__name__)


def count(name: str) -> None:
    torch._dynamo.utils.counters[COUNTER][name] += 1


def safe_match(matcher: Callable[[Any], Any], node: Any) -> Any:
    """A matcher's result, None if it raised: a matcher bug must not break the user's compile. It is
    logged and counted (``matcher_error``), which the tests' exact counter checks would show."""
    try:
        return matcher(node)
    except Exception:  # noqa: BLE001
        log.warning("MoE pass: %s failed on %s; left unchanged", matcher.__name__, node,
                    exc_info=True)
        count("matcher_error")
        return None



# Function spellings of the ops the router rewrite and these helpers read (a Tensor method is matched by
# its name). The experts rewrites (pre_grad.py) read more, in a table of their own.
_FUNCTIONS: dict[str, tuple[Any, ...]] = {
    "reshape": (torch.reshape,),
    "view": (),
    "sigmoid": (torch.sigmoid, torch.nn.functional.sigmoid),
    "softmax": (torch.softmax, torch.nn.functional.softmax, torch.ops.aten.softmax),
    "topk": (torch.topk,),
    "gather": (torch.gather,),
    "sum": (torch.sum,),
    "unsqueeze": (torch.unsqueeze,),
    "zeros_like": (torch.zeros_like,),
    "masked_fill": (torch.masked_fill,),
    "expand": (),
    "mul": (operator.mul, torch.mul),
    "add": (operator.add, torch.add),
    "truediv": (operator.truediv, torch.div, torch.true_divide),
    "itruediv": (operator.itruediv,),
    "getitem": (operator.getitem,),
    "setitem": (operator.setitem,),
}


def is_op(node: Any, name: str) -> bool:
    if not isinstance(node, fx.Node):
        return False
    if node.op == "call_function":
        return node.target in _FUNCTIONS.get(name, ())
    if node.op == "call_method":
        return node.target == name or (name == "truediv" and node.target == "div")
    return False


def arg(node: fx.Node, index: int, name: str, default: Any = None) -> Any:
    """Argument ``name`` of a call, the ``index``-th positional one of the
    function spelling (the method spelling has self at 0 as well)."""
    if name in node.kwargs:
        return node.kwargs[name]
    if index < len(node.args):
        return node.args[index]
    return default


def val(node: Any) -> Any:
    """The fake value Dynamo recorded for a node (a constant for non-nodes)."""
    if isinstance(node, fx.Node):
        return node.meta.get("example_value", node.meta.get("val"))
    return node


def dtype(node: Any) -> Optional[torch.dtype]:
    v = val(node)
    return v.dtype if isinstance(v, torch.Tensor) else None


def only_user(node: fx.Node) -> Optional[fx.Node]:
    users = list(node.users)
    return users[0] if len(users) == 1 else None


def getitem_users(node: fx.Node) -> Optional[dict[int, fx.Node]]:
    """{i: node[i]} for a node used only through constant indices (a tuple output)."""
    out = {}
    for u in node.users:
        if not (is_op(u, "getitem") and u.args[0] is node and isinstance(u.args[1], int) and u.args[1] not in out):
            return None
        out[u.args[1]] = u
    return out


def is_last_dim(d: Any, rank: int) -> bool:
    return isinstance(d, int) and (d == -1 or d == rank - 1)


def fake_mode_of(nodes: list[fx.Node]):
    # The mode the values were made in (the tracing context may hold another one by now).
    for n in nodes:
        mode = getattr(val(n), "fake_mode", None)
        if mode is not None:
            return mode
    return None


def insert_call(graph: fx.Graph, before: fx.Node, fn: Callable, args: tuple, kwargs: dict,
                fake_inputs: list[fx.Node]) -> fx.Node:
    """A ``call_function`` node running ``fn`` before ``before``, with its fake value
    (so that the passes Inductor runs after ours see the usual metadata)."""
    with graph.inserting_before(before):
        node = graph.call_function(fn, args, kwargs)
    mode = fake_mode_of(fake_inputs)
    if mode is not None:
        def fake(a):
            return val(a) if isinstance(a, fx.Node) else a
        with mode:
            node.meta["example_value"] = fn(*fx.node.map_aggregate(args, fake),
                                             **fx.node.map_aggregate(kwargs, fake))
    return node


def erase_dead(graph: fx.Graph, nodes: list[fx.Node]) -> None:
    """Erases the matched nodes that nothing uses any more, users first (the
    region includes mutations such as ``inv[perm] = arange``, which FX's dead
    code elimination keeps)."""
    alive = {n for n in nodes if n.op == "call_function" or n.op == "call_method"}
    changed = True
    while changed:
        changed = False
        for n in list(alive):
            if n not in alive:
                continue
            if not n.users:
                graph.erase_node(n)
                alive.discard(n)
                changed = True
            elif all(u in alive and is_op(u, "setitem") and u.args[0] is n and not u.users for u in n.users):
                # Only written into, never read: the writes are dead too.
                for u in list(n.users):
                    graph.erase_node(u)
                    alive.discard(u)
                changed = True

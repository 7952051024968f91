"""Warm pools across a fleet: the controller's ``/v1/pools`` (the daemon's routes, answered for every node).

* ``PUT /v1/pools/{template}`` configures the pool on every live node that holds the template for the backend
  and is not draining. The first node goes alone and checks the settings: a body it refuses is refused as is and
  configured nowhere. The others follow at once; a node that fails then is named, with the nodes that were
  configured, in the error. A pool of N members per node is N x nodes members in the fleet.
* ``GET /v1/pools`` and ``GET /v1/pools/{template}``: each (template, backend) summed over the nodes (members,
  hits, boots...; the claim p50/p99 are the highest node's), header ``x-branchbox-nodes`` naming them.
* ``DELETE /v1/pools/{template}``: removed on every live node that has it (404 when none has).

Members stay on their node; the allocator prefers a node with a free member (its push counts them)."""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Mapping, Sequence
from typing import Any

from branchbox.errors import BranchboxError, NodeUnreachableError, NotFoundError, TemplateNotFoundError
from branchbox.sdk._awire import AsyncWire
from branchbox.sdk._http1 import Reply, WireError, fixed_head

Wires = Callable[[str], AsyncWire]  # a node's URL -> the controller's pooled connections to it

COUNTS = ("ready", "booting", "claimed", "hits", "misses", "boots", "boot_failures", "replaced", "recycled", "target")
HIGHEST = ("claim_p50_ms", "claim_p99_ms")


def aggregate(items: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
    """One pool's statistics over the nodes that have it (the same template and backend)."""
    out = dict(items[0])
    for key in COUNTS:
        out[key] = sum(int(i.get(key) or 0) for i in items)
    for key in HIGHEST:
        values = [float(i[key]) for i in items if i.get(key) is not None]
        out[key] = max(values) if values else None
    return out


def merge(answers: Sequence[tuple[str, Sequence[Mapping[str, Any]]]]) -> list[dict[str, Any]]:
    """Every node's pool list -> one entry per (template, backend), in the order first seen."""
    groups: dict[tuple[str, str], list[Mapping[str, Any]]] = {}
    for _node, items in answers:
        for item in items:
            groups.setdefault((str(item["template"]), str(item["backend"])), []).append(item)
    return [aggregate(group) for group in groups.values()]


async def send(
    wire: AsyncWire, method: str, path: str, *, query: str, body: bytes | None, auth: Mapping[str, str]
) -> Reply | None:
    """One node's answer, or None when it did not answer."""
    try:
        return await wire.request(method, path, body, 60.0, query=query, extra=fixed_head(dict(auth)))
    except WireError:
        return None


def unreachable(node: str, done: Sequence[str], what: str = "configured") -> NodeUnreachableError:
    where = f"; {what} on {', '.join(done)} already" if done else ""
    return NodeUnreachableError(f"node {node!r} did not answer{where}: see `branchbox fleet nodes`", node=node)


def node_failed(node: str, resp: Reply | None, done: Sequence[str]) -> BranchboxError | Reply:
    """What a PUT answers when ``node`` failed after ``done`` were configured."""
    return unreachable(node, done) if resp is None else resp


def not_found(template: str, backend: str, *, held: bool) -> NotFoundError:
    if not held:
        return TemplateNotFoundError(
            f"no live node of the fleet holds template {template!r} for backend {backend!r} (draining nodes are "
            "left out): see `branchbox fleet nodes`"
        )
    return NotFoundError(
        f"no node of the fleet has a warm pool for template {template!r} on backend {backend!r}: "
        f"PUT /v1/pools/{template} makes one on every node that holds it"
    )


async def put_everywhere(
    wires: Wires,
    targets: Sequence[tuple[str, str]],
    path: str,
    *,
    query: str,
    body: bytes,
    auth: Mapping[str, str],
) -> tuple[list[str], list[dict[str, Any]], BranchboxError | Reply | None]:
    """PUT on the first node, then on the others at once: (nodes configured, their answers, the failure)."""
    first, url = targets[0]
    resp = await send(wires(url), "PUT", path, query=query, body=body, auth=auth)
    if resp is None or resp.status_code != 200:
        return [], [], node_failed(first, resp, [])
    done, answers = [first], [resp.json()]
    rest = await asyncio.gather(
        *(send(wires(u), "PUT", path, query=query, body=body, auth=auth) for _, u in targets[1:])
    )
    failed: tuple[str, Reply | None] | None = None
    for (node, _), got in zip(targets[1:], rest, strict=True):
        if got is not None and got.status_code == 200:
            done.append(node)
            answers.append(got.json())
        elif failed is None:
            failed = (node, got)
    return done, answers, None if failed is None else node_failed(*failed, done)

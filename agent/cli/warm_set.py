"""`agent warm-set [status] [--json]` and the warm-set part of `agent ls`."""

from __future__ import annotations

import json
from typing import Any

from agent.units import format_size
from client.errors import ModelNotFoundError
from client.transport import AgentConnection


def warm_set_status(conn: AgentConnection) -> dict[str, Any] | None:
    """The agent's warm-set status, or None when it runs without one."""
    try:
        return conn.request_json("GET", "/v1/warm-set")
    except ModelNotFoundError:
        return None


def show_warm_set(conn: AgentConnection, as_json: bool, data: dict[str, Any] | None = None) -> int:
    data = data if data is not None else warm_set_status(conn)
    if data is None:
        print("this agent has no warm set (agent serve --warm-set FILE, or WARMSTART_WARM_SET)")
        return 1
    if as_json:
        print(json.dumps(data, indent=2))
        return 0
    refresh = data.get("refresh_s")
    print(f"warm set {data['path']} (generation {data['generation']}"
          + (f", refresh {refresh:g}s" if refresh else "") + ")")
    if data.get("file_error"):
        print(f"  file error: {data['file_error']['message']} (the last good set stays in force)")
    rows = [("MODEL", "PIN", "STATE", "REVISION", "SIZE", "DETAIL")]
    for e in data["entries"]:
        total = e.get("total_bytes")
        size = format_size(total) if total is not None else "-"
        state, detail = e["state"], ""
        if state == "fetching":
            done = e.get("done_bytes") or 0
            pct = 100 * done / total if total else 0
            state = f"fetching {pct:.0f}%"
            target = (e.get("target_revision") or "")[:12]
            detail = f"-> {target}" + (f", replacing {e['replacing'][:12]}" if e.get("replacing") else "")
        elif state == "failed" and e.get("error"):
            detail = f"{e['error']['kind']}: {e['error']['message']}"
            if e.get("next_retry_s") is not None:
                detail += f" (retry in {e['next_retry_s']:.0f}s)"
        rows.append((e["ref"], "yes" if e["pin"] else "no", state, (e.get("revision") or "-")[:12], size, detail))
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]) - 1)]
    for r in rows:
        print(("  ".join(c.ljust(w) for c, w in zip(r[:-1], widths, strict=True)) + "  " + r[-1]).rstrip())
    return 0

"""A target's latency table and what it predicts per mask: ``python -m search.latency --target a100 --model vit_b16``.

``cpu`` (or ``local``) is this machine, measured once and cached (``search.profile``); any other
name is a table found by ``search.tables``: the user's measured ones first, then the shipped estimates.
"""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any

from pipeline.lock import LockHeld

from .tables import LOCAL_TARGETS, TableError, entries, load_table, predict_all, resolve


def table_for(target: str, model: str, batch_size: int, resolution: int | None, dtype: str | None = None,
              num_classes: int = 1000) -> dict[str, Any]:
    """The table of ``model`` on ``target``: measured here for ``cpu``, else the named target's."""
    if target in LOCAL_TARGETS:
        from .profile import local_table

        return local_table(model, batch_size, resolution, dtype or "fp32", num_classes=num_classes)
    from .parts import default_resolution

    return resolve(target, model, batch_size, resolution or default_resolution(model), dtype)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m search.latency",
                                description="Predicted latency of every mask from a named target's table.")
    p.add_argument("--target", help="a target name (see --list), or cpu to measure this machine")
    p.add_argument("--model", help="ADN model name")
    p.add_argument("--batch-size", type=int, default=1)
    p.add_argument("--resolution", type=int, help="input size (default: the model's)")
    p.add_argument("--dtype", help="pick a dtype when a target has several")
    p.add_argument("--list", action="store_true", help="list the tables found (user directory first)")
    p.add_argument("--json", action="store_true")
    args = p.parse_args(argv)
    if args.list:
        for e in entries():
            t = load_table(e.path)
            print(f"{e.target:<12} {t['model']:<13} b{t['batch_size']:<4} r{t['resolution']:<4} {t['dtype']:<5} "
                  f"{t['method']:<18} {e.source}: {e.path}")
        return 0
    if not args.target or not args.model:
        p.error("pass --target and --model, or --list.")
    try:
        table = table_for(args.target, args.model, args.batch_size, args.resolution, args.dtype)
    except (TableError, ValueError, LockHeld) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    preds = predict_all(table)
    if args.json:
        print(json.dumps({"target": args.target, "method": table["method"], "source": table["source"],
                          "latency_ms": preds}, indent=1))
        return 0
    print(f"{table['model']} on {args.target} ({table['device']}, {table['dtype']}, batch {table['batch_size']}, "
          f"{table['method']}, {table['source']} table {table['path']})")
    for mask, ms in preds.items():
        print(f"  {mask}  {ms:8.3f} ms")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

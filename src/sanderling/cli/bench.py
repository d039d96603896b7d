"""`sanderling bench NAME`: run a benchmark from the repository's benchmarks/ directory."""

from __future__ import annotations

import argparse
import importlib.util
import json
from pathlib import Path
from types import ModuleType

from sanderling.cli.output import progress, table

BENCH_DIR = Path(__file__).resolve().parents[3] / "benchmarks"


def load(name: str) -> ModuleType:
    path = BENCH_DIR / f"{name.replace('-', '_')}.py"
    if not path.exists():
        known = sorted(p.stem.replace("_", "-") for p in BENCH_DIR.glob("*.py") if not p.stem.startswith("_"))
        raise SystemExit(f"sanderling bench: no benchmark {name!r} in {BENCH_DIR}; known: {', '.join(known)}")
    spec = importlib.util.spec_from_file_location(f"sanderling_bench_{path.stem}", path)
    assert spec and spec.loader
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("bench", help="run a benchmark (and its reference) and print the figures")
    p.add_argument("name", help="benchmark name, e.g. flows")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.add_argument("--flows", type=int, default=None, help="flows: number of flows (default 100000)")
    p.add_argument("--repeats", type=int, default=None, help="repetitions, median reported")
    p.add_argument("--rounds", type=int, default=None, help="cni: rounds of concurrent ADDs; policy: iperf3 rounds")
    p.add_argument("--concurrency", type=int, default=None, help="cni: ADDs at once (default 20)")
    p.add_argument("--services", type=int, default=None, help="services: how many (default 10000)")
    p.add_argument("--changes", type=int, default=None, help="services: single-endpoint changes (default 1000)")
    p.add_argument("--seconds", type=int, default=None, help="chaos: how long to churn (default 300)")
    p.add_argument("--seed", type=int, default=None, help="chaos: seed of the writes and faults (default 1)")
    p.add_argument("--pods", type=int, default=None, help="lab-pods: how many pods (default 100)")
    p.add_argument("--network", action="store_true", default=None,
                   help="policy: MultiNetworkPolicies on a secondary network (the pod network as reference)")
    p.set_defaults(func=run)


def check_floors(result: dict) -> dict[str, bool]:
    """{figure: met} for every floor the benchmark declares as [op, bound]."""
    verdicts = {}
    for figure, (op, bound) in (result.get("floors") or {}).items():
        value = result.get(figure)
        verdicts[figure] = value is not None and (value <= bound if op == "<=" else value >= bound)
    return verdicts


def run(args: argparse.Namespace) -> int:
    module = load(args.name)
    options = (("flows", args.flows), ("repeats", args.repeats), ("rounds", args.rounds),
               ("concurrency", args.concurrency), ("services", args.services), ("changes", args.changes),
               ("seconds", args.seconds), ("seed", args.seed), ("network", args.network), ("pods", args.pods))
    kwargs = {k: v for k, v in options if v is not None}
    result = module.run(progress=progress, **kwargs)
    verdicts = check_floors(result)
    result["floors_met"] = all(verdicts.values())
    if args.json:
        print(json.dumps(result))
    else:
        floors = result.get("floors", {})
        rows = []
        for key, value in result.items():
            if key in ("floors", "floors_met"):
                continue
            floor = " ".join(map(str, floors[key])) if key in floors else ""
            verdict = ("ok" if verdicts[key] else "MISSED") if key in verdicts else ""
            rows.append((key, value, floor, verdict))
        print(table(["figure", "value", "floor", ""], rows))
    return 0 if result["floors_met"] else 1

"""Frozen-prefix reuse in ``medpeft_monai.compare``: wall time of one sweep with reuse against without.

Runs the same sweep twice in one process, ``cache=True`` then ``cache=False`` (same seeds, same everything
else), into ``OUT/reuse`` and ``OUT/no_reuse``, checks that every run's test metric agrees, and prints one
Markdown table row: wall times, their ratio and the largest metric difference. Writes ``OUT/bench.json``.

Examples (CPU; the sample data of ``dka_segmentation`` with LiteMedSAM's encoder)::

    python scripts/bench_compare.py --methods linear_probe lora dka --last-blocks 1 --out bench_reuse_last
    python scripts/bench_compare.py --fractions 1 --folds 1 --out bench_reuse_default   # the default method set
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

from medpeft_monai.compare import run
from medpeft_monai.utils import write_text_atomic


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--bundle", default="bundles/dka_segmentation")
    p.add_argument("--methods", nargs="+", default=None, help="default: the comparison's default set")
    p.add_argument("--last-blocks", type=int, default=None)
    p.add_argument("--fractions", type=float, nargs="+", default=[0.25, 1.0])
    p.add_argument("--folds", type=int, default=2)
    p.add_argument("--steps", type=int, default=40)
    p.add_argument("--out", type=Path, default=Path("bench_reuse"))
    args = p.parse_args(argv)
    common = dict(bundle=args.bundle, methods=args.methods, last_blocks=args.last_blocks, fractions=args.fractions,
                  folds=args.folds, steps=args.steps, progress=False)
    timings, reports = {}, {}
    for name, cache in (("reuse", True), ("no_reuse", False)):
        out = args.out / name
        if out.exists() and any(out.iterdir()):
            p.error(f"{out} is not empty: a resumed sweep would not be timed; pass a new --out.")
        t0 = time.perf_counter()
        reports[name] = run(out=out, cache=cache, **common)
        timings[name] = time.perf_counter() - t0
    key = lambda r: (r["method"], r["fraction"], r["fold"])  # noqa: E731
    plain = {key(r): r for r in reports["no_reuse"]["results"]}
    diff = max(abs(r["metric"] - plain[key(r)]["metric"]) for r in reports["reuse"]["results"])
    methods = [m["name"] for m in reports["reuse"]["methods"]]
    ratio = timings["reuse"] / timings["no_reuse"]
    result = {"methods": methods, "last_blocks": args.last_blocks, "fractions": args.fractions, "folds": args.folds,
              "steps": args.steps, "runs": len(reports["reuse"]["results"]), "reuse_s": timings["reuse"],
              "no_reuse_s": timings["no_reuse"], "ratio": ratio, "max_metric_difference": diff,
              "prefix_cache": reports["reuse"]["prefix_cache"]}
    write_text_atomic(args.out / "bench.json", json.dumps(result, indent=1))
    print("| methods | runs | with reuse (s) | without (s) | ratio | largest test-metric difference |")
    print("|---|---|---|---|---|---|")
    print(f"| {' '.join(methods)}{f' (last {args.last_blocks} blocks)' if args.last_blocks else ''} | "
          f"{result['runs']} | {timings['reuse']:.0f} | {timings['no_reuse']:.0f} | {ratio:.2f}x | {diff:.1e} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())

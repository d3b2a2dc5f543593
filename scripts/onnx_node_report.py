"""Run every ONNX backend node test through SbpcBackend and report how many pass.

    python scripts/onnx_node_report.py            # totals and reasons, grouped
    python scripts/onnx_node_report.py -v         # ... and every non-passing case by name
    python scripts/onnx_node_report.py -k resize  # only cases whose name contains "resize"

"unsupported" cases raised UnsupportedOnnx (an op, data type or domain the converter refuses);
"fail" cases ran but produced outputs ONNX's comparison rejects; "error" cases crashed.
"""
from __future__ import annotations

import argparse
import re
import sys
import time
from collections import Counter, defaultdict
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from tests.frontend.onnx_node_cases import all_node_cases, classify  # noqa: E402


def reason_key(status: str, detail: str) -> str:
    """The detail with case-specific parts (names, opset numbers) removed, for grouping."""
    if status == "unsupported":
        detail = re.sub(r"ONNX (node|graph input|graph output|initializer) '[^']*'",
                        r"ONNX \1", detail)
        detail = re.sub(r", opset \d+", "", detail)
        return detail.split(". ")[0].split(" (and ")[0]
    if status == "fail":
        return detail.split("\n")[0][:120]
    return detail.split(":")[0]


def main(argv: list[str] | None = None) -> int:
    """Run the node tests and print the report; the exit status is always 0."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("-k", dest="pattern", default="", help="only cases whose name has this")
    parser.add_argument("-v", "--verbose", action="store_true", help="list non-passing cases")
    args = parser.parse_args(argv)

    start = time.perf_counter()
    cases = [case for case in all_node_cases() if args.pattern in case.name]
    counts: Counter[str] = Counter()
    groups: dict[tuple[str, str], list[str]] = defaultdict(list)
    for case in cases:
        outcome = classify(case)
        counts[outcome.status] += 1
        if outcome.status != "pass":
            groups[(outcome.status, reason_key(outcome.status, outcome.detail))].append(
                case.name if not args.verbose else f"{case.name}: {outcome.detail[:200]}")

    total = len(cases)
    print(f"ONNX backend node tests: {total} cases in {time.perf_counter() - start:.1f} s")
    for status in ("pass", "unsupported", "fail", "error"):
        share = 100.0 * counts[status] / total if total else 0.0
        print(f"  {status:<12}{counts[status]:>6}  ({share:.1f}%)")
    for status in ("unsupported", "fail", "error"):
        entries = sorted(((key, names) for (s, key), names in groups.items() if s == status),
                         key=lambda item: (-len(item[1]), item[0]))
        if not entries:
            continue
        print(f"\n{status} ({counts[status]}), by reason:")
        for key, names in entries:
            print(f"  {len(names):>4}  {key}")
            if args.verbose or status != "unsupported":
                for name in names:
                    print(f"          {name}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

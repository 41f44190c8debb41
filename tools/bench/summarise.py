#!/usr/bin/env python3
"""Summarises `edgeadapt bench --json` files into the tables of docs/adaptation.md.

Usage: tools/bench/summarise.py OUT_DIR

OUT_DIR holds files named DATA-kK-sSHARE.json (SHARE is `none` for the traffic as it is), as
written by tools/bench/grid.sh. Prints two markdown tables: the goals of `recommended` per case,
and the unseen-share estimates against the true share. Standard library only.
"""

import json
import pathlib
import re
import sys

NAME = re.compile(r"^(?P<data>.+)-k(?P<k>\d+)-s(?P<share>none|[0-9.]+)\.json$")
ESTIMATORS = ["count", "bbse", "em", "pu"]


def load(folder):
    cases = {}
    for path in sorted(pathlib.Path(folder).glob("*.json")):
        match = NAME.match(path.name)
        if match:
            key = (match["data"], int(match["k"]), match["share"])
            cases[key] = json.loads(path.read_text())
    # A resampled traffic that is the traffic as it is (18 of 36 seen at 50 %) is one case.
    for (data, k, share), report in list(cases.items()):
        natural = cases.get((data, k, "none"))
        if share != "none" and natural and natural["traffic"]["samples"] == report["traffic"]["samples"] \
                and natural["traffic"]["true_unseen_share"] == report["traffic"]["true_unseen_share"]:
            del cases[(data, k, share)]
    return cases


def order(key):
    data, k, share = key
    return (data, k, -1.0 if share == "none" else float(share))


def mean(report, method, metric):
    entry = report["methods"].get(method)
    if not entry or entry.get("error"):
        return None
    return 100.0 * entry[metric]["mean"]


def per_seed(report, method, metric):
    entry = report["methods"].get(method)
    return [100.0 * v for v in entry[metric]["per_seed"]] if entry and not entry.get("error") else []


def goals(cases):
    print("| bench | seen | traffic unseen share (true) | source overall | `recommended` overall (Δ) | seen Δ | unseen Δ, worst seed | `recommended@true-share` overall | `recommended@balanced` overall (unseen Δ, worst seed) | `ft-tail+prior-source` overall | best other row | oracle | gap closed |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|---|")
    for key in sorted(cases, key=order):
        data, k, share = key
        report = cases[key]
        oracle_report = cases.get((data, k, "none"), report)
        source = mean(report, "source", "overall")
        rec = mean(report, "recommended", "overall")
        if source is None or rec is None:
            continue
        seen_d = mean(report, "recommended", "seen") - mean(report, "source", "seen")
        source_unseen = mean(report, "source", "unseen")
        worst_unseen = min(v - source_unseen for v in per_seed(report, "recommended", "unseen"))
        oracle = mean(oracle_report, "oracle", "overall")
        others = [
            (mean(report, m, "overall"), m)
            for m in report["order"]
            if m not in ("recommended", "recommended@true-share", "recommended@balanced", "oracle", "source") and mean(report, m, "overall") is not None
        ]
        best = max(others) if others else None
        gap = (rec - source) / (oracle - source) if oracle and oracle > source else None
        true_share = mean(report, "recommended@true-share", "overall")
        prior_source = mean(report, "ft-tail+prior-source", "overall")
        balanced = mean(report, "recommended@balanced", "overall")
        balanced_unseen = [v - source_unseen for v in per_seed(report, "recommended@balanced", "unseen")]
        balanced_cell = "-" if balanced is None else f"{balanced:.1f} ({min(balanced_unseen):+.1f})"
        fmt = lambda v: "-" if v is None else f"{v:.1f}"
        print(
            f"| {data} | {k} | {report['traffic']['true_unseen_share']:.3f} | {source:.1f} | {rec:.1f} ({rec - source:+.1f}) | {seen_d:+.1f} | {worst_unseen:+.1f} "
            f"| {fmt(true_share)} | {balanced_cell} | {fmt(prior_source)} | {'-' if best is None else f'{best[1]} {best[0]:.1f}'} | {fmt(oracle)} | {'-' if gap is None else f'{100 * gap:.0f} %'} |"
        )


def study(cases):
    print("| bench | seen | true share | " + " | ".join(ESTIMATORS) + " |")
    print("|---|---|---|" + "---|" * len(ESTIMATORS))
    within = {e: 0 for e in ESTIMATORS}
    covered = {e: 0 for e in ESTIMATORS}
    total = 0
    for key in sorted(cases, key=order):
        data, k, _ = key
        traffic = cases[key]["traffic"]
        truth = traffic["true_unseen_share"]
        found = {e["estimator"]: e for e in traffic["estimates"]}
        if not found:
            continue
        total += 1
        cells = []
        for name in ESTIMATORS:
            e = found[name]
            within[name] += abs(e["share"] - truth) <= 0.05
            covered[name] += e["low"] <= truth <= e["high"]
            cells.append(f"{e['share']:.3f} [{e['low']:.3f}, {e['high']:.3f}]")
        print(f"| {data} | {k} | {truth:.3f} | " + " | ".join(cells) + " |")
    print()
    print(f"Within 0.05 of the true share, of {total} cases: " + ", ".join(f"{e} {within[e]}" for e in ESTIMATORS))
    print(f"Interval holds the true share, of {total} cases: " + ", ".join(f"{e} {covered[e]}" for e in ESTIMATORS))


def main():
    if len(sys.argv) != 2:
        sys.exit(__doc__)
    cases = load(sys.argv[1])
    if not cases:
        sys.exit(f"no DATA-kK-sSHARE.json files in {sys.argv[1]}")
    goals(cases)
    print()
    study(cases)


if __name__ == "__main__":
    main()

"""The tables ``benchmarks/zoo.py`` prints from its results (Markdown, to paste as is).

>>> geomean([2.0, 8.0])
4.0
"""

from __future__ import annotations

import math
from collections import defaultdict
from collections.abc import Iterable
from typing import Any

from benchmarks.zoo_profile import OUR_RULES, family

TOP = 12  # rows of the per-PrimFunc and per-op-type tables of a breakdown


def geomean(values: Iterable[float]) -> float:
    values = list(values)
    return math.exp(sum(math.log(v) for v in values) / len(values)) if values else math.nan


def machine_line(machine: dict[str, Any]) -> str:
    return (
        f"{machine.get('cpu')} ({', '.join(machine.get('flags', []))}); "
        f"{machine.get('cpus')} CPUs usable, load average {machine.get('load', 0):.2f}; "
        f"TVM {machine.get('apache-tvm')}, ONNX Runtime {machine.get('onnxruntime')}, "
        f"torch {machine.get('torch')}; commit {machine.get('commit')}; {machine.get('date')}"
    )


def slowest(timings: list[dict[str, Any]], count: int, dims: str = "fixed") -> list[dict[str, Any]]:
    """The ``count`` models with the highest ours/ORT at ``dims``, the fewest threads and
    the smallest batch: each model's worse exporter."""
    rows = [r for r in timings if "ratio" in r and r["dims"] == dims]
    if not rows:
        return []
    threads = min(r["threads"] for r in rows)
    batch = min(r["batch"] for r in rows)
    worst: dict[str, dict[str, Any]] = {}
    for row in rows:
        if (row["threads"], row["batch"]) != (threads, batch):
            continue
        if row["model"] not in worst or row["ratio"] > worst[row["model"]]["ratio"]:
            worst[row["model"]] = row
    return sorted(worst.values(), key=lambda r: -r["ratio"])[:count]


def print_all(results: dict[str, Any]) -> None:
    print(f"\n{machine_line(results['machine'])}\ncommand: {results['command']}")
    print_exports(results)
    print_compiles(results)
    print_timings(results["timings"])
    print_wide(results)
    for item in results["breakdowns"]:
        print_breakdown(item)


def print_exports(results: dict[str, Any]) -> None:
    exports = results["exports"]
    done = sum(1 for e in exports if e["path"])
    print(f"\n## Exports: {done} of {len(exports)}")
    for e in exports:
        if not e["path"] or e["note"]:
            print(f"- {e['model']} ({e['exporter']}): {e['error'] or e['note']}")
    for r in results["rewrites"]:
        if "error" in r:
            print(f"- {r['model']} ({r['exporter']}): rewrite failed: {r['error']}")


def _status(record: dict[str, Any] | None) -> str:
    if record is None:
        return "-"
    if record["status"] == "compiled":
        return f"ok {record['seconds']:.0f} s"
    return record["status"]


def _not_ours(record: dict[str, Any] | None) -> str:
    """``not ours / scalar / all`` PrimFuncs (in parentheses for a compile that failed
    after scheduling)."""
    if record is None or "primfuncs" not in record:
        return "-"
    funcs = record["primfuncs"]
    others = sum(not f["ours"] for f in funcs)
    scalar = sum(f["vector"] is False for f in funcs)
    text = f"{others} / {scalar} / {len(funcs)}"
    return text if record["status"] == "compiled" else f"({text})"


def print_compiles(results: dict[str, Any]) -> None:
    compiles = results["compiles"]
    if not compiles:
        return
    batches = sorted({c["batch"] for c in compiles if c["batch"] is not None})
    index = {(c["model"], c["exporter"], c["dims"], c["batch"]): c for c in compiles}
    pairs = list(dict.fromkeys((c["model"], c["exporter"]) for c in compiles))
    print(
        "\n## Compiles (PrimFuncs: not scheduled by our rules or kernels / without a "
        "vectorized loop / all)"
    )
    head = ["model", "exporter", "symbolic", "PrimFuncs (sym)"]
    head += [f"fixed b{b}" for b in batches] + [f"PrimFuncs (b{b})" for b in batches[:1]]
    bounded = any(c["dims"] == "bounded" for c in compiles)
    head += ["bounded"] if bounded else []
    print(_row(head) + "\n" + _row(["---"] * len(head)))
    for model, exporter in pairs:
        symbolic = index.get((model, exporter, "symbolic", None))
        fixed = [index.get((model, exporter, "fixed", b)) for b in batches]
        cells = [model, exporter, _status(symbolic), _not_ours(symbolic)]
        cells += [_status(f) for f in fixed] + [_not_ours(f) for f in fixed[:1]]
        cells += [_status(index.get((model, exporter, "bounded", None)))] if bounded else []
        print(_row(cells))
    print_schedules(compiles)
    failures = [c for c in compiles if c["status"] != "compiled"]
    if failures:
        print("\nCompile failures:")
    for c in failures:
        where = c["dims"] + ("" if c["batch"] is None else f" b{c['batch']}")
        operator = f" [operator {c['operator']}]" if c.get("operator") else ""
        print(f"- {c['model']} ({c['exporter']}, {where}): {c['status']}: {c['error']}{operator}")


def print_schedules(compiles: list[dict[str, Any]]) -> None:
    """PrimFuncs by op family and by what scheduled them, over all compiled libraries
    (fixed dims at the smallest batch, and symbolic), and the models where each family
    has PrimFuncs that are not ours."""
    batches = [c["batch"] for c in compiles if c["batch"] is not None]
    for dims in ("fixed", "symbolic"):
        chosen = [
            c
            for c in compiles
            if c["status"] == "compiled"
            and c["dims"] == dims
            and c["batch"] == (min(batches) if dims == "fixed" and batches else None)
        ]
        if not chosen:
            continue
        counts: dict[str, dict[str, int]] = defaultdict(lambda: defaultdict(int))
        where: dict[str, set[str]] = defaultdict(set)
        for c in chosen:
            for f in c.get("primfuncs", []):
                row = counts[family(f["name"])]
                row[f["scheduled_by"]] += 1
                row["scalar"] += f["vector"] is False
                if not f["ours"] or f["vector"] is False:
                    where[family(f["name"])].add(c["model"])
        rules = ["kernel", *OUR_RULES, "Reduction", "none", "scalar"]
        label = "fixed dims" + (f", batch {min(batches)}" if batches else "")
        print(
            f"\n## PrimFuncs by op family and schedule ({label if dims == 'fixed' else dims}; "
            f"{len(chosen)} libraries; Reduction: dlight's generic CPU rule; none: no rule "
            "applied; scalar: no vectorized loop around the reduction, or at all)"
        )
        head = ["op family", *rules, "models with PrimFuncs not ours or scalar"]
        print(_row(head) + "\n" + _row(["---"] * len(head)))
        for name, row in sorted(counts.items(), key=lambda kv: -sum(kv[1].values())):
            models = ", ".join(sorted(where[name])) or "-"
            print(_row([name, *(row.get(rule, 0) or "" for rule in rules), models]))


def print_timings(timings: list[dict[str, Any]]) -> None:
    if not timings:
        return
    print("\n## ours / ORT (time ratio; < 1: faster than ONNX Runtime)")
    head = ["model", "exporter", "dims", "threads", "batch", "ours ms", "ORT ms", "ours/ORT"]
    head += ["max rel err", "cosine"]
    print(_row(head) + "\n" + _row(["---"] * len(head)))
    for r in timings:
        cells = [r["model"], r["exporter"], r.get("dims", "-"), r["threads"], r.get("batch", "-")]
        if "ratio" in r:
            mark = "~" if r["method"] != "interleaved" else ""
            cells += [f"{r['ours_ms']:.2f}", f"{r['ort_ms']:.2f}", f"{mark}{r['ratio']:.2f}"]
            cells += [f"{r['max_rel_err']:.1e}", f"{r['cosine']:.6f}"]
        else:
            cells += ["-", "-", f"failed: {r.get('error', r.get('status'))}", "-", "-"]
        print(_row(cells))
    print("\n(~: a call over --slow seconds; the faster of two calls, not interleaved rounds)")
    groups: dict[tuple[str, int, int], list[dict[str, Any]]] = defaultdict(list)
    for r in timings:
        if "ratio" in r:
            groups[(r["dims"], r["threads"], r["batch"])].append(r)
    print("\n## Summary")
    print(_row(["dims", "threads", "batch", "cases", "geomean ours/ORT", "worst", "best"]))
    print(_row(["---"] * 7))
    for (dims, threads, batch), rows in sorted(groups.items()):
        worst = max(rows, key=lambda r: r["ratio"])
        best = min(rows, key=lambda r: r["ratio"])
        print(
            _row(
                [dims, threads, batch, len(rows), f"{geomean(r['ratio'] for r in rows):.2f}"]
                + [f"{worst['ratio']:.2f} {worst['model']} ({worst['exporter']})"]
                + [f"{best['ratio']:.2f} {best['model']} ({best['exporter']})"]
            )
        )
    bad = [r for r in timings if "max_rel_err" in r and r["max_rel_err"] > 1e-4]
    for r in bad:
        print(
            f"- disagrees with ORT: {r['model']} ({r['exporter']}, {r['dims']}, "
            f"b{r['batch']}): max rel err {r['max_rel_err']:.1e}, cosine {r['cosine']:.6f}"
        )


def print_wide(results: dict[str, Any]) -> None:
    """One row per model: ours/ORT per (dims, threads, batch), TorchScript / dynamo."""
    rows = [r for r in results["timings"] if "ratio" in r]
    if not rows:
        return
    columns = sorted({(r["dims"], r["threads"], r["batch"]) for r in rows}, key=_column_order)
    index = {(r["model"], r["exporter"], r["dims"], r["threads"], r["batch"]): r for r in rows}
    compiles = {(c["model"], c["exporter"], c["dims"]): c for c in results["compiles"]}
    exporters = list(dict.fromkeys(e["exporter"] for e in results["exports"]))
    families = {e["model"]: e["family"] for e in results["exports"]}
    print(f"\n## ours / ORT per model ({' / '.join(exporters)})")
    head = ["model", "family", "symbolic compile"]
    head += [f"{d} {t}t b{b}" for d, t, b in columns]
    print(_row(head) + "\n" + _row(["---"] * len(head)))
    for model in dict.fromkeys(e["model"] for e in results["exports"]):
        symbolic = " / ".join(
            _status(compiles.get((model, exporter, "symbolic"))).split(" ")[0]
            for exporter in exporters
        )
        cells = [model, families[model], symbolic]
        for dims, threads, batch in columns:
            values = []
            for exporter in exporters:
                row = index.get((model, exporter, dims, threads, batch))
                values.append(f"{row['ratio']:.2f}" if row else "-")
            cells.append(" / ".join(values))
        print(_row(cells))


def _column_order(column: tuple[str, int, int]) -> tuple[int, int, int]:
    dims, threads, batch = column
    return (batch, threads, {"fixed": 0, "bounded": 1}.get(dims, 2))


def print_breakdown(item: dict[str, Any]) -> None:
    if "ours" not in item:
        print(f"\nbreakdown of {item['model']} failed: {item.get('error')}")
        return
    funcs = {f["name"]: f for f in item["primfuncs"]}
    ours_total = sum(r["seconds"] for r in item["ours"])
    ort_total = sum(r["seconds"] for r in item["ort"])
    print(
        f"\n## Breakdown: {item['model']} ({item['exporter']}, {item.get('dims', 'fixed')} "
        f"dims), batch {item['batch']}, "
        f"{item['threads']} thread(s): ours {ours_total * 1e3:.1f} ms per run "
        f"(VM instrument, {item['runs']} runs), ORT {ort_total * 1e3:.1f} ms in kernels"
    )
    by_family: dict[str, list[float]] = defaultdict(lambda: [0.0, 0.0, 0, 0])
    for r in item["ours"]:
        entry = by_family[family(r["name"])]
        entry[0] += r["seconds"]
        func = funcs.get(r["name"])
        entry[2] += 1
        entry[3] += int(func is not None and not func["ours"])
    for r in item["ort"]:
        by_family[family(r["op"])][1] += r["seconds"]
    print(_row(["op family", "ours ms", "ORT ms", "ours/ORT", "% of ours", "PrimFuncs (not ours)"]))
    print(_row(["---"] * 6))
    for name, (ours, ort, count, others) in sorted(by_family.items(), key=lambda kv: -kv[1][0]):
        ratio = f"{ours / ort:.1f}" if ort > 0 else "-"
        share = 100 * ours / ours_total if ours_total else 0
        cells = [name, f"{ours * 1e3:.2f}", f"{ort * 1e3:.2f}", ratio, f"{share:.1f}"]
        print(_row([*cells, f"{count} ({others})"]))
    print(f"\nTop {TOP} PrimFuncs")
    head = ["PrimFunc", "family", "calls", "ms", "%", "scheduled by", "vector", "parallel"]
    print(_row([*head, "buffers"]) + "\n" + _row(["---"] * (len(head) + 1)))
    for r in item["ours"][:TOP]:
        func = funcs.get(r["name"], {})
        by = func.get("scheduled_by", "-")
        label = f"{by} (TVM)" if by == "Reduction" else by
        print(
            _row(
                [r["name"][:72], family(r["name"]), r["calls"], f"{r['seconds'] * 1e3:.2f}"]
                + [f"{100 * r['seconds'] / ours_total:.1f}", label]
                + [_yes(func.get("vector")), _yes(func.get("parallel")), func.get("buffers", "")]
            )
        )
    print(f"\nTop {TOP} ORT op types")
    print(_row(["op type", "family", "nodes", "ms", "%"]) + "\n" + _row(["---"] * 5))
    for r in item["ort"][:TOP]:
        share = 100 * r["seconds"] / ort_total if ort_total else 0
        print(
            _row(
                [r["op"], family(r["op"]), r["nodes"], f"{r['seconds'] * 1e3:.2f}", f"{share:.1f}"]
            )
        )


def _yes(value: bool | None) -> str:
    return "-" if value is None else ("yes" if value else "no")


def _row(cells: list[Any]) -> str:
    return "| " + " | ".join(str(cell) for cell in cells) + " |"

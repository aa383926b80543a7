"""The table and chart of `scripts/bench.sh --scaling`.

usage: scaling_chart.py RESULTS.tsv CHART.png EVENTS

RESULTS.tsv has one row per run: axis (partitions or sources), partitions, sources, days, MB of
NDJSON, seconds from start to all committed, CPU seconds, peak RSS in kB, objects uploaded.
"""

import csv
import os
import sys

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402


def main(results, chart, events):
    rows = []
    with open(results) as f:
        for axis, partitions, sources, days, mb, seconds, cpu, rss_kb, objects in csv.reader(f, delimiter="\t"):
            mb, seconds, cpu = float(mb), float(seconds), float(cpu)
            rows.append({
                "axis": axis,
                "partitions": int(partitions),
                "sources": int(sources),
                "days": int(days),
                "files": int(partitions) * int(sources) * int(days),
                "mb_s": mb / seconds,
                "cpu": cpu,
                "cpu_gb": cpu / (mb / 1000),
                "rss_mb": float(rss_kb) / 1024,
                "objects": int(objects),
                "kb_object": mb * 1000 / max(int(objects), 1),
                "seconds": seconds,
            })

    print()
    print(f"kafka-s3-archiver scaling: {events} events per run, the archiver alone from start to all committed")
    header = (f"{'axis':<11} {'partitions':>10} {'sources x days':>15} {'open files':>10} {'seconds':>8} "
              f"{'MB/s':>7} {'CPU-s/GB':>9} {'peak RSS MB':>12} {'objects':>8} {'NDJSON KB/object':>17}")
    print(header)
    print("-" * len(header))
    for r in rows:
        print(f"{r['axis']:<11} {r['partitions']:>10} {str(r['sources']) + ' x ' + str(r['days']):>15} "
              f"{r['files']:>10} {r['seconds']:>8.2f} {r['mb_s']:>7.1f} {r['cpu_gb']:>9.1f} "
              f"{r['rss_mb']:>12.0f} {r['objects']:>8} {r['kb_object']:>17.1f}")

    # What each object costs: the CPU that the same events cost more when cut into more objects,
    # per extra object (the partitions axis, 1 against 64 per member, and the sources axis,
    # 10 against 1,000), and what that does to CPU per GB at 64 partitions against one.
    print()
    for axis, few, many in [("partitions", 1, 64), ("sources", 10, 1000)]:
        by_x = {r[axis]: r for r in rows if r["axis"] == axis}
        if few in by_x and many in by_x:
            a, b = by_x[few], by_x[many]
            per_object_ms = 1000 * (b["cpu"] - a["cpu"]) / max(b["objects"] - a["objects"], 1)
            print(f"cost per object ({axis} {few} against {many}): {per_object_ms:.2f} ms of archiver CPU "
                  f"(target <= 0.30); CPU per GB {b['cpu_gb'] / a['cpu_gb']:.2f} x"
                  + (" (target <= 2.00)" if axis == "partitions" else ""))
    if os.environ.get("PLAIN_PUT_MS"):
        print(f"a plain PUT of the widest run's objects (the SDK, same store, same run): "
              f"{float(os.environ['PLAIN_PUT_MS']):.2f} ms of CPU each; the archiver sends two requests "
              f"an object (a HEAD of its batch's manifest, then the PUT)")

    fig, axes = plt.subplots(3, 2, figsize=(10, 9), sharex="col")
    for column, (axis, xlabel, xkey) in enumerate([
        ("partitions", "partitions per member (100 sources x 2 days each)", "partitions"),
        ("sources", "open files per partition (sources x 1 day; 4 partitions)", "sources"),
    ]):
        series = [r for r in rows if r["axis"] == axis]
        xs = [r[xkey] for r in series]
        for row, (key, ylabel) in enumerate([
            ("mb_s", "MB/s, start to all committed"),
            ("cpu_gb", "CPU-s per GB"),
            ("rss_mb", "peak RSS, MB"),
        ]):
            ax = axes[row][column]
            ax.plot(xs, [r[key] for r in series], marker="o")
            ax.set_xscale("log")
            ax.set_xticks(xs)
            ax.set_xticklabels([str(x) for x in xs])
            ax.set_ylim(bottom=0)
            ax.set_ylabel(ylabel)
            ax.grid(True, alpha=0.3)
        axes[2][column].set_xlabel(xlabel)
    fig.suptitle(f"kafka-s3-archiver: how cost grows ({events} events per run, 2 cores)")
    fig.tight_layout()
    fig.savefig(chart, dpi=80)
    print(f"\nchart: {chart}")


if __name__ == "__main__":
    if len(sys.argv) != 4:
        sys.exit(__doc__)
    main(sys.argv[1], sys.argv[2], int(sys.argv[3]))

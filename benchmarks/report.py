#!/usr/bin/env python3
"""Collects the latest result of each benchmark script (benchmarks/results/<part>-<date>.md)
into benchmarks/results/<date>.md: machine, versions, the commands, a summary against the
targets, and three charts (SVG): throughput per workload and system, latency percentiles
against the offered rate, and window state at 1M actors. Run by benchmarks/run.sh."""
import argparse
import datetime
import glob
import os
import platform
import re
import subprocess
import textwrap

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

HERE = os.path.dirname(os.path.abspath(__file__))
RESULTS = os.path.join(HERE, "results")


def save(fig, name):
    """Writes the chart as SVG (linked from the results) and PNG (for viewers without SVG)."""
    for ext in ("svg", "png"):
        fig.savefig(os.path.join(RESULTS, f"{name}.{ext}"), dpi=110)
    plt.close(fig)


def latest(part):
    files = sorted(glob.glob(os.path.join(RESULTS, f"{part}-*.md")))
    return files[-1] if files else None


def read(path):
    return open(path).read() if path else ""


def num(text):
    return int(text.replace(" ", "").replace(",", ""))


def version(cmd):
    try:
        return subprocess.run(cmd, capture_output=True, text=True, check=False).stdout.strip().splitlines()[0]
    except (OSError, IndexError):
        return "unknown"


def main():
    a = argparse.ArgumentParser()
    a.add_argument("--started", required=True)
    a.add_argument("--commands", required=True)
    a.add_argument("--quick", action="store_true")
    args = a.parse_args()
    date = datetime.date.today().isoformat()
    files = {p: latest(p) for p in ("replay", "windows", "scaling", "state", "latency", "peers", "profile")}
    text = {p: read(f) for p, f in files.items()}

    throughput = []  # (label, events/s)
    m = re.search(r"^\| cloudtrail \| ([^|]+?) \|.*\| \*\*(\d+)\*\* \|", text["replay"], re.M)
    if m:
        throughput.append((f"cloudtrail replay\n({m.group(1)})", int(m.group(2))))
    for w, detectors, rate in re.findall(r"^\| (W1|W3|W3 distinct windows) \| ([^|]+?) \| (\d+) \|", text["scaling"], re.M):
        throughput.append((f"{w}\n{detectors.strip()} detector(s)", int(rate)))
    m = re.search(r"replay, keyed evaluator.*?\*\*(\d+) events/s\*\*", text["windows"])
    if m:
        throughput.append(("W2 replay", int(m.group(1))))
    m = re.search(r"keyed / naive evaluator \| (\d+) / (\d+) events/s", text["windows"])
    naive_ratio = None
    if m:
        throughput.append(("W2 naive\nevaluator", int(m.group(2))))
        naive_ratio = int(m.group(1)) / max(int(m.group(2)), 1)
    m_r = re.search(r"\| Rampart `rampart run` [^|]*\| (\d+) \|", text["peers"])
    m_q = re.search(r"\| Quix Streams [^|]*\| (\d+) \|", text["peers"])
    if m_r:
        throughput.append(("W2 Rampart\nvia Kafka", int(m_r.group(1))))
    if m_q:
        throughput.append(("W2 Quix\nStreams", int(m_q.group(1))))

    latency = {}  # system -> [(rate, p50, p99, p999)]
    for system, rate, p50, p99, p999 in re.findall(
            r"^\| (passthrough|rampart) \| (\d+) \| \d+ \| \d+ \| \d+ \| ([\d.]+) \| ([\d.]+) \| ([\d.]+) \|",
            text["latency"], re.M):
        latency.setdefault(system, []).append((int(rate), float(p50), float(p99), float(p999)))
    disk = re.search(r"\*\*(\d+) MB\*\*", text["windows"])
    rss = re.search(r"\*\*(\d+) MiB\*\*", text["windows"])
    # W4: (actors, MB on disk, MiB RSS, MiB of it the window state's, events/s) per row of
    # state.sh's table.
    w4 = [(int(n), int(d), int(r), int(w), int(e)) for n, d, r, w, e in re.findall(
        r"^\| (\d+) \| (\d+) MB \([^)]*\) \| (\d+) MiB \| \d+ MiB \| \*\*(\d+) MiB\*\* \| (\d+) \|",
        text["state"], re.M)]
    # Precision and recall against the injected bursts: (detector, system, injected, found, precision).
    scores = re.findall(r"^\| ([a-z-]+) \| ([A-Za-z ]+) \| (\d+) \| (\d+) \| [\d.]+ \| \d+ \| \d+ \| ([\d.-]+) \|",
                        text["peers"], re.M)

    charts = []
    if throughput:
        fig, ax = plt.subplots(figsize=(11, 5))
        labels, values = zip(*throughput)
        labels = [textwrap.fill(label.replace("\n", " "), 14) for label in labels]
        ax.bar(range(len(values)), values, color=["#3b6ea5" if "Quix" not in l and "naive" not in l else "#c0504d" for l in labels])
        ax.set_xticks(range(len(values)), labels, fontsize=8)
        ax.set_yscale("log")
        ax.set_ylabel("events/s (log scale)")
        ax.set_title(f"Throughput per workload and system ({date}, 2 vCPU)")
        for i, v in enumerate(values):
            ax.text(i, v, f"{v:,}", ha="center", va="bottom", fontsize=7)
        fig.tight_layout()
        save(fig, f"{date}-throughput")
        charts.append(("Throughput", f"{date}-throughput.svg"))
    if latency:
        fig, ax = plt.subplots(figsize=(7, 4.5))
        for system, rows in sorted(latency.items()):
            rows.sort()
            rates = [r[0] for r in rows]
            for i, (q, style) in enumerate((("p50", ":"), ("p99", "-"), ("p99.9", "--"))):
                ax.plot(rates, [r[1 + i] for r in rows], style, marker="o", label=f"{system} {q}")
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_xlabel("offered events/s")
        ax.set_ylabel("ms, intended send to decision consumed")
        ax.axhline(20, color="grey", lw=0.5)
        ax.set_title("Latency through Kafka (Tansu, loopback)")
        ax.legend(fontsize=7)
        fig.tight_layout()
        save(fig, f"{date}-latency")
        charts.append(("Latency", f"{date}-latency.svg"))
    if w4:
        fig, ax = plt.subplots(figsize=(6, 4))
        actors = [r[0] / 1e6 for r in w4]
        ax.plot(actors, [r[1] for r in w4], marker="o", label="on disk (MB)")
        ax.plot(actors, [r[2] for r in w4], marker="o", label="peak RSS of the replay (MiB)")
        ax.plot(actors, [r[3] for r in w4], marker="o", label="of it the window state (MiB)")
        ax.plot(actors, [200 * a for a in actors], ":", color="grey", label="disk target (200 MB per M)")
        ax.plot(actors, [256 * a for a in actors], "--", color="grey", label="RSS target (256 MiB per M)")
        ax.set_xlabel("distinct actors (millions)")
        ax.set_title("W2 window state against actors")
        ax.legend(fontsize=7)
        fig.tight_layout()
        save(fig, f"{date}-state")
        charts.append(("State", f"{date}-state.svg"))
    elif disk and rss:
        fig, ax = plt.subplots(figsize=(5, 4))
        ax.bar([0, 1], [int(disk.group(1)), int(rss.group(1))], color="#3b6ea5")
        ax.bar([0, 1], [200, 256], fill=False, edgecolor="#c0504d", linestyle="--", label="target")
        ax.set_xticks([0, 1], ["on disk (MB)", "peak RSS (MiB)"])
        ax.set_title("W2 window state at 1M distinct actors")
        ax.legend()
        fig.tight_layout()
        save(fig, f"{date}-state")
        charts.append(("State", f"{date}-state.svg"))

    machine = [l for l in text["replay"].splitlines() + text["windows"].splitlines() if l.startswith("Machine:")]
    out = os.path.join(RESULTS, f"{date}.md")
    with open(out, "w") as f:
        f.write(f"# Benchmark suite, {date}{' (quick)' if args.quick else ''}\n\n")
        f.write((machine[0] if machine else f"Machine: {platform.processor()}, {os.cpu_count()} cores.") + "\n")
        f.write(f"Started {args.started}; rampart {version(['git', '-C', HERE, 'rev-parse', '--short', 'HEAD'])}, "
                f"{version(['rustc', '--version'])}, Python {platform.python_version()}.\n\n")
        f.write("Commands:\n\n```sh\n" + read(args.commands) + "```\n\n")
        f.write("| measure | result | target |\n| --- | --- | --- |\n")
        for label, value in throughput:
            f.write(f"| {label.replace(chr(10), ' ')} | {value:,} events/s | |\n")
        if naive_ratio:
            f.write(f"| W2 keyed / naive evaluator | {naive_ratio:.1f}x | at least 20x |\n")
        if m_r and m_q:
            f.write(f"| W2 Rampart / Quix Streams | {int(m_r.group(1)) / max(int(m_q.group(1)), 1):,.0f}x | at least 10x |\n")
        for n, d, r, w, e in w4:
            f.write(f"| W4 state at {n:,} actors | {d} MB on disk, {w} MiB resident ({r} MiB peak RSS of the replay), "
                    f"{e:,} events/s | {200 * n // 1000000} MB, {256 * n // 1000000} MiB |\n")
        for detector, system, injected, found, precision in scores:
            f.write(f"| W2 {detector}, {system}: injected bursts found | {found} of {injected}, precision {precision} | recall 1 |\n")
        if disk and rss and not w4:
            f.write(f"| W2 state at 1M actors | {disk.group(1)} MB on disk, {rss.group(1)} MiB peak RSS | 200 MB, 256 MiB |\n")
        for system, rows in sorted(latency.items()):
            for rate, p50, p99, p999 in sorted(rows):
                f.write(f"| {system} at {rate:,} events/s | p50 {p50:.0f} / p99 {p99:.0f} / p99.9 {p999:.0f} ms | p99 ≤ 20 ms at 50k |\n")
        f.write("\n")
        for title, svg in charts:
            f.write(f"![{title}]({svg})\n\n")
        f.write("Parts (each with its own details and profile notes):\n\n")
        for part, path in files.items():
            if path:
                f.write(f"- {part}: [{os.path.basename(path)}]({os.path.basename(path)})\n")
    print(open(out).read())


if __name__ == "__main__":
    main()

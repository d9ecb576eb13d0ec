"""The report: a JSON result, a Markdown table, and PNG plots (when matplotlib is installed)."""

from __future__ import annotations

import json
import logging
import textwrap
from pathlib import Path

log = logging.getLogger("loramux.bench")


def _clean(obj: object) -> object:
    """Drop the raw samples ('_' keys) that only the plots need."""
    if isinstance(obj, dict):
        return {k: _clean(v) for k, v in obj.items() if not str(k).startswith("_")}
    if isinstance(obj, list):
        return [_clean(v) for v in obj]
    return obj


def write_json(result: dict, path: Path) -> None:
    path.write_text(json.dumps(_clean(result), indent=1, default=str) + "\n")


def _ms(x: float | None) -> str:
    return "-" if x is None else f"{x * 1000:.1f}"


def _num(x: float | None, digits: int = 2) -> str:
    return "-" if x is None else f"{x:.{digits}f}"


def markdown(result: dict) -> str:
    m = result["machine"]
    lines = [
        "# loramux bench",
        "",
        f"Machine: {m['description']}. Model: {result['model']['description']}. "
        f"{result['rounds']} interleaved rounds per suite; ratios are medians of per-round ratios.",
        "",
    ]
    for name, suite in result["suites"].items():
        lines += [f"## {name}: {suite['title']}", ""]
        lines += [
            "| configuration | what | tokens/s | TTFT p50 / p99 (ms) | per-token p50 / p99 (ms) |",
            "| --- | --- | ---: | ---: | ---: |",
        ]
        for cname, c in suite["configs"].items():
            if c["status"] != "ok":
                lines.append(f"| {cname} | {c['description']} | unavailable: {c['reason']} | | |")
                continue
            s = c["summary"]
            lines.append(
                f"| {cname} | {c['description']} | {s['throughput_tok_s']:.1f} | "
                f"{_ms(s['ttft_p50_s'])} / {_ms(s['ttft_p99_s'])} | "
                f"{_ms(s['itl_p50_s'])} / {_ms(s['itl_p99_s'])} |"
            )
        lines += [
            "",
            "| ratio | value | per round | goal (floor) | met | issues |",
            "| --- | ---: | --- | --- | --- | --- |",
        ]
        for r in suite["ratios"]:
            lines.append(_ratio_row(r))
        for note in suite.get("notes", []):
            lines += ["", note]
        loads = suite.get("adapter_load_seconds")
        if loads:
            lines += [
                "",
                f"Adapter loads during the suite ({suite.get('device_slots')} device slots): "
                f"{loads['count']} loads, mean {_ms(loads['mean'])} ms, p50 {_ms(loads['p50'])} ms, "
                f"p90 {_ms(loads['p90'])} ms, p99 {_ms(loads['p99'])} ms (server histogram, "
                "interpolated within buckets).",
            ]
        lines.append("")
    if result.get("ranks"):
        from loramux.bench.ranks import markdown as ranks_markdown

        lines += ranks_markdown(result["ranks"])
    if result.get("plots"):
        lines += ["Plots: " + ", ".join(f"`{p}`" for p in result["plots"]), ""]
    return "\n".join(lines)


def _ratio_row(r: dict) -> str:
    sign = ">=" if r["higher_is_better"] else "<="
    goal = "-" if r["goal"] is None else f"{sign} {r['goal']:g}"
    if r["floor"] is not None and r["floor"] != r["goal"]:
        goal += f" ({sign} {r['floor']:g})"
    issues = ", ".join(f"#{i}" for i in r["issues"]) or "-"
    if r["status"] != "ok":
        return f"| {r['name']} | unavailable | {r['reason']} | {goal} | - | {issues} |"
    met = {True: "yes", False: "no", None: "-"}[r["meets_goal"]]
    if r["meets_goal"] is False and r["meets_floor"]:
        met = "floor only"
    rounds = ", ".join(f"{v:.2f}" for v in r["rounds"])
    return f"| {r['name']} | {r['value']:.2f} | {rounds} | {goal} | {met} | {issues} |"


def plot(result: dict, out: Path) -> list[str]:
    """PNG plots; none (and a log line) without matplotlib, which is the optional extra `plots`."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        log.info("matplotlib is not installed (pip install 'loramux[plots]'): no plots")
        return []
    written = []
    points = _throughput_points(result)
    if points:
        fig, ax = plt.subplots(figsize=(6, 4))
        xs, ys = zip(*points["adapters"]) if points["adapters"] else ((), ())
        ax.plot(xs, ys, "o-", label="loramux, mixed adapters")
        if points["base"]:
            ax.axhline(points["base"], linestyle="--", color="gray", label="loramux, base model only")
        ax.set_xscale("log")
        ax.set_xlabel("adapters in the workload (Zipf popularity)")
        ax.set_ylabel("generated tokens / s")
        ax.set_ylim(bottom=0)
        ax.set_title("\n".join(textwrap.wrap(points["title"], 70)), fontsize=9)
        ax.legend()
        fig.tight_layout()
        fig.savefig(out / "throughput_vs_adapters.png", dpi=100)
        plt.close(fig)
        written.append("throughput_vs_adapters.png")
    suite = result["suites"].get("mixed") or next(iter(result["suites"].values()), None)
    ok = {n: c for n, c in (suite or {}).get("configs", {}).items() if c["status"] == "ok"}
    if ok:
        fig, axes = plt.subplots(1, 2, figsize=(10, 4))
        for ax, key, label in (
            (axes[0], "ttft_s", "time to first token (s)"),
            (axes[1], "itl_s", "per-token latency (ms)"),
        ):
            scale = 1000.0 if key == "itl_s" else 1.0
            data = [[x * scale for x in c.get("_samples", {}).get(key, [])] or [0.0] for c in ok.values()]
            ax.boxplot(data, showfliers=False, whis=(1, 99))
            ax.set_xticks(range(1, len(ok) + 1), list(ok), rotation=30, ha="right", fontsize=8)
            ax.set_ylabel(label)
        fig.suptitle("latency distributions (whiskers: p1 and p99)", fontsize=9)
        fig.tight_layout()
        fig.savefig(out / "latency.png", dpi=100)
        plt.close(fig)
        written.append("latency.png")
    return written


def _throughput_points(result: dict) -> dict | None:
    suites = result["suites"]
    if "scale" in suites:
        cfgs = suites["scale"]["configs"]
        pts = sorted(
            (int(n[len("scale-n") :]), c["summary"]["throughput_tok_s"])
            for n, c in cfgs.items()
            if n.startswith("scale-n") and c["status"] == "ok"
        )
        base = cfgs.get("scale-base", {}).get("summary", {}).get("throughput_tok_s")
        return {"adapters": pts, "base": base, "title": suites["scale"]["title"]}
    if "mixed" in suites:
        cfgs = suites["mixed"]["configs"]
        mixed = cfgs["loramux-mixed"]
        pts = [(mixed["workload"]["adapters"], mixed["summary"]["throughput_tok_s"])] if mixed["status"] == "ok" else []
        base = cfgs["loramux-base"].get("summary", {}).get("throughput_tok_s")
        return {"adapters": pts, "base": base, "title": suites["mixed"]["title"]}
    return None

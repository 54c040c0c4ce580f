"""Run report: ``runs/<name>/report.html``, one offline page that indexes a pipeline run.

    python -m grpo_lib.report runs/embedded-default        # (grpo_lib.pipeline calls write_report at the end)

| section            | source                                                                          |
|--------------------|---------------------------------------------------------------------------------|
| notebooks          | the executed notebooks' HTML exports ``<run>/*.html`` (written by grpo_lib.pipeline), linked |
| headline table     | ``<run>/summary.json`` ["test"] (and ["unseen"]): per requested count N, exact-count accuracy k/m per stage (base -> cold start -> GRPO) with its Wilson 95 % interval |
| quality guard      | ``summary.json`` ["test_quality_guard"]: worst relative drop vs the stage's start and vs the base, pass / fail |
| plots              | ``<run>/grpo/*.png``, embedded as base64 thumbnails (the page opens offline, alone) |
| timings            | ``<run>/timings.json`` (seconds and peak memory per stage)                      |

Stages are read from the ``<stage>_accuracy`` keys in the records' order; ``count == "all"`` pools every image.
A run that has not reached notebook 02 yet gets the page without the table (it says so).
"""
from __future__ import annotations

import argparse
import base64
import html
import json
import sys
from pathlib import Path

STAGE_NAMES = {"base": "base", "cold_start": "cold start", "grpo": "GRPO"}


def _stages(records: list[dict]) -> list[str]:
    stages: list[str] = []
    for r in records:
        for k in r:
            if k.endswith("_accuracy") and k[: -len("_accuracy")] not in stages:
                stages.append(k[: -len("_accuracy")])
    return stages


def _fmt(r: dict, s: str) -> str:
    acc = r.get(f"{s}_accuracy")
    if acc is None:
        return "&ndash;"
    lo, hi, n = r.get(f"{s}_ci_low"), r.get(f"{s}_ci_high"), r.get(f"{s}_n")
    ci = f" <small>[{lo:.3f}, {hi:.3f}]</small>" if lo is not None and hi is not None else ""
    return f"{acc:.3f}{ci}" + (f" <small>n={int(n)}</small>" if n is not None else "")


def accuracy_table_html(records: list[dict], caption: str) -> str:
    """HTML table: one row per count, one column per stage, ``accuracy [ci_low, ci_high]``; the best
    stage of each row in bold."""
    if not isinstance(records, list) or not all(isinstance(r, dict) and "count" in r for r in records):
        raise ValueError(f"{caption}: expected a list of records with a 'count' key, got {str(records)[:120]}")
    stages = _stages(records)
    if not stages:
        raise ValueError(f"{caption}: records hold no '<stage>_accuracy' key; keys: {sorted(records[0]) if records else []}")
    head = "".join(f"<th>{html.escape(STAGE_NAMES.get(s, s))}</th>" for s in stages)
    rows = []
    for r in records:
        accs = [r.get(f"{s}_accuracy") for s in stages]
        best = max((a for a in accs if a is not None), default=None)
        cells = "".join((f"<td><b>{_fmt(r, s)}</b></td>" if a is not None and a == best and len(stages) > 1
                         else f"<td>{_fmt(r, s)}</td>") for s, a in zip(stages, accs))
        cls = ' class="all"' if r["count"] == "all" else ""
        rows.append(f"<tr{cls}><td>{html.escape(str(r['count']))}</td>{cells}</tr>")
    return (f"<table><caption>{html.escape(caption)}</caption><tr><th>N</th>{head}</tr>"
            + "".join(rows) + "</table>")


def _verdict(ok: bool) -> str:
    return f"<span class=\"{'ok' if ok else 'bad'}\">{'pass' if ok else 'FAIL'}</span>"


def _guard_html(guard: list[dict]) -> str:
    rows = []
    for g in guard:
        if "guard_pass" not in g or g.get("guard_pass") is None:
            continue
        drop = g.get("worst_drop_vs_start")
        if drop is None:
            continue
        ok = bool(g["guard_pass"])
        line = (f"{html.escape(STAGE_NAMES.get(g.get('stage'), str(g.get('stage'))))}: worst quality drop vs "
                f"its start {drop:.1%} &rarr; {_verdict(ok)}")
        base_drop = g.get("worst_drop_vs_base")
        if base_drop is not None and g.get("guard_pass_vs_base") is not None and g.get("stage") != "base":
            line += f"; vs the base {base_drop:.1%} &rarr; {_verdict(bool(g['guard_pass_vs_base']))}"
        rows.append(f"<li>{line}</li>")
    return f"<ul>{''.join(rows)}</ul>" if rows else ""


def _class_interval(r: dict) -> str:
    """The class-clustered interval of a paired row, or a dash (older summaries, or a single class)."""
    lo, hi = r.get("class_ci_low"), r.get("class_ci_high")
    if lo is None or hi is None or lo != lo or hi != hi:                       # absent or NaN
        return "&ndash;"
    return f"[{100 * lo:+.1f}, {100 * hi:+.1f}] <small>({int(r['classes'])} classes)</small>"


def _paired_html(paired: list[dict]) -> str:
    """Stage-to-stage change on the same images (summary.json: test_paired), with the interval over images (these
    prompts, other noise) and the class-clustered one (other colour-shape classes like these)."""
    rows = "".join(
        f"<tr><td>{html.escape(str(r['change']))}</td><td>{100 * r['diff']:+.1f} pp "
        f"<small>[{100 * r['ci_low']:+.1f}, {100 * r['ci_high']:+.1f}]</small></td><td>{_class_interval(r)}</td>"
        f"<td>{r['gained']} / {r['lost']}</td><td>{r['p_value']:.2g}</td></tr>" for r in paired)
    return ("<h3>Paired change (same prompts and noise)</h3><table><tr><th>change</th><th>difference [95 %, over "
            "images]</th><th>[95 %, over classes]</th>"
            f"<th>images gained / lost</th><th>McNemar p</th></tr>{rows}</table>") if rows else ""


def _thumb(png: Path, run_dir: Path) -> str:
    data = base64.b64encode(png.read_bytes()).decode("ascii")
    name = html.escape(png.relative_to(run_dir).as_posix())
    return (f'<figure><img src="data:image/png;base64,{data}" alt="{name}" title="{name}">'
            f"<figcaption>{name}</figcaption></figure>")


CSS = """body{font-family:sans-serif;max-width:1100px;margin:1em auto;color:#222}
table{border-collapse:collapse;margin:.6em 0}td,th{border:1px solid #ccc;padding:3px 8px;text-align:right}
caption{text-align:left;font-weight:bold;padding:4px 0}tr.all{background:#eef}
figure{display:inline-block;margin:4px;vertical-align:top}figure img{width:260px;border:1px solid #ddd}
figcaption{font-size:small;color:#555}.ok{color:green}.bad{color:crimson}small{color:#666}"""


def build_report(run_dir: str | Path) -> str:
    """The page's HTML for ``run_dir`` (a pipeline run directory)."""
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise ValueError(f"run_dir={str(run_dir)!r} is not a directory; expected a run dir like runs/<name>")
    parts = [f"<h1>Run <code>{html.escape(run_dir.name)}</code></h1>"]

    pages = sorted(p for p in run_dir.glob("*.html") if p.name != "report.html")
    parts.append("<h2>Notebooks</h2>")
    if pages:
        items = []
        for p in pages:
            nb = p.with_suffix(".ipynb")
            extra = f' (<a href="{html.escape(nb.name)}">ipynb</a>)' if nb.is_file() else ""
            items.append(f'<li><a href="{html.escape(p.name)}">{html.escape(p.stem)}</a>{extra}</li>')
        parts.append(f"<ul>{''.join(items)}</ul>")
    else:
        parts.append("<p>No executed notebook exports (<code>*.html</code>) in this run yet.</p>")

    summary_path = run_dir / "summary.json"
    parts.append("<h2>Exact-count accuracy: base &rarr; cold start &rarr; GRPO</h2>")
    if summary_path.is_file():
        try:
            summary = json.loads(summary_path.read_text())
        except json.JSONDecodeError as e:
            raise ValueError(f"{summary_path} is not valid JSON ({e.msg})") from None
        if "test" not in summary:
            raise ValueError(f"{summary_path} has no 'test' records; keys: {sorted(summary)}")
        parts.append("<p>Accuracy = share of images whose detector count equals the requested count N (GenEval's "
                      "strict rule); [95 % Wilson interval]; n = images; best stage per row in bold.</p>")
        parts.append(accuracy_table_html(summary["test"], "held-out prompts (summary.json: test)"))
        parts.append(_paired_html(summary.get("test_paired", [])))
        if "unseen" in summary:
            parts.append(accuracy_table_html(summary["unseen"], "unseen counts (summary.json: unseen)"))
        parts.append(_guard_html(summary.get("test_quality_guard", [])))
        if summary.get("best_checkpoint"):
            ck = str(summary["best_checkpoint"])
            kept_start = Path(ck).name == "epoch_0000"     # keep_start: no trained epoch beat the start on val
            parts.append(f"<p>GRPO checkpoint evaluated: <code>{html.escape(ck)}</code>"
                         + (" (the untrained start: no trained epoch beat it on val, so the RL stage equals its "
                            "cold start)" if kept_start else "") + "</p>")
    else:
        parts.append("<p>No <code>summary.json</code> yet (notebook 02 has not finished in this run).</p>")

    plots = sorted((run_dir / "grpo").glob("*.png"))
    parts.append("<h2>Plots</h2>")
    parts.append("".join(_thumb(p, run_dir) for p in plots) if plots else "<p>No plots under <code>grpo/</code> yet.</p>")

    timings = run_dir / "timings.json"
    if timings.is_file():
        t = json.loads(timings.read_text())
        peaks = t.pop("peak_memory_gib", {})
        parts.append("<h2>Timings</h2><table><tr><th>stage</th><th>seconds</th><th>peak memory (GiB, summed RSS)</th></tr>"
                     + "".join(f"<tr><td>{html.escape(k)}</td><td>{v}</td><td>{peaks.get(k, '')}</td></tr>"
                               for k, v in t.items()) + "</table>")
    return (f"<!doctype html><html><head><meta charset=\"utf-8\"><title>run {html.escape(run_dir.name)}</title>"
            f"<style>{CSS}</style></head><body>{''.join(parts)}</body></html>")


def write_report(run_dir: str | Path) -> Path:
    """Write ``run_dir/report.html``; returns its path."""
    path = Path(run_dir) / "report.html"
    path.write_text(build_report(run_dir), encoding="utf-8")
    return path


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("run_dir", help="a run directory, e.g. runs/embedded-default")
    a = ap.parse_args(argv)
    try:
        print(write_report(a.run_dir))
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""report.html of a fake run dir: notebook links, the headline table from summary.json, embedded plots."""
import base64
import json
import re

import numpy as np
import pytest

from grpo_lib.report import build_report, main, write_report


def _png(path, colour):
    from PIL import Image
    Image.fromarray(np.full((8, 8, 3), colour, np.uint8)).save(path)
    return path.read_bytes()


def _rec(count, base, cs, grpo, n=10):
    r = {"count": count}
    for s, (k, lo, hi) in (("base", base), ("cold_start", cs), ("grpo", grpo)):
        r.update({f"{s}_n": n, f"{s}_accuracy": k / n, f"{s}_ci_low": lo, f"{s}_ci_high": hi})
    return r


@pytest.fixture
def fake_run(tmp_path):
    run = tmp_path / "runs" / "demo"
    (run / "grpo").mkdir(parents=True)
    for nb in ("00_derivation_checks", "02_counting_grpo"):
        (run / f"{nb}.html").write_text("<html></html>")
        (run / f"{nb}.ipynb").write_text("{}")
    summary = {"params": {}, "best_checkpoint": "runs/demo/checkpoints/epoch_0007",
               "test": [_rec(2, (5, 0.237, 0.763), (7, 0.397, 0.892), (9, 0.596, 0.982)),
                        _rec(7, (1, 0.018, 0.404), (2, 0.057, 0.510), (2, 0.057, 0.510)),
                        _rec("all", (6, 0.1, 0.5), (9, 0.2, 0.6), (11, 0.3, 0.7), n=20)],
               "test_quality_guard": [{"stage": "base", "guard_pass": True, "worst_drop_vs_start": 0.0},
                                      {"stage": "grpo", "guard_pass": False, "worst_drop_vs_start": 0.083,
                                       "guard_pass_vs_base": False, "worst_drop_vs_base": 0.121}]}
    summary["test_paired"] = [{"change": "cold_start -> grpo", "n": 20, "diff": 0.034, "ci_low": 0.0163,
                               "ci_high": 0.0514, "gained": 5, "lost": 1, "p_value": 0.21875},       # an older summary
                              {"change": "base -> cold_start", "n": 20, "diff": 0.1, "ci_low": 0.05, "ci_high": 0.15,
                               "class_ci_low": -0.021, "class_ci_high": 0.221, "classes": 3, "gained": 4,
                               "lost": 2, "p_value": 0.6875}]
    (run / "summary.json").write_text(json.dumps(summary))
    pngs = {"accuracy_test.png": _png(run / "grpo" / "accuracy_test.png", 10),
            "curves.png": _png(run / "grpo" / "curves.png", 200)}
    (run / "timings.json").write_text(json.dumps({"00_derivation_checks": 12.5,
                                                  "peak_memory_gib": {"00_derivation_checks": 1.23}}))
    return run, pngs


def test_report_links_notebooks_tabulates_stages_and_embeds_plots(fake_run):
    run, pngs = fake_run
    path = write_report(run)
    assert path == run / "report.html"
    page = path.read_text()
    assert '<a href="00_derivation_checks.html">00_derivation_checks</a>' in page
    assert '<a href="02_counting_grpo.ipynb">ipynb</a>' in page
    assert 'href="report.html"' not in page                      # the page does not list itself
    assert "<th>N</th><th>base</th><th>cold start</th><th>GRPO</th>" in page
    # count 2: 0.5 -> 0.7 -> 0.9 with intervals; the best (GRPO) in bold
    row2 = re.search(r"<tr><td>2</td>(.*?)</tr>", page).group(1)
    assert row2 == ("<td>0.500 <small>[0.237, 0.763]</small> <small>n=10</small></td>"
                    "<td>0.700 <small>[0.397, 0.892]</small> <small>n=10</small></td>"
                    "<td><b>0.900 <small>[0.596, 0.982]</small> <small>n=10</small></b></td>")
    assert "<tr><td>00_derivation_checks</td><td>12.5</td><td>1.23</td></tr>" in page   # seconds, GiB
    assert ("<tr><td>cold_start -&gt; grpo</td><td>+3.4 pp <small>[+1.6, +5.1]</small></td><td>&ndash;</td>"
            "<td>5 / 1</td><td>0.22</td></tr>") in page
    assert ("<tr><td>base -&gt; cold_start</td><td>+10.0 pp <small>[+5.0, +15.0]</small></td>"
            "<td>[-2.1, +22.1] <small>(3 classes)</small></td><td>4 / 2</td><td>0.69</td></tr>") in page
    row7 = re.search(r"<tr><td>7</td>(.*?)</tr>", page).group(1)
    assert row7.count("<b>") == 2                                 # a tie: both best stages bold
    assert '<tr class="all"><td>all</td>' in page and "0.550 <small>[0.300, 0.700]</small> <small>n=20</small>" in page
    assert 'FAIL' in page and "8.3%" in page and "epoch_0007" in page
    assert 'vs the base 12.1% &rarr; <span class="bad">FAIL</span>' in page
    # plots embedded byte for byte, nothing fetched from disk or network
    embedded = re.findall(r'src="data:image/png;base64,([^"]+)"', page)
    assert sorted(base64.b64decode(e) for e in embedded) == sorted(pngs.values())
    assert not re.search(r'src="(?!data:)', page)
    assert "<td>00_derivation_checks</td><td>12.5</td>" in page
    assert "the untrained start" not in page


def test_report_says_when_the_rl_stage_kept_its_start(fake_run):
    run, _ = fake_run
    summary = json.loads((run / "summary.json").read_text())
    summary["best_checkpoint"] = "runs/demo/checkpoints/epoch_0000"      # keep_start: no epoch beat it on val
    (run / "summary.json").write_text(json.dumps(summary))
    page = write_report(run).read_text()
    assert ("<code>runs/demo/checkpoints/epoch_0000</code> (the untrained start: no trained epoch beat it on val, "
            "so the RL stage equals its cold start)") in page


def test_report_of_a_run_before_notebook_02_and_bad_input(tmp_path, capsys):
    run = tmp_path / "early"
    run.mkdir()
    page = build_report(run)
    assert "No <code>summary.json</code> yet" in page and "No plots" in page and "No executed notebook" in page
    with pytest.raises(ValueError, match="is not a directory"):
        build_report(tmp_path / "missing")
    (run / "summary.json").write_text(json.dumps({"unseen": []}))
    with pytest.raises(ValueError, match=r"has no 'test' records; keys: \['unseen'\]"):
        build_report(run)
    (run / "summary.json").write_text(json.dumps({"test": [{"count": 1, "acc": 0.5}]}))
    with pytest.raises(ValueError, match="no '<stage>_accuracy' key"):
        build_report(run)
    assert main([str(tmp_path / "missing")]) == 2
    assert "error: run_dir=" in capsys.readouterr().err

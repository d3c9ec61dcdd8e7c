"""facekd report: one self-contained HTML page from real run folders, checked as text and rendered by Chromium."""
from __future__ import annotations

import base64
import html
import io
import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from facekd.config import job_from_dict
from facekd.errors import ConfigError, DataError
from facekd.report import build_report, markdown_to_html, read_run, read_scalars

CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"


@pytest.fixture(scope="module")
def runs(tiny_data, tmp_path_factory):
    """A 4-step teacher evaluated at its end on val.bin, and a 2-step KD student of it without evaluation."""
    from facekd.train import Trainer

    root = tmp_path_factory.mktemp("report_runs")
    base = {
        "data": {"manifest": str(tiny_data / "shards"), "image_size": 32, "num_workers": 0, "shuffle_buffer": 16},
        "model": {"backbone": "iresnet18", "width": 0.125, "embedding_dim": 16},
        "head": {"s": 16.0, "m2": 0.2},
        "optim": {"lr": 0.05, "warmup_steps": 2},
    }
    teacher = job_from_dict({**base, "name": "teacher_<b>&", "eval": {"bins": [str(tiny_data / "data" / "val.bin")]},
                             "train": {"output_dir": str(root / "teacher"), "steps": 4, "batch_size": 8,
                                       "checkpoint_every": 2, "log_every": 1, "device": "cpu"}})
    Trainer(teacher, progress=False).fit()
    student = job_from_dict({**base, "name": "student_kd",
                             "distill": {"methods": {"kd": 1.0}, "teacher": str(root / "teacher")},
                             "train": {"output_dir": str(root / "student"), "steps": 2, "batch_size": 8,
                                       "checkpoint_every": 2, "log_every": 1, "device": "cpu"}})
    Trainer(student, progress=False).fit()
    return root / "teacher", root / "student"


def _images(page: str) -> list[bytes]:
    return [base64.b64decode(data) for data in re.findall(r'src="data:image/png;base64,([A-Za-z0-9+/=]+)"', page)]


def test_report_of_a_run_holds_its_spec_curves_and_evaluation(runs, tmp_path) -> None:
    teacher, _ = runs
    page = build_report([teacher], out=tmp_path / "report.html").read_text()

    # the job spec as stored, escaped (the name holds HTML characters)
    job = json.loads((teacher / "job.json").read_text())
    assert "teacher_&lt;b&gt;&amp;" in page and "teacher_<b>" not in page
    spec = re.search(r"<h3>Job spec</h3>\s*<pre>(.*?)</pre>", page, re.S).group(1)
    assert yaml.safe_load(html.unescape(spec)) == job

    # curves: a PNG per run drawn from the TensorBoard events, which hold the 4 logged steps
    scalars = read_scalars(teacher / "tensorboard")
    assert scalars["loss/label"][0] == [1, 2, 3, 4] and len(scalars["lr"][1]) == 4
    images = _images(page)
    assert images and all(image[:8] == b"\x89PNG\r\n\x1a\n" for image in images)
    from PIL import Image

    curves = Image.open(io.BytesIO(images[0]))
    assert curves.size[0] > 400 and len(curves.getcolors(1 << 20)) > 10

    # the end-of-run evaluation: every number of results.json in the table, and its ROC figure
    rows = json.loads((teacher / "eval" / "results.json").read_text())
    assert len(rows) == 1 and rows[0]["dataset"] == "val"
    for value in (f"{100 * rows[0]['accuracy']:.2f} ± {100 * rows[0]['std']:.2f}", f"{rows[0]['threshold']:.3f}",
                  f"{rows[0]['images_per_second']:.1f}"):
        assert f"<td>{value}</td>" in page
    roc = (teacher / "eval" / "roc.png").read_bytes()
    assert roc in images
    assert "step_000000002, step_000000004" in page
    assert 'class="missing"' not in page


def test_report_is_self_contained(runs, tmp_path) -> None:
    bench = tmp_path / "results" / "cpu-test"
    bench.mkdir(parents=True)
    shutil.copy(Path(__file__).parents[1] / "results" / "cpu-x86-64" / "partial_fc.md", bench)
    shutil.copy(Path(__file__).parents[1] / "results" / "cpu-x86-64" / "partial_fc.png", bench)
    result = subprocess.run([sys.executable, "-m", "facekd", "report", *map(str, runs), "--bench",
                             str(tmp_path / "results"), "--out", str(tmp_path / "report.html")],
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0 and result.stdout == f"report written to {tmp_path / 'report.html'}\n", result.stderr
    page = (tmp_path / "report.html").read_text()
    references = re.findall(r"""\s(?:src|href|action|poster|data|srcset)\s*=\s*["']?([^"'\s>]*)""", page, re.I)
    assert references and all(ref.startswith(("data:image/png;base64,", "#")) for ref in references), [
        ref[:60] for ref in references if not ref.startswith(("data:", "#"))]
    for forbidden in ("<script", "<link", "<iframe", "@import", "url(", "http://", "https://"):
        assert forbidden not in page.lower(), forbidden
    # the anchors lead somewhere
    targets = set(re.findall(r'id="([^"]+)"', page))
    assert {ref[1:] for ref in references if ref.startswith("#")} <= targets
    assert "<h2 id=\"benchmarks\">" in page and "<th>samples/s (global)</th>" in page


def test_comparison_puts_teacher_and_student_side_by_side(runs, tiny_data, tmp_path) -> None:
    teacher, student = runs
    page = build_report([teacher, student], out=tmp_path / "report.html").read_text()
    table = re.search(r'<h2 id="comparison">.*?<table>(.*?)</table>', page, re.S).group(1)
    header = re.findall(r"<th>(.*?)</th>", table)
    assert header[0] == "network" and header[-1] == "val (%)"
    body = [re.findall(r"<td>(.*?)</td>", row) for row in re.findall(r"<tr>(.*?)</tr>", table)[1:]]
    assert [len(row) for row in body] == [len(header)] * 2
    assert "teacher_&lt;b&gt;&amp;" in body[0][0] and body[0][1] == "teacher" and body[0][6] == "4"
    assert "student_kd" in body[1][0] and body[1][1] == "student of teacher_&lt;b&gt;&amp;" and body[1][5] == "kd × 1"
    rows = json.loads((teacher / "eval" / "results.json").read_text())
    assert body[0][-1] == f"{100 * rows[0]['accuracy']:.2f} ± {100 * rows[0]['std']:.2f}" and body[1][-1] == "n/a"
    # the student's last logged distillation loss, as TensorBoard holds it
    assert body[1][8] == f"{read_scalars(student / 'tensorboard')['loss/distill'][1][-1]:.4f}"
    # the student lacks an evaluation: said in its own section
    assert f"evaluation: no results.json or evaluation tables under {student / 'eval'}" in page

    # a facekd eval --bins folder fills the student's column and shows its own table and ROC
    from facekd.evaluation.suite import evaluate_suite

    suite_rows = evaluate_suite([teacher, student], [tiny_data / "data" / "val.bin"], out_dir=tmp_path / "suite",
                                device="cpu", progress=False)
    page = build_report([teacher, student], out=tmp_path / "report.html", eval_dirs=[tmp_path / "suite"]).read_text()
    table = re.search(r'<h2 id="comparison">.*?<table>(.*?)</table>', page, re.S).group(1)
    last = [re.findall(r"<td>(.*?)</td>", row)[-1] for row in re.findall(r"<tr>(.*?)</tr>", table)[1:]]
    assert last == [f"{100 * row['accuracy']:.2f} ± {100 * row['std']:.2f}" for row in suite_rows]
    assert "<h4>table.md</h4>" in page and (tmp_path / "suite" / "roc_val.png").read_bytes() in _images(page)
    assert "no results.json" not in page and page.count(f"Evaluated in {tmp_path / 'suite'} (see") == 2


def test_missing_parts_are_named_and_bad_paths_refused(runs, tmp_path) -> None:
    teacher, _ = runs
    bare = tmp_path / "bare"
    shutil.copytree(teacher / "checkpoints", bare / "checkpoints")
    record = read_run(bare)
    assert record.name == "bare" and record.checkpoints == ["step_000000002", "step_000000004"]
    assert [line.split(":")[0] for line in record.missing] == ["job spec", "training curves", "evaluation"]
    page = build_report([bare], out=tmp_path / "report.html").read_text()
    assert page.count('class="missing"') == 3 and f"no job.json in {bare}" in page
    (bare / "job.json").write_text('{"name": "cut sho')
    with pytest.raises(DataError, match=re.escape(f"{bare / 'job.json'}: not valid JSON (Unterminated string")):
        build_report([bare], out=tmp_path / "report.html")

    (tmp_path / "empty").mkdir()
    for path, reason in ((tmp_path / "empty", "no job.json, checkpoints/ or tensorboard/ in it"),
                         (tmp_path / "nowhere", "not a folder")):
        with pytest.raises(ConfigError, match=re.escape(f"{path}: not a run folder ({reason})")):
            build_report([teacher, path], out=tmp_path / "never.html")
    assert not (tmp_path / "never.html").exists()
    # on the command line: one line, exit status 2
    result = subprocess.run([sys.executable, "-m", "facekd", "report", str(teacher), str(tmp_path / "empty"),
                             "--out", str(tmp_path / "cli.html")], capture_output=True, text=True, timeout=120)
    assert result.returncode == 2 and result.stderr.strip().splitlines() == [
        f"facekd: error: {tmp_path / 'empty'}: not a run folder (no job.json, checkpoints/ or tensorboard/ in it)"]


def test_markdown_tables_headings_and_escaping() -> None:
    text = "# Title <x>\n\nLatest run & more\ntext.\n\n| a | b |\n| --- | :-: |\n| 1 | <i> |\n"
    assert markdown_to_html(text, heading_level=4).splitlines() == [
        "<h4>Title &lt;x&gt;</h4>", "<p>Latest run &amp; more text.</p>", '<div class="scroll"><table>',
        "<thead><tr><th>a</th><th>b</th></tr></thead>", "<tbody>", "<tr><td>1</td><td>&lt;i&gt;</td></tr>",
        "</tbody>", "</table></div>"]


# the page in a real browser


_PROBE = """<script>window.__failed=[];addEventListener('error',function(e){var t=e.target;
__failed.push(t&&t.tagName?t.tagName+' '+(t.src||t.href):'script error '+e.message)},true);
addEventListener('load',function(){var broken=[].filter.call(document.images,function(i){
return !(i.complete&&i.naturalWidth>0)}).map(function(i){return i.alt});document.body.setAttribute('data-probe',
JSON.stringify({failed:__failed,broken:broken,images:document.images.length,
fetched:performance.getEntriesByType('resource').map(function(r){return r.name})}))})</script>"""
"""Injected into a copy of the page only (the report itself has no script): records failed loads, undecodable
images and every resource the browser fetched, in an attribute --dump-dom shows."""


@pytest.mark.slow
def test_chromium_renders_the_report(runs, tmp_path) -> None:
    if not Path(CHROMIUM).is_file():
        pytest.skip("chromium is not installed (install.sh installs Debian's chromium when run as root)")
    report = build_report(runs, out=tmp_path / "report.html")
    probed = tmp_path / "probed.html"
    # the probe, and a control it must catch: an image whose file is not there
    control = '<img alt="probe control" src="not-there.png">'
    probed.write_text(report.read_text().replace("<head>\n", "<head>\n" + _PROBE + "\n", 1)
                      .replace("</body>", control + "</body>", 1))
    screenshot = tmp_path / "shot.png"
    result = subprocess.run(
        [CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
         "--disable-background-networking", "--disable-component-update", "--disable-sync",
         "--disable-dev-shm-usage",  # containers often give /dev/shm 64 MB, too little for the renderer
         f"--user-data-dir={tmp_path / 'profile'}", "--enable-logging=stderr", "--v=0", "--virtual-time-budget=5000",
         "--dump-dom", f"--screenshot={screenshot}", "--window-size=1280,2000", probed.as_uri()],
        capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-3000:]

    # the page parsed: its headings and tables are in the DOM, every image but the control decoded, nothing was fetched
    dom = result.stdout
    for heading in ('<h1>facekd report</h1>', '<h2 id="comparison">Comparison</h2>', "<h3>Job spec</h3>",
                    "<h3>Training curves</h3>", "<h4>Verification (results.json)</h4>"):
        assert heading in dom, heading
    assert dom.count("<table>") == report.read_text().count("<table>") >= 2
    probe = json.loads(html.unescape(re.search(r'data-probe="([^"]*)"', dom).group(1)))
    assert probe["failed"] == [f"IMG {(tmp_path / 'not-there.png').as_uri()}"], probe
    assert probe["broken"] == ["probe control"] and probe["fetched"] == [], probe
    assert probe["images"] - 1 == len(_images(report.read_text())) >= 3
    # no console message (the page has no script of its own) and no failed load in the browser's log
    log = [line for line in result.stderr.splitlines() if "CONSOLE" in line or "ERR_" in line]
    assert log == []

    # the screenshot shows a page, not a blank: many colours, and ink spread over the height
    from PIL import Image, ImageStat

    image = Image.open(screenshot).convert("RGB")
    assert image.size == (1280, 2000)
    assert len(image.getcolors(1 << 24)) > 50
    assert max(ImageStat.Stat(image).stddev) > 20
    bands = [image.crop((0, top, 1280, top + 250)) for top in range(0, 2000, 250)]
    assert sum(len(band.getcolors(1 << 24)) > 5 for band in bands) >= 6

"""``facekd report RUN_DIR...``: one self-contained HTML page about training runs, their evaluation and the benchmarks.

For each run folder the page shows the job spec the run stored (``job.json``, written by the trainer and by
``facekd import``, shown as YAML), its training curves read from ``tensorboard/`` (loss, learning rate, images/s),
its checkpoints, and the evaluation the trainer wrote at the end of the run (``eval/``). Folders that ``facekd eval
--out`` wrote (``--eval DIR``) and the benchmark results of ``facekd bench`` (``--bench results/``: one folder per
device holding ``<bench>.json``, ``.md`` and ``.png``) follow. With several runs a comparison comes first: teacher
and students side by side as rows, verification sets as columns (the papers' layout), and their curves overlaid.

The page is one file: figures are PNGs inside ``data:`` URIs, the style sheet is inline, there is no script and no
reference outside the file, so it can be mailed or archived as is. Every text taken from a file is escaped. A part a
folder lacks is left out with a line saying what was not found.
"""
from __future__ import annotations

import base64
import html
import io
import json
import logging
import math
import re
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Mapping, Sequence

import yaml

from facekd.data.convert import read_json
from facekd.errors import ConfigError

__all__ = ["RunRecord", "build_report", "markdown_to_html", "read_run", "read_scalars"]

CURVE_TAGS = ("loss/label", "loss/distill", "lr", "images_per_second")
"""The trainer's scalars (facekd.train), drawn in this order; other tags follow by name."""

_EVAL_TABLES = ("table.md", "identification.md")
"""Markdown tables ``facekd eval`` writes beside results.json (IJB writes ``IJBB.md`` / ``IJBC.md``, found by name)."""

_STYLE = """
body { font-family: system-ui, -apple-system, "Segoe UI", sans-serif; margin: 2em auto; max-width: 1200px;
       color: #1d2733; background: #ffffff; line-height: 1.4; padding: 0 1em; }
h1 { border-bottom: 3px solid #2f6fad; padding-bottom: .2em; }
h2 { border-bottom: 1px solid #c9d6e3; margin-top: 2.2em; color: #1f4e7a; }
h3 { color: #2f6fad; margin-top: 1.5em; }
h4 { margin-bottom: .3em; }
table { border-collapse: collapse; margin: .6em 0 1.2em; font-size: 90%; }
th, td { border: 1px solid #c9d6e3; padding: .25em .6em; text-align: left; }
th { background: #e8f0f8; }
tr:nth-child(even) td { background: #f6f9fc; }
pre { background: #f3f5f7; border: 1px solid #dde3ea; padding: .8em; overflow-x: auto; font-size: 85%; }
img { max-width: 100%; border: 1px solid #e3e8ee; margin: .4em 0; }
.missing { color: #8a5a00; background: #fff6e0; border-left: 4px solid #e0a800; padding: .3em .8em; }
.note { color: #55606b; font-size: 90%; }
nav ul { columns: 2; }
.scroll { overflow-x: auto; }
"""


@dataclass
class RunRecord:
    """What a run folder holds, as read for the report."""

    folder: Path
    name: str
    job: dict[str, Any] | None
    scalars: dict[str, tuple[list[int], list[float]]]
    checkpoints: list[str]
    eval_dir: Path | None
    missing: list[str] = field(default_factory=list)
    """One line per part that was not found (job spec, curves, checkpoints, evaluation)."""


def read_scalars(folder: str | Path) -> dict[str, tuple[list[int], list[float]]]:
    """Every scalar series of the TensorBoard event files in ``folder``: tag → (steps, values), one value per step.

    A resumed run appends a new event file; where two files hold one step the later value wins.
    """
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    # its reader logs at INFO when it reaches the end of each event file: not news for a finished run
    logging.getLogger("tensorboard").setLevel(logging.WARNING)
    accumulator = EventAccumulator(str(folder), size_guidance={"scalars": 0})  # 0: keep every point
    accumulator.Reload()
    series = {}
    for tag in accumulator.Tags()["scalars"]:
        by_step = {event.step: event.value for event in accumulator.Scalars(tag)}
        steps = sorted(by_step)
        series[tag] = (steps, [by_step[step] for step in steps])
    return series


def read_run(folder: str | Path) -> RunRecord:
    """Read a run folder (``facekd train``'s ``train.output_dir`` or ``facekd import``'s ``--out``).

    Raises ConfigError when ``folder`` is not one: it must be a folder holding ``job.json``, ``checkpoints/`` or
    ``tensorboard/``.
    """
    folder = _check_run_folder(folder)
    missing = []
    job = None
    if (folder / "job.json").is_file():
        job = read_json(folder / "job.json")
    else:
        missing.append(f"job spec: no job.json in {folder}")
    scalars: dict[str, tuple[list[int], list[float]]] = {}
    if (folder / "tensorboard").is_dir():
        scalars = read_scalars(folder / "tensorboard")
    if not scalars:
        missing.append(f"training curves: no TensorBoard scalars under {folder / 'tensorboard'}")
    checkpoint_dir = folder / "checkpoints"
    checkpoints = sorted(path.name for path in checkpoint_dir.glob("step_*") if (path / "index.json").is_file())
    if not checkpoints:
        missing.append(f"checkpoints: no finished checkpoint under {checkpoint_dir}")
    eval_dir = folder / "eval"
    if not _eval_files(eval_dir):
        missing.append(f"evaluation: no results.json or evaluation tables under {eval_dir}")
        eval_dir = None
    name = str(job["name"]) if job and "name" in job else folder.name
    return RunRecord(folder, name, job, scalars, checkpoints, eval_dir, missing)


def _check_run_folder(folder: str | Path) -> Path:
    folder = Path(folder)
    if not folder.is_dir() or not any((folder / part).exists() for part in ("job.json", "checkpoints", "tensorboard")):
        what = "not a folder" if not folder.is_dir() else "no job.json, checkpoints/ or tensorboard/ in it"
        raise ConfigError(f"{folder}: not a run folder ({what})")
    return folder


def build_report(
    runs: Sequence[str | Path],
    *,
    out: str | Path = "report.html",
    eval_dirs: Sequence[str | Path] = (),
    bench: str | Path | None = None,
    title: str = "facekd report",
) -> Path:
    """Write the report of ``runs`` (plus ``eval_dirs`` written by ``facekd eval --out`` and the benchmark results
    under ``bench``) to ``out``; returns its path. Raises ConfigError for a path that is not a run folder, an
    evaluation folder without results, or a benchmark root that is not a folder."""
    if not runs:
        raise ConfigError("facekd report needs at least one run folder")
    for folder in runs:  # every path checked before any is read
        _check_run_folder(folder)
    for folder in map(Path, eval_dirs):
        if not _eval_files(folder):
            raise ConfigError(f"--eval {folder}: no results.json or evaluation tables there (facekd eval --out writes "
                              "them)")
    if bench is not None and not Path(bench).is_dir():
        raise ConfigError(f"--bench {bench}: not a folder (facekd bench writes results/<device>/)")
    records = [read_run(folder) for folder in runs]

    body = [f"<h1>{_text(title)}</h1>",
            f'<p class="note">Written {time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())} by facekd report from '
            f"{len(records)} run folder(s).</p>", _contents(records, eval_dirs, bench)]
    if len(records) > 1:
        body.append(_comparison(records, [Path(folder) for folder in eval_dirs]))
    for index, record in enumerate(records):
        elsewhere = [Path(folder) for folder in eval_dirs
                     if any(_scores(row, record, records) for row in _verification_rows(Path(folder)))]
        body.append(_run_section(record, index, elsewhere))
    if eval_dirs:
        body.append('<h2 id="evaluation">Evaluation</h2>')
        for folder in map(Path, eval_dirs):
            body.append(f"<h3>{_text(folder)}</h3>")
            body.append(_eval_section(folder))
    if bench is not None:
        body.append(_bench_section(Path(bench)))

    page = ("<!DOCTYPE html>\n<html lang=\"en\">\n<head>\n<meta charset=\"utf-8\">\n"
            f"<title>{_text(title)}</title>\n<style>{_STYLE}</style>\n</head>\n<body>\n"
            + "\n".join(body) + "\n</body>\n</html>\n")
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(page, encoding="utf-8")
    return out


# sections


def _contents(records: Sequence[RunRecord], eval_dirs: Sequence[str | Path], bench: str | Path | None) -> str:
    items = ['<li><a href="#comparison">Comparison</a></li>'] if len(records) > 1 else []
    items += [f'<li><a href="#run-{index}">{_text(record.name)}</a> <span class="note">{_text(record.folder)}</span>'
              "</li>" for index, record in enumerate(records)]
    items += ['<li><a href="#evaluation">Evaluation</a></li>'] if eval_dirs else []
    items += ['<li><a href="#benchmarks">Benchmarks</a></li>'] if bench is not None else []
    return "<nav><ul>\n" + "\n".join(items) + "\n</ul></nav>"


def _comparison(records: Sequence[RunRecord], eval_dirs: Sequence[Path]) -> str:
    """Teacher and students side by side: what each is, its last losses, and its verification accuracy per set."""
    accuracy: dict[tuple[int, str], str] = {}
    datasets: list[str] = []
    shared = [row for folder in eval_dirs for row in _verification_rows(folder)]
    for index, record in enumerate(records):
        own = _verification_rows(record.eval_dir) if record.eval_dir else []
        for row in own + [row for row in shared if _scores(row, record, records)]:
            dataset = str(row.get("dataset", "?"))
            datasets += [dataset] if dataset not in datasets else []
            accuracy[index, dataset] = f"{100 * row['accuracy']:.2f} ± {100 * row['std']:.2f}"
    header = ["network", "role", "backbone", "width", "embedding", "distillation", "steps", "last label loss",
              "last distill loss"] + [f"{dataset} (%)" for dataset in datasets]
    names = {record.folder.resolve(): record.name for record in records}
    teachers = {Path(teacher).resolve() for record in records
                if (teacher := (record.job or {}).get("distill", {}).get("teacher"))}
    rows = []
    for index, record in enumerate(records):
        job = record.job or {}
        model, distill = job.get("model", {}), job.get("distill", {})
        methods = distill.get("methods") or {}
        teacher = distill.get("teacher")
        if teacher:
            role = f"student of {names.get(Path(teacher).resolve(), teacher)}"
        else:
            role = "teacher" if record.folder.resolve() in teachers else "no teacher"
        steps = record.scalars.get("loss/label", ([], []))[0]
        rows.append([f'<a href="#run-{index}">{_text(record.name)}</a>', _text(role),
                     _text(model.get("backbone", "n/a")), _text(model.get("width", "n/a")),
                     _text(model.get("embedding_dim", "n/a")),
                     _text(", ".join(f"{name} × {weight:g}" for name, weight in methods.items()) or "none"),
                     _text(steps[-1] if steps else "n/a"), _last(record, "loss/label"), _last(record, "loss/distill")]
                    + [_text(accuracy.get((index, dataset), "n/a")) for dataset in datasets])
    parts = ['<h2 id="comparison">Comparison</h2>',
             '<p class="note">Accuracy: 10-fold verification from each run\'s own end-of-run evaluation (eval/) or '
             "from the evaluation folders given, mean ± std over folds. Losses: the last logged window.</p>",
             _html_table(header, rows, escape=False)]
    tags = [tag for tag in _ordered_tags(set().union(*(record.scalars for record in records))) if tag != "lr"]
    if tags:
        parts.append(_image(_plot_curves([(record.name, record.scalars) for record in records], tags),
                            "training curves of every run"))
    return "\n".join(parts)


def _scores(row: Mapping[str, Any], record: RunRecord, records: Sequence[RunRecord]) -> bool:
    """Whether an evaluation row scored ``record``: its checkpoint lies in the run folder, or (rows of ``facekd eval
    --bin``, which name no checkpoint) its model is the run's job name and no other run has that name."""
    if "checkpoint" in row:
        checkpoint, folder = Path(str(row["checkpoint"])).resolve(), record.folder.resolve()
        return checkpoint == folder or folder in checkpoint.parents
    return row["model"] == record.name and sum(other.name == record.name for other in records) == 1


def _run_section(record: RunRecord, index: int, evaluated_in: Sequence[Path]) -> str:
    """A run's spec, curves, checkpoints and own evaluation; ``evaluated_in``: the --eval folders that scored it."""
    parts = [f'<h2 id="run-{index}">{_text(record.name)}</h2>', f'<p class="note">{_text(record.folder)}</p>']
    missing = [line for line in record.missing if not (evaluated_in and line.startswith("evaluation:"))]
    parts += [f'<p class="missing">{_text(line)}</p>' for line in missing]
    if evaluated_in:
        parts.append(f'<p>Evaluated in {_text(", ".join(map(str, evaluated_in)))} '
                     '(see <a href="#evaluation">Evaluation</a>).</p>')
    if record.job is not None:
        parts += ["<h3>Job spec</h3>", f"<pre>{_text(yaml.safe_dump(record.job, sort_keys=False))}</pre>"]
    if record.scalars:
        parts += ["<h3>Training curves</h3>",
                  _image(_plot_curves([(record.name, record.scalars)], _ordered_tags(record.scalars)),
                         f"training curves of {record.name}")]
    if record.checkpoints:
        parts += ["<h3>Checkpoints</h3>", f"<p>{_text(', '.join(record.checkpoints))} under "
                                          f"{_text(record.folder / 'checkpoints')}</p>"]
    if record.eval_dir is not None:
        parts += ["<h3>Evaluation at the end of training</h3>", _eval_section(record.eval_dir)]
    return "\n".join(parts)


def _eval_files(folder: Path) -> list[Path]:
    """The result files of an evaluation folder: results.json and the markdown tables."""
    if not folder.is_dir():
        return []
    names = ["results.json", *_EVAL_TABLES]
    found = [folder / name for name in names if (folder / name).is_file()]
    return found + sorted(path for path in folder.glob("IJB*.md") if path.is_file())


def _eval_section(folder: Path) -> str:
    """results.json as a table (accuracy ± std, threshold, TAR@FAR, images/s), the markdown tables ``facekd eval``
    wrote (one across networks, IJB, identification), and the ROC and CMC figures."""
    from facekd.eval import format_table

    parts = []
    rows = _verification_rows(folder)
    if rows:
        parts += ["<h4>Verification (results.json)</h4>", markdown_to_html(format_table(rows))]
    for path in _eval_files(folder):
        if path.suffix == ".md":
            parts += [f"<h4>{_text(path.name)}</h4>", markdown_to_html(path.read_text(), heading_level=5)]
    figures = sorted(folder.glob("roc*.png")) + sorted(folder.glob("cmc*.png"))
    parts += [_image(path.read_bytes(), f"{path.name} of {folder}") for path in figures]
    return "\n".join(parts) or f'<p class="missing">{_text(folder)}: no evaluation results found</p>'


def _verification_rows(folder: Path) -> list[dict[str, Any]]:
    """The rows of ``folder/results.json`` that are verification results, TAR@FAR keys back to numbers."""
    path = folder / "results.json"
    if not path.is_file():
        return []
    rows = read_json(path)
    if not isinstance(rows, list):
        return []
    keep = []
    for row in rows:
        if isinstance(row, dict) and all(key in row for key in ("model", "accuracy", "std", "threshold")):
            row = dict(row)
            row["tar_at_far"] = {float(target): _number(value) for target, value in row.get("tar_at_far", {}).items()}
            keep.append(row)
    return keep


def _bench_section(root: Path) -> str:
    """Every ``facekd bench`` result under ``root``: per device folder, each benchmark's table and chart."""
    parts = ['<h2 id="benchmarks">Benchmarks</h2>', f'<p class="note">{_text(root)}</p>']
    devices = sorted(path for path in root.iterdir() if path.is_dir())
    found = False
    for device in devices:
        benches = sorted({path.stem for path in device.iterdir() if path.suffix in (".json", ".md", ".png")})
        if not benches:
            continue
        found = True
        parts.append(f"<h3>{_text(device.name)}</h3>")
        for bench in benches:
            markdown, data, chart = (device / f"{bench}{suffix}" for suffix in (".md", ".json", ".png"))
            parts.append(f"<h4>{_text(bench)}</h4>")
            if markdown.is_file():
                parts.append(markdown_to_html(markdown.read_text(), heading_level=5))
            elif data.is_file():
                parts.append(_json_rows_table(read_json(data)))
            if chart.is_file():
                parts.append(_image(chart.read_bytes(), f"{bench} on {device.name}"))
    if not found:
        parts.append(f'<p class="missing">benchmarks: no &lt;bench&gt;.json, .md or .png under a device folder of '
                     f"{_text(root)}</p>")
    return "\n".join(parts)


def _json_rows_table(data: Any) -> str:
    """A benchmark JSON without its markdown (``{"run": ..., "rows": [...]}``) as a plain table of its rows."""
    rows = data.get("rows") if isinstance(data, dict) else data
    if not isinstance(rows, list) or not rows or not all(isinstance(row, dict) for row in rows):
        return '<p class="missing">no rows in this benchmark\'s JSON</p>'
    header = list(dict.fromkeys(key for row in rows for key in row))
    return _html_table(header, [[_cell(row.get(key, "")) for key in header] for row in rows])


# rendering helpers


def markdown_to_html(text: str, *, heading_level: int = 3) -> str:
    """The markdown facekd writes (``#`` headings, pipe tables, paragraphs) as escaped HTML.

    A ``#`` heading becomes ``<h{heading_level}>`` (deeper ones one level lower each); a table's second line (the
    ``---`` rule) is dropped; other lines form paragraphs, split at blank lines.
    """
    html_parts: list[str] = []
    paragraph: list[str] = []
    table: list[list[str]] = []

    def flush() -> None:
        if paragraph:
            html_parts.append(f"<p>{_text(' '.join(paragraph))}</p>")
            paragraph.clear()
        if table:
            html_parts.append(_html_table(table[0], table[1:]))
            table.clear()

    for line in text.splitlines():
        stripped = line.strip()
        heading = re.match(r"^(#{1,6})\s+(.*)$", stripped)
        if stripped.startswith("|"):
            if paragraph:
                flush()
            cells = [cell.strip() for cell in stripped.strip("|").split("|")]
            if not all(re.fullmatch(r":?-+:?", cell) for cell in cells):
                table.append(cells)
        elif heading:
            flush()
            level = min(6, heading_level + len(heading.group(1)) - 1)
            html_parts.append(f"<h{level}>{_text(heading.group(2))}</h{level}>")
        elif not stripped:
            flush()
        else:
            if table:
                flush()
            paragraph.append(stripped)
    flush()
    return "\n".join(html_parts)


def _html_table(header: Sequence[Any], rows: Iterable[Sequence[Any]], *, escape: bool = True) -> str:
    """A table; cells are escaped unless ``escape`` is False (the caller escaped them)."""
    show = _text if escape else str
    head = "".join(f"<th>{show(cell)}</th>" for cell in header)
    body = "\n".join("<tr>" + "".join(f"<td>{show(cell)}</td>" for cell in row) + "</tr>" for row in rows)
    return f'<div class="scroll"><table>\n<thead><tr>{head}</tr></thead>\n<tbody>\n{body}\n</tbody>\n</table></div>'


def _plot_curves(series: Sequence[tuple[str, Mapping[str, tuple[list[int], list[float]]]]],
                 tags: Sequence[str]) -> bytes:
    """One panel per tag, one line per run; the PNG's bytes."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    columns = min(2, len(tags))
    rows = math.ceil(len(tags) / columns)
    figure = Figure(figsize=(5.2 * columns, 3.2 * rows), dpi=100)
    FigureCanvasAgg(figure)
    for index, tag in enumerate(tags):
        axes = figure.add_subplot(rows, columns, index + 1)
        for name, scalars in series:
            if tag in scalars:
                steps, values = scalars[tag]
                axes.plot(steps, values, label=name, marker="." if len(steps) < 30 else None)
        axes.set_title(tag)
        axes.set_xlabel("step")
        axes.grid(True, alpha=0.3)
        if len(series) > 1:
            axes.legend(fontsize="small")
    figure.tight_layout()
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png")
    return buffer.getvalue()


def _image(png: bytes, alt: str) -> str:
    """An ``<img>`` holding ``png`` as a data URI."""
    return f'<img alt="{_text(alt)}" src="data:image/png;base64,{base64.b64encode(png).decode("ascii")}">'


def _ordered_tags(tags: Iterable[str]) -> list[str]:
    tags = set(tags)
    return [tag for tag in CURVE_TAGS if tag in tags] + sorted(tags - set(CURVE_TAGS))


def _last(record: RunRecord, tag: str) -> str:
    values = record.scalars.get(tag, ([], []))[1]
    return f"{values[-1]:.4f}" if values else "n/a"


def _number(value: Any) -> float:
    return math.nan if value is None else float(value)


def _cell(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    if isinstance(value, (dict, list)):
        return json.dumps(value)
    return str(value)


def _text(value: Any) -> str:
    return html.escape(str(value), quote=True)

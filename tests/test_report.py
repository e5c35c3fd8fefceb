"""qatool report: the HTML page of a real train-quant run, downsampling of long runs, escaping, PNGs, errors."""

import json
import re
import shutil
import xml.etree.ElementTree as ET
from html.parser import HTMLParser

import numpy as np
import pytest
from click.testing import CliRunner
from PIL import Image

import qatool.cli
from qatool import api
from qatool.errors import DataError, UsageError
from qatool.eval.html_report import (MAX_POINTS, downsample_minmax, format_number, format_steps, nice_domain,
                                     read_metrics, ticks_within, write_report)
from qatool.cli_report import report_command
from qatool.train.config import TrainConfig

VOID = {"meta", "br", "hr", "img", "link", "input"}
SVG_NS = "{http://www.w3.org/2000/svg}"


@pytest.fixture(scope="module")
def run(lenet, digits, tmp_path_factory):
    """A 6-step QAT run of the sample LeNet on real digits: OUTDIR with report.json and metrics.jsonl."""
    out = tmp_path_factory.mktemp("run")
    api.train_quant(lenet, digits[0], out, val_data=digits[1], train=TrainConfig(steps=6), echo=lambda s: None,
                    quiet=True)
    return out


def copy_run(run, dst):
    dst.mkdir(parents=True, exist_ok=True)
    for name in ("report.json", "metrics.jsonl"):
        shutil.copy(run / name, dst / name)
    return dst


class StrictParser(HTMLParser):
    """Fails on a closing tag that does not close the innermost open element."""

    def __init__(self):
        super().__init__(convert_charrefs=True)
        self.stack = []

    def handle_starttag(self, tag, attrs):
        if tag not in VOID:
            self.stack.append(tag)

    def handle_startendtag(self, tag, attrs):
        pass

    def handle_endtag(self, tag):
        assert self.stack and self.stack[-1] == tag, f"</{tag}> closes <{self.stack[-1] if self.stack else None}>"
        self.stack.pop()


def parse_page(text: str) -> ET.Element:
    """The page must be balanced HTML and well-formed XML (so every SVG fragment is too)."""
    parser = StrictParser()
    parser.feed(text)
    parser.close()
    assert parser.stack == [], parser.stack
    return ET.fromstring(text.removeprefix("<!DOCTYPE html>"))


def svgs(root: ET.Element) -> list[ET.Element]:
    return [e for e in root.iter() if e.tag in ("svg", f"{SVG_NS}svg")]


def points_of(svg: ET.Element) -> list[int]:
    return [len(e.get("points").split()) for e in svg.iter() if e.tag.endswith(("polyline", "polygon"))]


def write_sensitivity(path, names):
    layers = [{"node": n, "op_type": "Conv", "params": 1000 * (i + 1), "sqnr_db": 15.0 + 7 * i, "top1": 0.9,
               "top1_drop": 0.02} for i, n in enumerate(names)]
    layers.append({"node": "exact", "op_type": "Gemm", "params": 10, "sqnr_db": float("inf"), "top1": None,
                   "top1_drop": None})
    path.write_text(json.dumps({"model": "m.onnx", "bits": 8, "float_top1": 0.97, "layers": layers}))
    return path


def test_page_shows_the_accuracies_and_one_svg_per_chart(run):
    (page,) = write_report(run)
    assert page == run / "report.html"
    text = page.read_text(encoding="utf-8")
    root = parse_page(text)
    val = json.loads((run / "report.json").read_text())["val"]
    for key in ("top1_float", "top1_qat", "top1_int8", "agreement_top1"):
        assert f"{val[key] * 100:.1f}%" in text, key
    charts = svgs(root)
    assert [c.get("aria-labelledby") for c in charts] == ["t-loss", "t-accuracy", "t-lr"]
    assert all(points_of(c) for c in charts)
    # 6 steps: BN freezes after 3, the observers after 4 (half and three quarters by default)
    assert "BN frozen" in text and "observers frozen" in text
    assert "QLinearConv" in text and "/conv1/Conv" in text  # fusion and placement
    assert "No sensitivity analysis" in text
    # self-contained: no script, no reference to anything outside the page
    assert "<script" not in text.lower()
    assert not re.search(r'\b(?:src|href)\s*=\s*"(?!#)', text)
    assert not re.search(r"url\((?!#)", text)


def test_long_run_is_downsampled(run, tmp_path):
    """100k steps: every line and band is at most MAX_POINTS points and the page stays small."""
    out = copy_run(run, tmp_path / "long")
    n = 100_000
    rng = np.random.default_rng(0)
    loss = 2.0 * np.exp(-np.arange(n) / 10_000) + rng.gamma(2, 0.05, n)
    lines = [json.dumps({"step": i + 1, "loss": round(float(loss[i]), 5), "acc": 0.9, "lr": 0.01 * (1 - i / n),
                         "ms": 1.0, "bn_frozen": i >= n // 2, "observers_frozen": i >= 3 * n // 4})
             for i in range(n)]
    (out / "metrics.jsonl").write_text("\n".join(lines) + "\n")
    (page,) = write_report(out)
    text = page.read_text(encoding="utf-8")
    charts = svgs(parse_page(text))
    assert len(charts) == 3
    counts = [c for svg in charts for c in points_of(svg)]
    assert counts and max(counts) <= MAX_POINTS, counts
    assert len(text.encode()) < 200_000, len(text)
    assert "100k" in text  # x ticks in thousands


def test_partial_last_line_is_skipped(run, tmp_path):
    out = copy_run(run, tmp_path / "cut")
    with open(out / "metrics.jsonl", "a") as f:
        f.write('{"step": 7, "loss": 0.1, "ac')
    (page,) = write_report(out)
    text = page.read_text(encoding="utf-8")
    parse_page(text)
    assert "1 unreadable line of metrics.jsonl skipped" in text


def test_resumed_steps_replace_the_earlier_ones(tmp_path):
    path = tmp_path / "metrics.jsonl"
    recs = [(s, 1.0) for s in (1, 2, 3, 4, 5)] + [(s, 2.0) for s in (4, 5, 6)]
    lines = [json.dumps({"step": s, "loss": v, "acc": 0.5, "lr": 0.1}) for s, v in recs]
    lines[2:2] = ["garbage", '{"step": 3, "loss": NaN}']  # unreadable or unusable lines in the middle
    path.write_text("\n".join(lines) + "\n")
    m = read_metrics(path, freeze_bn_after=4)
    assert m.bad_lines == 2
    assert m.step.tolist() == [1, 2, 3, 4, 5, 6]
    assert m.loss.tolist() == [1.0, 1.0, 1.0, 2.0, 2.0, 2.0]
    assert m.bn_frozen.tolist() == [False] * 4 + [True] * 2  # no flags in the file: from the freeze step


def test_sensitivity_chart_escapes_node_names(run, tmp_path):
    out = copy_run(run, tmp_path / "sens")
    weird = 'conv<1>&"x"'
    write_sensitivity(out / "sensitivity.json", [weird, "/layer2/Conv"])
    (page,) = write_report(out)
    text = page.read_text(encoding="utf-8")
    root = parse_page(text)
    assert weird not in text and "conv&lt;1&gt;&amp;&quot;x&quot;" in text
    charts = svgs(root)
    assert len(charts) == 4
    bars = charts[3]
    labels = ["".join(t.itertext()) for t in bars.iter() if t.tag == f"{SVG_NS}text"]
    assert f"1. {weird}" in labels  # unescaped again by the XML parser: the name survives intact
    assert sum(1 for e in bars.iter() if e.get("class") == "bar") == 3  # one bar per layer
    assert "∞ dB" in labels


def test_sensitivity_option_and_png_files(run, tmp_path):
    sens = write_sensitivity(tmp_path / "elsewhere.json", [f"/block{i}/Conv" for i in range(12)])
    written = write_report(run, output=tmp_path / "html" / "r.html", sensitivity=sens, png=True)
    names = [p.name for p in written]
    assert names == ["r.html", "loss.png", "accuracy.png", "sensitivity.png"]
    for p in written[1:]:
        assert p.parent == tmp_path / "html"
        with Image.open(p) as im:
            im.load()
            assert im.format == "PNG" and 800 <= im.width <= 2000 and 300 <= im.height <= 2000, (p, im.size)
            assert len(im.convert("RGB").getcolors(1 << 20)) > 50  # drawn, anti-aliased: not a blank image
    with Image.open(written[3]) as im:
        assert im.height > 13 * 20  # a row per layer


def test_cli_writes_the_page_and_names_the_files(run, tmp_path):
    out = copy_run(run, tmp_path / "cli")
    result = CliRunner().invoke(report_command, [str(out), "--png"])
    assert result.exit_code == 0, result.output
    assert re.search(r"wrote .*report\.html \(\d+\.\d KB\)", result.output)
    assert {p.name for p in out.iterdir()} >= {"report.html", "loss.png", "accuracy.png"}
    assert not list(out.glob(".*.tmp"))  # atomic writes leave no temporary file


def test_run_without_validation_data_or_steps(run, tmp_path):
    out = copy_run(run, tmp_path / "bare")
    report = json.loads((out / "report.json").read_text())
    report["val"] = {"top1_float": None, "top1_qat": None, "top1_int8": None, "agreement_top1": None}
    (out / "report.json").write_text(json.dumps(report))
    (out / "metrics.jsonl").write_text("")
    (page,) = write_report(out, png=True)
    text = page.read_text(encoding="utf-8")
    assert svgs(parse_page(text)) == []
    assert "No validation data" in text and "no complete step" in text


def test_errors(run, tmp_path):
    with pytest.raises(UsageError, match="no such folder"):
        write_report(tmp_path / "missing")
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match="no report.json"):
        write_report(tmp_path / "empty")
    out = copy_run(run, tmp_path / "nometrics")
    (out / "metrics.jsonl").unlink()
    with pytest.raises(DataError, match="no metrics.jsonl"):
        write_report(out)
    out = copy_run(run, tmp_path / "bad")
    (out / "report.json").write_text('{"steps": 6,')
    with pytest.raises(DataError, match="not valid JSON"):
        write_report(out)
    out = copy_run(run, tmp_path / "ok")
    with pytest.raises(UsageError, match="sensitivity file not found"):
        write_report(out, sensitivity=tmp_path / "nope.json")
    (tmp_path / "s.json").write_text('{"layers": 3}')
    with pytest.raises(DataError, match="no 'layers' list"):
        write_report(out, sensitivity=tmp_path / "s.json")
    with pytest.raises(UsageError, match="is a folder"):
        write_report(out, output=tmp_path)
    with pytest.raises(UsageError, match="would overwrite"):
        write_report(out, output=out / "report.json")
    assert not (out / "report.html").exists()


@pytest.mark.parametrize("args,code,match", [
    (["missing"], 2, "no such folder"),
    (["empty"], 1, "has no report.json"),
])
def test_cli_errors_are_one_line(capsys, monkeypatch, tmp_path, args, code, match):
    monkeypatch.setitem(qatool.cli.cli.commands, "report", report_command)
    (tmp_path / "empty").mkdir()
    with pytest.raises(SystemExit) as e:
        qatool.cli.main(["report", *[str(tmp_path / a) for a in args]])
    err = capsys.readouterr().err
    assert e.value.code == code, err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("qatool: error:") and match in lines[0], err


def test_nice_ticks_and_labels():
    assert nice_domain(0, 0.23) == (0.0, 0.25, [0.0, 0.05, 0.1, 0.15, 0.2, 0.25])
    assert nice_domain(96.9, 100) == (96.0, 100.0, [96.0, 97.0, 98.0, 99.0, 100.0])
    assert ticks_within(0, 100_000, 8, integer=True) == [0, 20_000, 40_000, 60_000, 80_000, 100_000]
    assert ticks_within(0, 6, 8, integer=True) == [0, 1, 2, 3, 4, 5, 6]
    assert [format_steps(v) for v in (0, 500, 2000, 25_000, 1_500_000)] == ["0", "500", "2000", "25k", "1.5M"]
    assert format_number(0.0005, 0.0005) == "0.0005" and format_number(2e-6, 2e-6) == "2e-6"
    assert format_number(1.2e-5, 2e-6) == "1.2e-5" and format_number(97.5, 0.5) == "97.5"
    lo, hi, ticks = nice_domain(3.0, 3.0)
    assert lo < 3.0 < hi and len(ticks) >= 2


def test_minmax_downsampling_keeps_the_extremes():
    rng = np.random.default_rng(1)
    y = rng.standard_normal(50_000)
    x = np.arange(len(y), dtype=float)
    xs, ys = downsample_minmax(x, y, 1000)
    assert len(ys) <= 1000 and np.all(np.diff(xs) > 0)
    assert ys.max() == y.max() and ys.min() == y.min()

"""stages/tokenizer_report/report.py: metrics.csv, report.md and report.html from a realistic metrics fixture.

The fixture (tests/fixtures/tokenizer_metrics.json) has 5 tokenizers x 2 corpora with three genre groups on the
Japanese corpus, and nulls where a real run has them (no morphemes on English, no kanji there).
Expected values below are computed from the fixture here, not taken from the module under test.
"""

from __future__ import annotations

import base64
import copy
import csv
import io
import json
import re
import warnings
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from pipeline import reportkit
from pipeline.errors import JpadaptError
from stages.tokenizer_report import report
from stages.tokenizer_report.report import write_report
from tests.helpers.browser import dump_dom, run_chromium
from tests.helpers.markdown import table_rows

FIXTURE = Path(__file__).parent / "fixtures" / "tokenizer_metrics.json"
IMG_RE = re.compile(r'<img src="data:image/png;base64,([A-Za-z0-9+/=]+)"([^>]*)>')


def load_fixture() -> dict:
    with FIXTURE.open(encoding="utf-8") as f:
        return json.load(f)


@pytest.fixture(scope="module")
def metrics() -> dict:
    return load_fixture()


@pytest.fixture(scope="module")
def written(metrics, tmp_path_factory) -> dict[str, Path]:
    out = tmp_path_factory.mktemp("report") / "nested" / "out"  # does not exist yet: write_report creates it
    paths = write_report(metrics, out)
    return {p.name: p for p in paths}


def expected_records(metrics: dict) -> list[tuple[tuple[str, str, str], dict]]:
    """(tokenizer, corpus, group) -> that record's metrics, walking the layout independently of the module."""
    out = []
    for tok, per_corpus in metrics["tokenizers"].items():
        for corpus, rec in per_corpus.items():
            out.append(((tok, corpus, ""), rec))
            for group, grec in (rec.get("groups") or {}).items():
                out.append(((tok, corpus, group), grec))
    return out


def read_csv(path: Path) -> tuple[list[str], list[dict[str, str]]]:
    with path.open(encoding="utf-8", newline="") as f:
        reader = csv.DictReader(f)
        return list(reader.fieldnames), list(reader)


def md_table(md: str, section: str, corpus: str) -> list[dict[str, str]]:
    """Rows of the first table under '## section' / '### corpus' in report.md, as dicts keyed by column title."""
    lines = md.splitlines()
    i = lines.index(f"## {section}")
    return table_rows(lines, lines.index(f"### {corpus}", i))


def decoded_images(html_text: str) -> list[tuple[Image.Image, str]]:
    images = []
    for payload, attrs in IMG_RE.findall(html_text):
        image = Image.open(io.BytesIO(base64.b64decode(payload, validate=True)))
        image.load()
        images.append((image, attrs))
    return images


# ------------------------------------------------------------------------------------------------------------
# Files and metrics.csv
# ------------------------------------------------------------------------------------------------------------

def test_writes_csv_md_and_html_into_a_new_folder(written):
    assert list(written) == ["metrics.csv", "report.md", "report.html"]
    for path in written.values():
        assert path.is_file() and path.stat().st_size > 1000, path


def test_csv_has_one_row_per_tokenizer_corpus_and_group(metrics, written):
    header, rows = read_csv(written["metrics.csv"])
    assert header[:3] == ["tokenizer", "corpus", "group"]
    got = [(r["tokenizer"], r["corpus"], r["group"]) for r in rows]
    want = [key for key, _ in expected_records(metrics)]
    assert got == want
    assert len(rows) == 5 * 2 + 5 * 3  # 5 tokenizers x 2 corpora, plus 3 genres of ja_heldout


def test_csv_round_trips_every_fixture_value_exactly(metrics, written):
    _, rows = read_csv(written["metrics.csv"])
    by_key = {(r["tokenizer"], r["corpus"], r["group"]): r for r in rows}
    checked_floats = 0
    for key, rec in expected_records(metrics):
        row = by_key[key]
        for name, value in rec.items():
            if name == "groups":
                continue
            if isinstance(value, dict):
                pairs = [(f"{name}_{sub}", v) for sub, v in value.items()]
            elif value is None and name == "morpheme_token_histogram":
                pairs = [(f"{name}_{b}", None) for b in report.HISTOGRAM_BINS]
            else:
                pairs = [(name, value)]
            for column, v in pairs:
                cell = row[column]
                if v is None:
                    assert cell == "", (key, column)
                elif isinstance(v, float):
                    assert float(cell) == v, (key, column, cell, v)  # exact: repr-precision
                    checked_floats += 1
                else:
                    assert int(cell) == v, (key, column)
    assert checked_floats > 500


def test_csv_columns_follow_the_layout_and_flatten_per_script_values(written):
    header, _ = read_csv(written["metrics.csv"])
    assert header[3:8] == ["documents", "chars", "bytes", "morphemes", "tokens"]
    scripts = ["hiragana", "katakana", "kanji", "latin", "digit", "other"]
    start = header.index("tokens_per_char_hiragana")
    assert header[start:start + 6] == [f"tokens_per_char_{s}" for s in scripts]
    assert header.index("boundary_f1") < start < header.index("kanji_distinct")
    assert header[-6:] == ["morpheme_token_histogram_8+", "uncovered_morphemes", "relative_tokens", "relative_compute",
                           "training_flops", "chars_per_context"]


def test_csv_keeps_an_unknown_metric_as_an_extra_last_column(metrics, tmp_path):
    m = copy.deepcopy(metrics)
    m["tokenizers"]["qwen"]["ja_heldout"]["zz_new_metric"] = 0.125
    header, rows = read_csv(write_report(m, tmp_path)[0])
    assert header[-1] == "zz_new_metric"
    cells = {(r["tokenizer"], r["corpus"], r["group"]): r["zz_new_metric"] for r in rows}
    assert cells.pop(("qwen", "ja_heldout", "")) == "0.125"
    assert set(cells.values()) == {""}


# ------------------------------------------------------------------------------------------------------------
# report.md
# ------------------------------------------------------------------------------------------------------------

def test_markdown_has_every_tokenizer_the_definitions_and_each_note(metrics, written):
    md = written["report.md"].read_text(encoding="utf-8")
    for name in metrics["tokenizers"]:
        assert f"| {name} " in md, name
    assert "\n## Definitions\n" in md and "\n## Notes\n" in md
    assert md.index("## Definitions") < md.index("## Notes")
    for note in metrics["notes"]:
        assert f"- {note}\n" in md, note
    definitions = md[md.index("## Definitions"):md.index("## Notes")]
    for phrase in ("no BOS/EOS", "len(text)", "UTF-8", "fugashi (unidic-lite)", "compared without whitespace",
                   "α = 2.5", "Zouhar et al. 2023", "6·N·D", "D = tokens"):
        assert phrase in definitions, phrase
    for column in ("chars_per_token", "byte_fallback_rate", "boundary_f1", "joyo_coverage", "renyi_efficiency",
                   "relative_compute", "chars_per_context", "roundtrip_failures"):
        assert f"`{column}`" in definitions or column in definitions, column


@pytest.mark.parametrize("key", ["tokenizer_library_versions", "library_versions"])
def test_markdown_lists_library_versions_under_either_settings_key(metrics, tmp_path, key):
    # The documented layout says tokenizer_library_versions; tokenizer.compare writes library_versions.
    m = copy.deepcopy(metrics)
    m["settings"].pop("tokenizer_library_versions")
    m["settings"][key] = {"sentencepiece": "0.2.3", "fugashi": "1.5.2"}
    md = write_report(m, tmp_path)[1].read_text(encoding="utf-8")
    assert "Libraries: sentencepiece 0.2.3, fugashi 1.5.2." in md


def test_markdown_headline_row_shows_the_fixture_numbers(metrics, written):
    md = written["report.md"].read_text(encoding="utf-8")
    rows = {r["tokenizer"]: r for r in md_table(md, "Tokens per corpus", "ja_heldout")}
    assert list(rows) == ["llama2 (baseline)", "mistral", "llama3", "qwen", "llm-jp"]
    rec = metrics["tokenizers"]["llm-jp"]["ja_heldout"]
    row = rows["llm-jp"]
    assert row["vocab"] == f"{rec['vocab_size']:,}"
    assert row["chars/token"] == f"{rec['chars_per_token']:.2f}" == "1.73"
    assert row["tokens (and compute) vs llama2"] == f"{rec['relative_tokens']:.2f}×"
    assert row["chars per 4,096-token context"] == f"{rec['chars_per_context']:,.0f}"
    assert row["tokens/morpheme"] == f"{rec['tokens_per_morpheme']:.2f}"
    assert row["boundary F1"] == f"{rec['boundary_f1']:.3f}"
    assert row["round-trip failures"] == str(rec["roundtrip_failures"])
    assert row["byte fallback"] == "<0.1%"  # 0.04%: small but not zero
    llama2 = metrics["tokenizers"]["llama2"]["ja_heldout"]
    assert rows["llama2 (baseline)"]["byte fallback"] == f"{100 * llama2['byte_fallback_rate']:.1f}%"


def test_markdown_summary_names_the_tokenizer_with_fewest_tokens(metrics, written):
    md = written["report.md"].read_text(encoding="utf-8")
    summary = md[md.index("## Summary"):md.index("## Tokens per corpus")]
    for corpus in metrics["corpora"]:
        per_tok = {t: metrics["tokenizers"][t][corpus] for t in metrics["tokenizers"]}
        best = max(per_tok, key=lambda t: per_tok[t]["chars_per_token"])
        assert f"{corpus}: {best} spends the fewest tokens ({per_tok[best]['chars_per_token']:.2f} chars/token" \
            in summary
    assert "llm-jp: 3 documents of ja_heldout do not round-trip" in summary


def test_markdown_and_html_have_the_same_tables(written):
    md = written["report.md"].read_text(encoding="utf-8")
    page = written["report.html"].read_text(encoding="utf-8")
    md_tables = sum(1 for line in md.splitlines() if line.startswith(("|:---", "|---")))
    assert md_tables >= 8
    assert page.count("<table>") == md_tables
    assert "<td>genre:legal</td>" in page and "| genre:legal |" in md


# ------------------------------------------------------------------------------------------------------------
# report.html
# ------------------------------------------------------------------------------------------------------------

def test_html_embeds_four_valid_png_plots_with_alt_text(written):
    page = written["report.html"].read_text(encoding="utf-8")
    images = decoded_images(page)
    assert len(images) == 4
    assert page.count("<img") == 4
    for image, attrs in images:
        assert image.format == "PNG"
        assert image.width >= 800 and image.height >= 400, image.size
        assert f'width="{image.width}" height="{image.height}"' in attrs
        pixels = np.asarray(image.convert("RGB")).reshape(-1, 3)
        assert len(np.unique(pixels, axis=0)) > 50  # a drawn plot, not a blank canvas
        alt = re.search(r'alt="([^"]*)"', attrs).group(1)
        assert len(alt) > 40 and "llm-jp" in alt


def test_html_is_self_contained(written):
    page = written["report.html"].read_text(encoding="utf-8")
    for forbidden in ("http://", "https://", "<link", "<script", "url(", "@import", "src=\"file:", "//cdn"):
        assert forbidden not in page, forbidden
    assert "<style>" in page


def test_html_escapes_notes_and_names(metrics, tmp_path):
    m = copy.deepcopy(metrics)
    m["notes"].append('<script>alert("x")</script> & <b>bold</b>')
    page = write_report(m, tmp_path)[2].read_text(encoding="utf-8")
    assert "<script>" not in page and "<b>bold</b>" not in page
    assert "&lt;script&gt;alert(&quot;x&quot;)&lt;/script&gt; &amp; &lt;b&gt;bold&lt;/b&gt;" in page
    # the fixture's own note carries '<0x20> pieces & NFKC'
    assert "&lt;0x20&gt; pieces &amp; NFKC" in page


def test_second_write_is_byte_identical(metrics, written, tmp_path):
    again = write_report(copy.deepcopy(metrics), tmp_path)
    for path in again:
        assert path.read_bytes() == written[path.name].read_bytes(), path.name


# ------------------------------------------------------------------------------------------------------------
# Nulls, odd names, bad input
# ------------------------------------------------------------------------------------------------------------

def test_null_metrics_render_as_a_dash_and_empty_cells(metrics, tmp_path):
    m = copy.deepcopy(metrics)
    ja = m["tokenizers"]["llm-jp"]["ja_heldout"]
    ja["boundary_f1"] = None
    ja["tokens_per_char"]["kanji"] = None
    ja["morpheme_token_histogram"] = None
    en = m["tokenizers"]["qwen"]["en_heldout"]
    for key in ("chars_per_token", "relative_tokens", "relative_compute", "chars_per_context", "tokens"):
        en[key] = None
    csv_path, md_path, html_path = write_report(m, tmp_path)

    md = md_path.read_text(encoding="utf-8")
    assert md_table(md, "Tokens per corpus", "ja_heldout")[-1]["boundary F1"] == "–"
    assert md_table(md, "Tokens per character by script", "ja_heldout")[-1]["kanji (37.1% of chars)"] == "–"
    qwen_en = md_table(md, "Tokens per corpus", "en_heldout")[3]
    assert qwen_en["tokenizer"] == "qwen"
    assert qwen_en["chars/token"] == qwen_en["tokens"] == qwen_en["tokens (and compute) vs llama2"] == "–"
    _, rows = read_csv(csv_path)
    row = next(r for r in rows if (r["tokenizer"], r["corpus"], r["group"]) == ("llm-jp", "ja_heldout", ""))
    assert row["boundary_f1"] == row["tokens_per_char_kanji"] == row["morpheme_token_histogram_8+"] == ""
    assert len(decoded_images(html_path.read_text(encoding="utf-8"))) == 4


def test_non_ascii_tokenizer_name_plots_without_missing_glyphs(metrics, tmp_path):
    m = json.loads(json.dumps(metrics, ensure_ascii=False).replace('"llm-jp"', '"日本語BPE"'))
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # matplotlib warns "Glyph ... missing from font(s)" when it draws tofu
        paths = write_report(m, tmp_path)
    page = paths[2].read_text(encoding="utf-8")
    assert "日本語BPE" in page and "| 日本語BPE " in paths[1].read_text(encoding="utf-8")
    assert len(decoded_images(page)) == 4


def test_plot_labels_fall_back_to_escapes_without_a_cjk_font(monkeypatch):
    monkeypatch.setattr(reportkit, "cjk_font", lambda: None)
    labels, families = reportkit.plot_labels(["llama2", "日本", "a$b"])
    assert families == ["DejaVu Sans"]
    assert labels == {"llama2": "llama2", "日本": "\\u65e5\\u672c", "a$b": "a\\$b"}
    monkeypatch.setattr(reportkit, "cjk_font", lambda: "Noto Sans CJK JP")
    labels, families = reportkit.plot_labels(["日本"])
    assert families == ["DejaVu Sans", "Noto Sans CJK JP"] and labels == {"日本": "日本"}


@pytest.mark.parametrize("mutate, message", [
    (lambda m: m.pop("tokenizers"), "no 'tokenizers' key"),
    (lambda m: m["tokenizers"].clear(), "nothing to report"),
    (lambda m: m["settings"].update(baseline="gpt2"), "'gpt2', which is not one of the tokenizers"),
    (lambda m: m["settings"].update(context_length=None), "context_length"),
    (lambda m: m["tokenizers"]["qwen"].update(ja_heldout=[1, 2]), "\\['qwen'\\]\\['ja_heldout'\\] must be a dict"),
])
def test_bad_layout_is_a_clear_error(metrics, tmp_path, mutate, message):
    m = copy.deepcopy(metrics)
    mutate(m)
    with pytest.raises(JpadaptError, match=message):
        write_report(m, tmp_path)
    assert not (tmp_path / "report.html").exists()


# ------------------------------------------------------------------------------------------------------------
# Headless browser
# ------------------------------------------------------------------------------------------------------------

def test_browser_loads_every_plot_and_logs_no_console_errors(written, tmp_path):
    result = dump_dom(written["report.html"], tmp_path / "profile")
    assert result.stdout.count("<img") == 4
    assert 'data-broken=""' not in result.stdout  # the attribute the images' onerror handler sets
    assert "CONSOLE" not in result.stderr, result.stderr


def test_browser_check_catches_a_broken_image(written, tmp_path):
    # The check above must be able to fail: corrupt one image and the onerror handler marks it.
    page = written["report.html"].read_text(encoding="utf-8")
    payload = IMG_RE.search(page).group(1)
    broken = tmp_path / "broken.html"
    broken.write_text(page.replace(payload, base64.b64encode(b"not a png").decode(), 1), encoding="utf-8")
    result = dump_dom(broken, tmp_path / "profile")
    assert result.stdout.count('data-broken=""') == 1


def test_browser_screenshot_shows_the_report(written, tmp_path):
    shot = tmp_path / "shot.png"
    run_chromium([f"--screenshot={shot}", "--window-size=1280,4000", written["report.html"].as_uri()],
                 tmp_path / "profile")
    pixels = np.asarray(Image.open(shot).convert("RGB")).astype(int)
    assert pixels.shape == (4000, 1280, 3)
    assert (pixels.min(axis=2) < 200).mean() > 0.02  # text, tables and plots, not a blank page
    # The first plot's ja_heldout bars (CORPUS_COLORS[0]) are on screen: the embedded PNG was decoded and drawn.
    target = np.array([int(report.CORPUS_COLORS[0][i:i + 2], 16) for i in (1, 3, 5)])
    assert (np.abs(pixels - target).max(axis=2) <= 6).sum() > 2000

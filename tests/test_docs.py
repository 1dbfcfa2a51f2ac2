"""The documentation: the method notes the code cites, the site's strict build, the figures, CITATION.cff."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from tests.scripts import load_script

ROOT = Path(__file__).resolve().parents[1]
METHOD_NOTES = ROOT / "docs" / "method.md"
FIGURES = ROOT / "docs" / "figures"

#: Where the project's code, tests, benchmarks and prose live (the method notes themselves aside).
CITING_FILES = sorted(
    path
    for folder in ("equicsp_core", "aiida_equicsp", "workchains", "tests", "benchmarks", "scripts", "examples")
    for pattern in ("*.py", "*.yaml", "*.md")
    for path in (ROOT / folder).rglob(pattern)
) + [ROOT / "README.md", ROOT / "BENCHMARKS.md"]


def method_sections() -> set[str]:
    """Section numbers of the method notes: ``"4"`` for ``## 4. …``, ``"4.5"`` for ``### 4.5 …``, and
    ``"10.3"`` for item 3 of a section that is a numbered list instead of subsections."""
    sections = set()
    for number, body in re.findall(r"^## (\d+)\. [^\n]*\n(.*?)(?=^## |\Z)", METHOD_NOTES.read_text(), re.M | re.S):
        subsections = re.findall(r"^### (\d+\.\d+) ", body, re.M)
        items = [f"{number}.{item}" for item in re.findall(r"^(\d+)\. ", body, re.M)]
        sections |= {number, *(subsections or items)}
    return sections


def numbered_properties() -> set[int]:
    """The numbered items of the section on properties the tests check (§11)."""
    section = METHOD_NOTES.read_text().split("\n## 11. ", 1)[1]
    return {int(n) for n in re.findall(r"^(\d+)\. ", section, re.M)}


def citations() -> list[tuple[Path, int, str]]:
    """Every line that cites the method notes: ``(file, line number, line)``."""
    found = []
    for path in CITING_FILES:
        for number, line in enumerate(path.read_text(errors="replace").splitlines(), 1):
            if "docs/method.md" in line or "method notes §" in line:
                found.append((path, number, line))
    return found


def test_code_cites_the_method_notes_not_the_external_spec():
    external = "METHOD" + ".md"  # spelled so that this file does not cite it
    offenders = [f"{p.relative_to(ROOT)}:{n}" for p in CITING_FILES
                 for n, line in enumerate(p.read_text(errors="replace").splitlines(), 1) if external in line]
    assert offenders == []
    assert len(citations()) >= 40  # the engine, the tests and the benchmarks cite the notes


def test_every_cited_section_exists():
    sections = method_sections()
    assert {"1.1", "3.2", "4.4", "4.5", "5.3", "6.3", "7.3", "7.4", "8.2", "10.1", "11"} <= sections
    missing = []
    for path, number, line in citations():
        cited = line.split("docs/method.md", 1)[-1]
        for first, last in re.findall(r"§(\d+(?:\.\d+)?)(?:–(\d+(?:\.\d+)?))?", cited):
            for section in filter(None, (first, last)):
                if section not in sections:
                    missing.append(f"{path.relative_to(ROOT)}:{number}: §{section}")
    assert missing == []


def test_every_cited_property_item_exists():
    items = numbered_properties()
    assert items == set(range(1, 15))
    cited = []
    for _, _, line in citations():
        for first, last in re.findall(r"items? (\d+)(?:–(\d+))?", line):
            cited += [int(first)] + ([int(last)] if last else [])
    assert cited and set(cited) <= items


@pytest.mark.slow
def test_docs_site_builds_in_strict_mode(tmp_path):
    """``mkdocs build --strict``: broken links, anchors, snippets or docstrings fail the build."""
    result = subprocess.run(
        [sys.executable, "-m", "mkdocs", "build", "--strict", "--site-dir", str(tmp_path / "site")],
        cwd=ROOT, capture_output=True, text=True, env={**os.environ, "NO_MKDOCS_2_WARNING": "1"},
        timeout=600,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    method = (tmp_path / "site" / "method" / "index.html").read_text()
    text = method[method.index("<article"):method.index("</article>")]
    untypeset = re.sub(r'<(span|div) class="arithmatex">.*?</\1>', "", text, flags=re.S)
    assert 'class="arithmatex"' in text and "$" not in untypeset  # every formula reaches MathJax
    api = (tmp_path / "site" / "api" / "equicsp_core" / "index.html").read_text()
    assert "com_free_direction" in api and "CrystalDiffusion" in api


def _figure_script():
    return load_script("docs/figures/make_figures.py")


@pytest.mark.parametrize("name", ["match_rate_vs_steps", "convergence"])
def test_figure_script_draws_from_the_recorded_results(tmp_path, name):
    path = getattr(_figure_script(), name)(tmp_path)
    assert path == tmp_path / f"{name}.png" and path.stat().st_size > 10_000


@pytest.mark.slow
def test_figure_script_draws_a_predicted_structure_next_to_the_known_one(tmp_path):
    """The shipped perov_5 model samples the fixture rows of the perov_5 test split (``EQUICSP_DATA_DIR``: the
    fixtures, 12 rows) and one of its samples matches closely enough to be drawn."""
    path = _figure_script().structure(tmp_path, rows=12)
    assert path == tmp_path / "structure.png" and path.stat().st_size > 10_000


def test_committed_figures_are_small_and_shown():
    shown = (ROOT / "README.md").read_text() + "".join(p.read_text() for p in (ROOT / "docs").glob("*.md"))
    pictures = sorted(FIGURES.glob("*.png"))
    assert {p.name for p in pictures} == {"match_rate_vs_steps.png", "convergence.png", "structure.png"}
    for picture in pictures:
        assert picture.stat().st_size < 200_000, picture.name
        assert f"figures/{picture.name}" in shown, picture.name


def test_citation_file_names_the_works_to_cite():
    citation = yaml.safe_load((ROOT / "CITATION.cff").read_text())
    assert citation["cff-version"] == "1.2.0" and citation["license"] == "MIT"
    titles = " | ".join(reference["title"] for reference in citation["references"])
    for work in ("Equivariant Diffusion for Crystal Structure Prediction", "Joint Equivariant Diffusion", "CHGNet",
                 "QUANTUM ESPRESSO", "Quantum ESPRESSO", "AiiDA 1.0", "Workflows in AiiDA"):
        assert work in titles

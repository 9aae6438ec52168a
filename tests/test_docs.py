"""The README is the newcomer's page (short, every relative link resolves, the real-model results and the
citation kept); the documentation site's nav and pages agree; no reference to a document the repository
lacks. The site itself is built by `.ci/run` (`mkdocs build --strict`)."""

from __future__ import annotations

import re
from pathlib import Path

from conftest import REPO_ROOT

README = REPO_ROOT / "README.md"
DOCS = REPO_ROOT / "docs"
MAX_README_LINES = 160  # aim: 150
# [text](target) and <img src="target">; anchors and web addresses are not files.
LINK = re.compile(r"\]\(([^)\s]+)\)|<img [^>]*src=\"([^\"]+)\"")


def relative_links(path: Path) -> list[str]:
    targets = [a or b for a, b in LINK.findall(path.read_text())]
    return [t for t in targets if not re.match(r"[a-z]+:|#", t)]


def test_readme_is_short():
    lines = README.read_text().splitlines()
    assert len(lines) <= MAX_README_LINES, f"README.md has {len(lines)} lines; move detail to docs/"


def test_relative_links_resolve():
    for page in [README, REPO_ROOT / "CHANGELOG.md", *sorted(DOCS.glob("*.md"))]:
        for target in relative_links(page):
            path = (page.parent / target.split("#")[0]).resolve()
            assert path.exists(), f"{page.relative_to(REPO_ROOT)}: link to {target}, which does not exist"


def test_readme_keeps_the_real_model_results_and_the_citation():
    text = README.read_text()
    for needle in ("python bench/cl_real.py", "| **sapt** (+ remedies) |", "| sapt_paper |", "| after | sapt: sst2 |",
                   "| inputs \\ block | sapt: sst2 |", "docs/img/routing_trace_sapt.png",
                   "docs/img/routing_trace_sapt_paper.png", "python -m pytest -q tests", "make demo", "2401.08295"):
        assert needle in text, f"README.md lost {needle!r}"
    for metric in ("AP", "F.Ra", "FWT", "BWT"):
        assert f"**{metric}**" in text, f"README.md does not define {metric}"


def test_every_page_is_in_the_nav():
    nav = set(re.findall(r"^\s+- [^:]+: (\S+\.md)\s*$", (REPO_ROOT / "mkdocs.yml").read_text(), flags=re.M))
    pages = {p.name for p in DOCS.glob("*.md")}
    assert nav == pages, f"in the nav, no page: {sorted(nav - pages)}; pages not in the nav: {sorted(pages - nav)}"


def test_no_reference_to_the_spec():
    # The method's reference lives in docs/; SPEC.md is not part of the repository.
    pattern = re.compile(r"\bSPEC (section )?\d")
    roots = ["src", "scripts", "tests", "bench", "docs"]
    files = [p for root in roots for p in (REPO_ROOT / root).rglob("*") if p.suffix in {".py", ".md", ".json", ".sh"}
             and "generated" not in p.parts]
    files += [REPO_ROOT / name for name in ("README.md", "CHANGELOG.md", "Makefile", "score.py",
                                            "CL_Benchmark/README.md", "generated_data/README.md")]
    files += sorted(REPO_ROOT.glob("gen_script_*.py"))
    hits = [f"{p.relative_to(REPO_ROOT)}:{n}" for p in files if p.is_file()
            for n, line in enumerate(p.read_text(errors="replace").splitlines(), 1) if pattern.search(line)]
    assert not hits, f"references to SPEC sections: {hits}"

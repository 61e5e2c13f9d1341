"""The front door and the manual: README.md is short and links every page of docs/; every relative link of both
resolves (file and heading); every import line of docs/api.md works as written."""
import os
import re

import pytest

from tests.helpers import REPO

DOCS = os.path.join(REPO, "docs")
PAGES = sorted(name for name in os.listdir(DOCS) if name.endswith(".md"))
LINK = re.compile(r"\[[^\]]*\]\(([^)#\s]*)(#[^)\s]*)?\)")


def read(path):
    with open(path, encoding="utf-8") as handle:
        return handle.read()


def anchors(text):
    """GitHub's heading anchors: lower case, punctuation but '-' and '_' dropped, spaces as '-'."""
    found = set()
    for line in text.splitlines():
        match = re.match(r"^#+ (.+)$", line)
        if match:
            title = re.sub(r"[^\w\- ]", "", match.group(1).strip().lower().replace("`", ""))
            found.add("#" + title.replace(" ", "-"))
    return found


def test_readme_is_a_short_front_door_that_links_every_page():
    readme = read(os.path.join(REPO, "README.md"))
    assert len(readme.splitlines()) <= 250
    for page in PAGES:
        assert f"(docs/{page})" in readme, f"docs/{page} is not linked from README.md"
    assert ".venv/bin/python -m pytest" in readme and '-m "not slow"' in readme


@pytest.mark.parametrize("document", ["README.md"] + [os.path.join("docs", page) for page in PAGES])
def test_every_relative_link_resolves(document):
    path = os.path.join(REPO, document)
    for target, anchor in LINK.findall(read(path)):
        if target.startswith(("http://", "https://", "mailto:")):
            continue
        resolved = os.path.normpath(os.path.join(os.path.dirname(path), target)) if target else path
        assert os.path.exists(resolved), f"{document}: link to {target} does not exist"
        if anchor and resolved.endswith(".md"):
            assert anchor in anchors(read(resolved)), f"{document}: no heading {anchor} in {target or document}"


def test_the_api_page_imports_work():
    text = read(os.path.join(DOCS, "api.md")).replace("\\\n", " ")  # continued lines joined
    statements = re.findall(r"^from [\w.]+ import [^#\n]*", text, flags=re.M)
    assert len(statements) > 10
    for statement in statements:
        exec(statement, {})  # noqa: S102 (the page's own lines)

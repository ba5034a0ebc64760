"""The marker grammar of tests/docs/doc_blocks.py: what it accepts, and that a block it cannot classify is an
error naming the file and line (never silently left out of the docs tests)."""

from __future__ import annotations

import pytest
from doc_blocks import MarkerError, indented_code_lines, read_blocks


def write(tmp_path, text: str):
    path = tmp_path / "doc.md"
    path.write_text(text)
    return path


def test_reads_each_kind(tmp_path):
    path = write(tmp_path, """# Doc

<!-- doc-test: run; --steps 300 => --steps 10 -->
```bash
nova train --steps 300
```

<!-- doc-test: serve -->
```bash
nova serve --port 8081
```

<!-- doc-test: file variants.yaml -->
```yaml
variants: []
```

<!-- doc-test: skip: needs a GPU; and real weights -->
```python
import torch
```
""")
    blocks = read_blocks(path)
    assert [(b.kind, b.language, b.line) for b in blocks] == [
        ("run", "bash", 4), ("serve", "bash", 9), ("file", "yaml", 14), ("skip", "python", 19)]
    assert blocks[0].replacements == (("--steps 300", "--steps 10"),)
    assert blocks[2].argument == "variants.yaml" and blocks[2].code == "variants: []\n"
    assert blocks[3].argument == "needs a GPU; and real weights"


@pytest.mark.parametrize("marker, message", [
    (None, "without a `<!-- doc-test"),
    ("<!-- doc-test: skip -->", "skip: REASON"),
    ("<!-- doc-test: skip:   -->", "skip: REASON"),
    ("<!-- doc-test: runs -->", "unknown doc-test kind 'runs'"),
    ("<!-- doc-test: file -->", "needs the file name"),
    ("<!-- doc-test: run; --steps 5 => --steps 1 -->", "does not occur in the block"),
    ("<!-- doc-test: run; --steps 300 -->", "OLD => NEW"),
])
def test_refuses_what_it_cannot_classify(tmp_path, marker, message):
    path = write(tmp_path, f"text\n{marker or ''}\n```bash\nnova train --steps 300\n```\n")
    with pytest.raises(MarkerError, match=r"doc\.md:3: ") as error:
        read_blocks(path)
    assert message in str(error.value)


def test_a_yaml_block_cannot_be_run(tmp_path):
    with pytest.raises(MarkerError, match="only bash or python"):
        read_blocks(write(tmp_path, "<!-- doc-test: run -->\n```yaml\na: 1\n```\n"))


def test_every_unmarked_block_is_named_at_once(tmp_path):
    with pytest.raises(MarkerError) as error:
        read_blocks(write(tmp_path, "```bash\nls\n```\n\n```python\npass\n```\n"))
    assert "doc.md:1:" in str(error.value) and "doc.md:5:" in str(error.value)


def test_finds_indented_code_outside_lists(tmp_path):
    path = write(tmp_path, "Run:\n\n    nova embed corpus.jsonl vectors/\n\n- a list item\n\n    its continuation\n")
    assert indented_code_lines(path) == [3]

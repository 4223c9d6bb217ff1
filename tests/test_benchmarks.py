"""The benchmarks' shared parts that a mistake would only show in RESULTS.md."""

import pytest

from benchmarks import common

pytestmark = pytest.mark.standalone

RESULTS = """# Measured results

## Model (`python benchmarks/model.py`)

### dinat-mini, 2026-11-24

| a | b |

## Pipeline (`python benchmarks/pipeline.py`)

Intro.

### pipeline, 2026-11-28

| c | d |


## GPU (`make bench-gpu`)

| e |
"""


def test_a_record_goes_at_the_end_of_its_own_section(tmp_path, monkeypatch):
    results = tmp_path / "RESULTS.md"
    results.write_text(RESULTS)
    monkeypatch.setattr(common, "RESULTS", results)
    common.record(["### pipeline, 2026-12-02", "", "| f | g |"], "Pipeline")
    common.record(["| h |"], "GPU")
    expected = RESULTS.replace(
        "| c | d |\n\n\n## GPU", "| c | d |\n\n### pipeline, 2026-12-02\n\n| f | g |\n\n\n## GPU"
    ).replace("| e |\n", "| e |\n\n| h |\n")
    assert results.read_text() == expected
    with pytest.raises(ValueError, match="no section headed '## Kernels'"):
        common.record(["x"], "Kernels")
    assert results.read_text() == expected

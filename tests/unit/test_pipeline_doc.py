"""docs/pipeline.md is generated from the code; it must not drift."""

from pathlib import Path

from sanderling import pipeline_doc

DOC = Path(__file__).resolve().parents[2] / "docs" / "pipeline.md"


def test_pipeline_doc_matches_the_code():
    assert DOC.read_text() == pipeline_doc.render(), "run `sanderling pipeline --doc > docs/pipeline.md`"


def test_doc_names_every_table_and_register():
    text = pipeline_doc.render()
    for name in ("Classifier", "SpoofGuard", "NeighborResponder", "L3Forwarding", "Output", "PORT_CLASS",
                 "TARGET_OFPORT", "FROM_POD"):
        assert name in text

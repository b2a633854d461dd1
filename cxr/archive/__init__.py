"""A searchable archive of Reader results: `Archive(url)` (SQLAlchemy: SQLite or PostgreSQL, with
Alembic migrations), structured and similar-image search (usearch), studies' reports (text,
mined findings with their place in the text, report/model disagreement; from sources or from
DICOM report documents), the indexing run (local or Ray) and DICOM SR / Secondary Capture output. Imported lazily: `import cxr.archive` is cheap."""
from __future__ import annotations

__all__ = ["Archive", "Entry", "ImageRecord", "Query", "FindingClause", "index_images",
           "write_result_dicom"]


def __getattr__(name):
    if name in ("Archive", "Entry", "ImageRecord"):
        from . import db
        return getattr(db, name)
    if name in ("Query", "FindingClause"):
        from . import query
        return getattr(query, name)
    if name == "index_images":
        from .index import index_images
        return index_images
    if name == "write_result_dicom":
        from .dicom_out import write_result_dicom
        return write_result_dicom
    raise AttributeError(name)

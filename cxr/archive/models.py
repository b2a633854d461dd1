"""The archive's tables (SQLAlchemy 2 declarative). The Alembic migrations under
`cxr/archive/migrations/versions/` create exactly these; change both together.

One row in `images` per (content hash, model): the same file indexed by two models gives two rows,
the same content found at two paths gives one. Patient identifiers are never stored: only the DICOM
UIDs that link a result back to its study, series and instance.
"""
from __future__ import annotations

from datetime import datetime, timezone

from sqlalchemy import (JSON, DateTime, Float, ForeignKey, Index, Integer, LargeBinary, String,
                        Text, UniqueConstraint)
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column, relationship


class Base(DeclarativeBase):
    pass


def _now() -> datetime:
    return datetime.now(timezone.utc)


class Meta(Base):
    """Key/value facts about the archive itself (its uuid, which vector indexes must match)."""

    __tablename__ = "archive_meta"
    key: Mapped[str] = mapped_column(String(64), primary_key=True)
    value: Mapped[str] = mapped_column(Text)


class ImageRow(Base):
    __tablename__ = "images"
    __table_args__ = (
        UniqueConstraint("sha256", "model_id", name="uq_images_sha256_model"),
        Index("ix_images_model_status", "model_id", "status"),
        Index("ix_images_study_uid", "study_uid"),
    )

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    sha256: Mapped[str] = mapped_column(String(64))
    model_id: Mapped[str] = mapped_column(String(128))
    path: Mapped[str] = mapped_column(Text)
    status: Mapped[str] = mapped_column(String(16))  # "ok" | "failed"
    reason: Mapped[str | None] = mapped_column(Text, nullable=True)
    study_uid: Mapped[str | None] = mapped_column(String(64), nullable=True)
    series_uid: Mapped[str | None] = mapped_column(String(64), nullable=True)
    sop_uid: Mapped[str | None] = mapped_column(String(64), nullable=True)
    view: Mapped[str | None] = mapped_column(String(16), nullable=True)
    height: Mapped[int | None] = mapped_column(Integer, nullable=True)
    width: Mapped[int | None] = mapped_column(Integer, nullable=True)
    scores: Mapped[dict | None] = mapped_column(JSON, nullable=True)
    embedding: Mapped[bytes | None] = mapped_column(LargeBinary, nullable=True)  # float32 bytes
    # the quality gate's report (QualityReport.to_dict()): why refused, or how it was turned
    # upright before reading (the stored boxes refer to the upright film); migration 0002
    quality: Mapped[dict | None] = mapped_column(JSON, nullable=True)
    indexed_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=_now)

    findings: Mapped[list["FindingRow"]] = relationship(
        back_populates="image", cascade="all, delete-orphan", order_by="FindingRow.score.desc()")
    report: Mapped["ReportRow | None"] = relationship(cascade="all, delete-orphan")
    report_findings: Mapped[list["ReportFindingRow"]] = relationship(
        cascade="all, delete-orphan", order_by="ReportFindingRow.id")


class FindingRow(Base):
    """A finding the model asserted on an image (score above its operating threshold).

    `disease_key` is the lower-cased disease name (indexed, for case-insensitive search);
    `location` is stored as "/base/upper lobe/" so one site word matches with LIKE '%/base/%'.
    """

    __tablename__ = "findings"
    __table_args__ = (
        Index("ix_findings_disease_score", "disease_key", "score"),
        Index("ix_findings_image", "image_id"),
    )

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    image_id: Mapped[int] = mapped_column(ForeignKey("images.id", ondelete="CASCADE"))
    disease: Mapped[str] = mapped_column(String(128))
    disease_key: Mapped[str] = mapped_column(String(128))
    score: Mapped[float] = mapped_column(Float)
    annotation: Mapped[str] = mapped_column(Text, default="")
    organ: Mapped[str | None] = mapped_column(String(64), nullable=True)
    location: Mapped[str] = mapped_column(Text, default="")
    side: Mapped[str | None] = mapped_column(String(16), nullable=True)
    severity: Mapped[str | None] = mapped_column(String(32), nullable=True)
    boxes: Mapped[list | None] = mapped_column(JSON, nullable=True)
    # the annotator's probability of each context word it wrote (migration 0005; NULL before)
    confidence: Mapped[dict | None] = mapped_column(JSON, nullable=True)
    # what was measured for the finding, e.g. Cardiomegaly's cardiothoracic ratio (migration 0006)
    measurements: Mapped[dict | None] = mapped_column(JSON, nullable=True)
    # why something a reader looks for is not there, e.g. no ratio on an AP film (migration 0007)
    notes: Mapped[list | None] = mapped_column(JSON, nullable=True)

    image: Mapped[ImageRow] = relationship(back_populates="findings")


class ReportRow(Base):
    """The report of the study an image belongs to (migration 0003). `note` says what was done
    to a bad report: markup removed, or why it was refused (then `text` is empty)."""

    __tablename__ = "reports"
    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    image_id: Mapped[int] = mapped_column(ForeignKey("images.id", ondelete="CASCADE"), unique=True)
    text: Mapped[str] = mapped_column(Text)
    note: Mapped[str | None] = mapped_column(Text, nullable=True)


class ReportFindingRow(Base):
    """A finding mined from the report (cxr.reports.text.TextMiner), negated and uncertain ones
    included. `label_key` is the lower-cased name the model's findings use for the same disease
    (MeSH heading -> ChestX-ray14 name where one exists), so the two can be compared in SQL."""

    __tablename__ = "report_findings"
    __table_args__ = (
        Index("ix_report_findings_key", "label_key", "certainty"),
        Index("ix_report_findings_image", "image_id"),
    )

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    image_id: Mapped[int] = mapped_column(ForeignKey("images.id", ondelete="CASCADE"))
    disease: Mapped[str] = mapped_column(String(128))
    label_key: Mapped[str] = mapped_column(String(128))
    certainty: Mapped[str] = mapped_column(String(16))
    side: Mapped[str | None] = mapped_column(String(16), nullable=True)
    location: Mapped[str] = mapped_column(Text, default="")
    severity: Mapped[str | None] = mapped_column(String(32), nullable=True)
    sentence: Mapped[str | None] = mapped_column(Text, nullable=True)
    # where the mention stands in ReportRow.text, [start, end) (migration 0004; NULL before it,
    # and for a finding of the whole report such as `normal`)
    span_start: Mapped[int | None] = mapped_column(Integer, nullable=True)
    span_end: Mapped[int | None] = mapped_column(Integer, nullable=True)


def encode_location(location) -> str:
    parts = [" ".join(str(p).lower().split()) for p in (location or ()) if str(p).strip()]
    return "/" + "/".join(parts) + "/" if parts else ""


def decode_location(text: str | None) -> tuple[str, ...]:
    return tuple(p for p in (text or "").split("/") if p)

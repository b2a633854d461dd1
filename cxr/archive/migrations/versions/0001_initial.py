"""Initial archive schema: archive_meta, images, findings.

Revision ID: 0001
Revises:
"""
from alembic import op
import sqlalchemy as sa

revision = "0001"
down_revision = None
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "archive_meta",
        sa.Column("key", sa.String(64), primary_key=True),
        sa.Column("value", sa.Text(), nullable=False),
    )
    op.create_table(
        "images",
        sa.Column("id", sa.Integer(), primary_key=True, autoincrement=True),
        sa.Column("sha256", sa.String(64), nullable=False),
        sa.Column("model_id", sa.String(128), nullable=False),
        sa.Column("path", sa.Text(), nullable=False),
        sa.Column("status", sa.String(16), nullable=False),
        sa.Column("reason", sa.Text(), nullable=True),
        sa.Column("study_uid", sa.String(64), nullable=True),
        sa.Column("series_uid", sa.String(64), nullable=True),
        sa.Column("sop_uid", sa.String(64), nullable=True),
        sa.Column("view", sa.String(16), nullable=True),
        sa.Column("height", sa.Integer(), nullable=True),
        sa.Column("width", sa.Integer(), nullable=True),
        sa.Column("scores", sa.JSON(), nullable=True),
        sa.Column("embedding", sa.LargeBinary(), nullable=True),
        sa.Column("indexed_at", sa.DateTime(timezone=True), nullable=False),
        sa.UniqueConstraint("sha256", "model_id", name="uq_images_sha256_model"),
    )
    op.create_index("ix_images_model_status", "images", ["model_id", "status"])
    op.create_index("ix_images_study_uid", "images", ["study_uid"])
    op.create_table(
        "findings",
        sa.Column("id", sa.Integer(), primary_key=True, autoincrement=True),
        sa.Column("image_id", sa.Integer(), sa.ForeignKey("images.id", ondelete="CASCADE"),
                  nullable=False),
        sa.Column("disease", sa.String(128), nullable=False),
        sa.Column("disease_key", sa.String(128), nullable=False),
        sa.Column("score", sa.Float(), nullable=False),
        sa.Column("annotation", sa.Text(), nullable=False),
        sa.Column("organ", sa.String(64), nullable=True),
        sa.Column("location", sa.Text(), nullable=False),
        sa.Column("side", sa.String(16), nullable=True),
        sa.Column("severity", sa.String(32), nullable=True),
        sa.Column("boxes", sa.JSON(), nullable=True),
    )
    op.create_index("ix_findings_disease_score", "findings", ["disease_key", "score"])
    op.create_index("ix_findings_image", "findings", ["image_id"])


def downgrade() -> None:
    op.drop_table("findings")
    op.drop_table("images")
    op.drop_table("archive_meta")

"""reports + report_findings: each image's report text and the findings mined from it, beside
the model's; a full-text index over the text (SQLite FTS5 kept in sync by triggers, PostgreSQL
a GIN index on to_tsvector('english', text)).

Revision ID: 0003
Revises: 0002
"""
from alembic import op
import sqlalchemy as sa

revision = "0003"
down_revision = "0002"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "reports",
        sa.Column("id", sa.Integer(), primary_key=True, autoincrement=True),
        sa.Column("image_id", sa.Integer(), sa.ForeignKey("images.id", ondelete="CASCADE"),
                  nullable=False, unique=True),
        sa.Column("text", sa.Text(), nullable=False),
        sa.Column("note", sa.Text(), nullable=True),
    )
    op.create_table(
        "report_findings",
        sa.Column("id", sa.Integer(), primary_key=True, autoincrement=True),
        sa.Column("image_id", sa.Integer(), sa.ForeignKey("images.id", ondelete="CASCADE"),
                  nullable=False),
        sa.Column("disease", sa.String(128), nullable=False),
        sa.Column("label_key", sa.String(128), nullable=False),
        sa.Column("certainty", sa.String(16), nullable=False),
        sa.Column("side", sa.String(16), nullable=True),
        sa.Column("location", sa.Text(), nullable=False, server_default=""),
        sa.Column("severity", sa.String(32), nullable=True),
        sa.Column("sentence", sa.Text(), nullable=True),
    )
    op.create_index("ix_report_findings_key", "report_findings", ["label_key", "certainty"])
    op.create_index("ix_report_findings_image", "report_findings", ["image_id"])
    if op.get_bind().dialect.name == "postgresql":
        op.execute("CREATE INDEX ix_reports_fts ON reports "
                   "USING GIN (to_tsvector('english', text))")
    elif op.get_bind().dialect.name == "sqlite":
        # external-content FTS5: the text lives once, in `reports`; triggers keep the index in step;
        # its rowid is the image id, so a match is an image without a join
        op.execute("CREATE VIRTUAL TABLE reports_fts USING fts5(text, content='reports', "
                   "content_rowid='image_id', tokenize='porter unicode61')")
        op.execute("CREATE TRIGGER reports_ai AFTER INSERT ON reports BEGIN "
                   "INSERT INTO reports_fts(rowid, text) VALUES (new.image_id, new.text); END")
        op.execute("CREATE TRIGGER reports_ad AFTER DELETE ON reports BEGIN "
                   "INSERT INTO reports_fts(reports_fts, rowid, text) "
                   "VALUES ('delete', old.image_id, old.text); END")


def downgrade() -> None:
    if op.get_bind().dialect.name == "sqlite":
        op.execute("DROP TRIGGER IF EXISTS reports_ad")
        op.execute("DROP TRIGGER IF EXISTS reports_ai")
        op.execute("DROP TABLE IF EXISTS reports_fts")
    op.drop_table("report_findings")
    op.drop_table("reports")

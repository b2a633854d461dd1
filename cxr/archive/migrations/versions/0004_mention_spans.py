"""report_findings.span_start / span_end: where each mined mention stands in reports.text
(character offsets, end exclusive), so a viewer can mark it in the text. NULL for rows mined
before, and for findings that stand for the whole report (`normal`).

Revision ID: 0004
Revises: 0003
"""
from alembic import op
import sqlalchemy as sa

revision = "0004"
down_revision = "0003"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("report_findings") as batch:
        batch.add_column(sa.Column("span_start", sa.Integer(), nullable=True))
        batch.add_column(sa.Column("span_end", sa.Integer(), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("report_findings") as batch:
        batch.drop_column("span_end")
        batch.drop_column("span_start")

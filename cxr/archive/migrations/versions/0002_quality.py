"""images.quality: the quality gate's report for each image (JSON; NULL for rows indexed before).

It says whether a film was refused and why, or turned upright before reading (rotation,
polarity), which the stored boxes then refer to.

Revision ID: 0002
Revises: 0001
"""
from alembic import op
import sqlalchemy as sa

revision = "0002"
down_revision = "0001"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("images") as batch:
        batch.add_column(sa.Column("quality", sa.JSON(), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("images") as batch:
        batch.drop_column("quality")

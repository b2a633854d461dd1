"""findings.measurements: what was measured on the film for the finding (Cardiomegaly's
cardiothoracic ratio, from the anatomy network), as JSON; NULL for findings indexed before, or
with nothing measured.

Revision ID: 0006
Revises: 0005
"""
from alembic import op
import sqlalchemy as sa

revision = "0006"
down_revision = "0005"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("findings") as batch:
        batch.add_column(sa.Column("measurements", sa.JSON(), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("findings") as batch:
        batch.drop_column("measurements")

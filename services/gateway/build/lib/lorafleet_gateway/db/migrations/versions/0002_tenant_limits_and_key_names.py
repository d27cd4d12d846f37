"""Per-tenant rate limits (keys inherit them) and a display name per key.

Revision ID: 0002
Revises: 0001
Create Date: 2026-11-22
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0002"
down_revision = "0001"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("gateway_tenants") as batch:
        batch.add_column(sa.Column("rpm_limit", sa.Integer, nullable=True))
        batch.add_column(sa.Column("tpm_limit", sa.Integer, nullable=True))
    with op.batch_alter_table("gateway_api_keys") as batch:
        batch.add_column(sa.Column("name", sa.String(200), nullable=False, server_default=""))


def downgrade() -> None:
    with op.batch_alter_table("gateway_api_keys") as batch:
        batch.drop_column("name")
    with op.batch_alter_table("gateway_tenants") as batch:
        batch.drop_column("tpm_limit")
        batch.drop_column("rpm_limit")

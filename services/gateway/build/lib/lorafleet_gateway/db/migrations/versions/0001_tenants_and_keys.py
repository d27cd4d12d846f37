"""Tenants and their API keys, and the built-in "default" tenant.

Revision ID: 0001
Revises:
Create Date: 2026-11-22
"""

from __future__ import annotations

import time

import sqlalchemy as sa
from alembic import op

revision = "0001"
down_revision = None
branch_labels = None
depends_on = None

DEFAULT_TENANT = "default"


def upgrade() -> None:
    tenants = op.create_table(
        "gateway_tenants",
        sa.Column("id", sa.String(40), primary_key=True),
        sa.Column("name", sa.String(200), nullable=False),
        sa.Column("created_at", sa.Float, nullable=False),
        sa.Column("disabled", sa.Boolean, nullable=False, server_default=sa.false()),
    )
    op.create_table(
        "gateway_api_keys",
        sa.Column("id", sa.String(40), primary_key=True),
        sa.Column("tenant_id", sa.String(40), sa.ForeignKey("gateway_tenants.id"), nullable=False),
        sa.Column("prefix", sa.String(16), nullable=False),
        sa.Column("key_hash", sa.String(64), nullable=False),
        sa.Column("created_at", sa.Float, nullable=False),
        sa.Column("revoked_at", sa.Float, nullable=True),
        sa.Column("rpm_limit", sa.Integer, nullable=True),
        sa.Column("tpm_limit", sa.Integer, nullable=True),
    )
    op.create_index("ix_gateway_api_keys_tenant_id", "gateway_api_keys", ["tenant_id"])
    op.create_index("ix_gateway_api_keys_key_hash", "gateway_api_keys", ["key_hash"], unique=True)
    # The admin key acts as this tenant on the data plane; it always exists.
    op.bulk_insert(tenants, [{"id": DEFAULT_TENANT, "name": "Default tenant", "created_at": time.time()}])


def downgrade() -> None:
    op.drop_table("gateway_api_keys")
    op.drop_table("gateway_tenants")

"""The schema at migration head. Migrations (db/migrations/versions) are the source of truth for
existing databases; these Table objects are what the code queries, and a test checks the two agree."""

from __future__ import annotations

import sqlalchemy as sa

metadata = sa.MetaData()

# "gateway_" prefixes let the gateway share one PostgreSQL database with the trainer ("trainer_*").
tenants = sa.Table(
    "gateway_tenants",
    metadata,
    sa.Column("id", sa.String(40), primary_key=True),
    sa.Column("name", sa.String(200), nullable=False),
    sa.Column("created_at", sa.Float, nullable=False),
    sa.Column("disabled", sa.Boolean, nullable=False, server_default=sa.false()),
    # NULL: the gateway's default (settings.default_rpm_limit / default_tpm_limit).
    sa.Column("rpm_limit", sa.Integer, nullable=True),
    sa.Column("tpm_limit", sa.Integer, nullable=True),
)

api_keys = sa.Table(
    "gateway_api_keys",
    metadata,
    sa.Column("id", sa.String(40), primary_key=True),
    sa.Column("tenant_id", sa.String(40), sa.ForeignKey("gateway_tenants.id"), nullable=False, index=True),
    sa.Column("name", sa.String(200), nullable=False, server_default=""),
    # The first characters of the key, to recognise it in listings; never enough to use it.
    sa.Column("prefix", sa.String(16), nullable=False),
    # sha256 hex of the whole key. The key itself is never stored (see tenancy/keys.py for why sha256).
    sa.Column("key_hash", sa.String(64), nullable=False),
    sa.Column("created_at", sa.Float, nullable=False),
    sa.Column("revoked_at", sa.Float, nullable=True),
    # NULL: the tenant's limit, else the gateway's default.
    sa.Column("rpm_limit", sa.Integer, nullable=True),
    sa.Column("tpm_limit", sa.Integer, nullable=True),
)
sa.Index("ix_gateway_api_keys_key_hash", api_keys.c.key_hash, unique=True)

"""The schema of fedloop 0.1: agents, rounds, local and global models, evaluations, meta.

Revision ID: 0001
Revises:
Create Date: 2025-01-01

Databases made before migrations (by `create_all`, with no alembic_version table) already hold
some or all of these tables with exactly this shape, so each table is created only where it is
missing: such a database is adopted as revision 0001 without touching its rows.
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op
from sqlalchemy.schema import SchemaItem

revision = "0001"
down_revision = None
branch_labels = None
depends_on = None


def _tables() -> list[tuple[str, list[SchemaItem], list[tuple[str, list[str]]]]]:
    """Each table: (name, columns and constraints, indexes as (name, columns))."""
    return [
        (
            "agents",
            [
                sa.Column("id", sa.String(64), nullable=False),
                sa.Column("name", sa.String(128), nullable=False),
                sa.Column("registered_at", sa.Float(), nullable=False),
                sa.Column("last_seen", sa.Float(), nullable=False),
                sa.PrimaryKeyConstraint("id"),
                sa.UniqueConstraint("name"),
            ],
            [],
        ),
        (
            "global_models",
            [
                sa.Column("round", sa.Integer(), nullable=False),
                sa.Column("model_id", sa.String(64), nullable=False),
                sa.Column("contributors", sa.JSON(), nullable=False),
                sa.Column("total_samples", sa.Integer(), nullable=False),
                sa.Column("metrics", sa.JSON(), nullable=False),
                sa.Column("seconds", sa.Float(), nullable=False),
                sa.Column("state_id", sa.String(64), nullable=True),
                sa.Column("created_at", sa.Float(), nullable=False),
                sa.PrimaryKeyConstraint("round"),
            ],
            [],
        ),
        (
            "meta",
            [
                sa.Column("key", sa.String(64), nullable=False),
                sa.Column("value", sa.JSON(), nullable=False),
                sa.PrimaryKeyConstraint("key"),
            ],
            [],
        ),
        (
            "rounds",
            [
                sa.Column("number", sa.Integer(), nullable=False),
                sa.Column("started_at", sa.Float(), nullable=False),
                sa.Column("closed_at", sa.Float(), nullable=True),
                sa.PrimaryKeyConstraint("number"),
            ],
            [],
        ),
        (
            "evaluations",
            [
                sa.Column("id", sa.Integer(), nullable=False),
                sa.Column("agent_id", sa.String(64), nullable=False),
                sa.Column("round", sa.Integer(), nullable=False),
                sa.Column("metrics", sa.JSON(), nullable=False),
                sa.Column("created_at", sa.Float(), nullable=False),
                sa.ForeignKeyConstraint(["agent_id"], ["agents.id"]),
                sa.PrimaryKeyConstraint("id"),
                sa.UniqueConstraint("agent_id", "round"),
            ],
            [("ix_evaluations_round", ["round"])],
        ),
        (
            "local_models",
            [
                sa.Column("id", sa.Integer(), nullable=False),
                sa.Column("agent_id", sa.String(64), nullable=False),
                sa.Column("round", sa.Integer(), nullable=False),
                sa.Column("base_round", sa.Integer(), nullable=False),
                sa.Column("model_id", sa.String(64), nullable=False),
                sa.Column("num_samples", sa.Integer(), nullable=False),
                sa.Column("metrics", sa.JSON(), nullable=False),
                sa.Column("nbytes", sa.Integer(), nullable=False),
                sa.Column("created_at", sa.Float(), nullable=False),
                sa.ForeignKeyConstraint(["agent_id"], ["agents.id"]),
                sa.PrimaryKeyConstraint("id"),
                sa.UniqueConstraint("agent_id", "round"),
            ],
            [("ix_local_models_round", ["round"])],
        ),
    ]


def upgrade() -> None:
    inspector = sa.inspect(op.get_bind())
    for name, items, indexes in _tables():
        if inspector.has_table(name):
            continue
        op.create_table(name, *items)
        for index, columns in indexes:
            op.create_index(index, name, columns)


def downgrade() -> None:
    for name, _items, _indexes in reversed(_tables()):
        op.drop_table(name)

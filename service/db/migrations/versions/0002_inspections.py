"""Inspection records and their reviews.

Revision ID: 0002_inspections
Revises: 0001_products
Create Date: 2026-11-24
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects import postgresql

revision = "0002_inspections"
down_revision = "0001_products"
branch_labels = None
depends_on = None

JSON = sa.JSON().with_variant(postgresql.JSONB(), "postgresql")
SEQ = sa.BigInteger().with_variant(sa.Integer(), "sqlite")


def upgrade() -> None:
    op.create_table(
        "inspections",
        sa.Column("seq", SEQ, primary_key=True, autoincrement=True),
        sa.Column("id", sa.String(32), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("product", sa.String(64), nullable=True),
        sa.Column("product_version", sa.Integer(), nullable=True),
        sa.Column("reference_version", sa.Integer(), nullable=True),
        sa.Column("class_name", sa.String(128), nullable=True),
        sa.Column("class_label", sa.String(128), nullable=False),
        sa.Column("score", sa.Float(), nullable=False),
        sa.Column("threshold", sa.Float(), nullable=False),
        sa.Column("threshold_source", sa.String(16), nullable=True),
        sa.Column("pixel_threshold", sa.Float(), nullable=True),
        sa.Column("is_anomalous", sa.Boolean(), nullable=False),
        sa.Column("defects", JSON, nullable=True),
        sa.Column("component_scores", JSON, nullable=True),
        sa.Column("detector", sa.String(64), nullable=False),
        sa.Column("backbone", sa.String(128), nullable=False),
        sa.Column("checkpoint", sa.String(64), nullable=True),
        sa.Column("identity", JSON, nullable=False),
        sa.Column("worker", sa.String(128), nullable=True),
        sa.Column("batch_size", sa.Integer(), nullable=True),
        sa.Column("queue_ms", sa.Float(), nullable=False),
        sa.Column("model_ms", sa.Float(), nullable=False),
        sa.Column("total_ms", sa.Float(), nullable=False),
        sa.Column("image_width", sa.Integer(), nullable=True),
        sa.Column("image_height", sa.Integer(), nullable=True),
        sa.Column("part_id", sa.String(128), nullable=True),
        sa.Column("station", sa.String(64), nullable=True),
        sa.Column("media", JSON, nullable=True),
        sa.Column("review_verdict", sa.String(16), nullable=True),
        sa.Column("review_note", sa.String(2000), nullable=True),
        sa.Column("reviewer", sa.String(128), nullable=True),
        sa.Column("reviewed_at", sa.DateTime(timezone=True), nullable=True),
        sa.PrimaryKeyConstraint("seq", name="pk_inspections"),
        sa.UniqueConstraint("id", name="uq_inspections_id"),
    )
    op.create_index("ix_inspections_created_at_seq", "inspections", ["created_at", "seq"])
    op.create_index("ix_inspections_product_created_at", "inspections", ["product", "created_at"])
    op.create_index("ix_inspections_station_created_at", "inspections", ["station", "created_at"])
    op.create_index("ix_inspections_part_id", "inspections", ["part_id"])
    op.create_table(
        "inspection_reviews",
        sa.Column("id", SEQ, primary_key=True, autoincrement=True),
        sa.Column("inspection_id", sa.String(32), nullable=False),
        sa.Column("verdict", sa.String(16), nullable=False),
        sa.Column("note", sa.String(2000), nullable=True),
        sa.Column("reviewer", sa.String(128), nullable=True),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.PrimaryKeyConstraint("id", name="pk_inspection_reviews"),
        sa.ForeignKeyConstraint(["inspection_id"], ["inspections.id"], ondelete="CASCADE",
                                name="fk_inspection_reviews_inspection_id_inspections"),
    )
    op.create_index("ix_inspection_reviews_inspection_id", "inspection_reviews", ["inspection_id"])


def downgrade() -> None:
    op.drop_index("ix_inspection_reviews_inspection_id", table_name="inspection_reviews")
    op.drop_table("inspection_reviews")
    for name in ("ix_inspections_part_id", "ix_inspections_station_created_at",
                 "ix_inspections_product_created_at", "ix_inspections_created_at_seq"):
        op.drop_index(name, table_name="inspections")
    op.drop_table("inspections")

"""inference replicas

Revision ID: 0006
Revises: 0005
Create Date: 2026-12-01
"""

import sqlalchemy as sa
from alembic import op

revision = '0006'
down_revision = '0005'
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table('inference_replicas',
    sa.Column('id', sa.String(length=64), nullable=False),
    sa.Column('url', sa.String(length=512), nullable=False),
    sa.Column('base_model', sa.String(length=128), nullable=False),
    sa.Column('engine', sa.String(length=16), nullable=False),
    sa.Column('state', sa.String(length=16), nullable=False),
    sa.Column('kinds', sa.JSON(), nullable=False),
    sa.Column('max_resident_adapters', sa.Integer(), nullable=False),
    sa.Column('max_batch', sa.Integer(), nullable=False),
    sa.Column('resident_adapters', sa.JSON(), nullable=False),
    sa.Column('load', sa.Integer(), nullable=False),
    sa.Column('stats', sa.JSON(), nullable=False),
    sa.Column('started_at', sa.Float(), nullable=False),
    sa.Column('heartbeat_at', sa.Float(), nullable=False),
    sa.PrimaryKeyConstraint('id')
    )
    with op.batch_alter_table('inference_replicas', schema=None) as batch_op:
        batch_op.create_index(batch_op.f('ix_inference_replicas_base_model'), ['base_model'], unique=False)
        batch_op.create_index(batch_op.f('ix_inference_replicas_heartbeat_at'), ['heartbeat_at'], unique=False)


def downgrade() -> None:
    with op.batch_alter_table('inference_replicas', schema=None) as batch_op:
        batch_op.drop_index(batch_op.f('ix_inference_replicas_heartbeat_at'))
        batch_op.drop_index(batch_op.f('ix_inference_replicas_base_model'))

    op.drop_table('inference_replicas')

"""adapter aliases and sources

Revision ID: 0002
Revises: 0001
Create Date: 2026-11-28
"""

import sqlalchemy as sa
from alembic import op

revision = '0002'
down_revision = '0001'
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table('adapter_alias_events',
    sa.Column('id', sa.Integer(), autoincrement=True, nullable=False),
    sa.Column('team_id', sa.String(length=64), nullable=False),
    sa.Column('name', sa.String(length=256), nullable=False),
    sa.Column('alias', sa.String(length=64), nullable=False),
    sa.Column('adapter_id', sa.String(length=64), nullable=True),
    sa.Column('previous_adapter_id', sa.String(length=64), nullable=True),
    sa.Column('created_at', sa.Float(), nullable=False),
    sa.ForeignKeyConstraint(['team_id'], ['teams.id'], ondelete='CASCADE'),
    sa.PrimaryKeyConstraint('id')
    )
    with op.batch_alter_table('adapter_alias_events', schema=None) as batch_op:
        batch_op.create_index(batch_op.f('ix_adapter_alias_events_created_at'), ['created_at'], unique=False)
        batch_op.create_index(batch_op.f('ix_adapter_alias_events_team_id'), ['team_id'], unique=False)

    op.create_table('adapter_aliases',
    sa.Column('id', sa.Integer(), autoincrement=True, nullable=False),
    sa.Column('team_id', sa.String(length=64), nullable=False),
    sa.Column('name', sa.String(length=256), nullable=False),
    sa.Column('alias', sa.String(length=64), nullable=False),
    sa.Column('adapter_id', sa.String(length=64), nullable=False),
    sa.Column('updated_at', sa.Float(), nullable=False),
    sa.ForeignKeyConstraint(['adapter_id'], ['adapters.id'], ondelete='CASCADE'),
    sa.ForeignKeyConstraint(['team_id'], ['teams.id'], ondelete='CASCADE'),
    sa.PrimaryKeyConstraint('id'),
    sa.UniqueConstraint('team_id', 'name', 'alias', name='uq_adapter_aliases_name_alias')
    )
    with op.batch_alter_table('adapter_aliases', schema=None) as batch_op:
        batch_op.create_index(batch_op.f('ix_adapter_aliases_team_id'), ['team_id'], unique=False)

    with op.batch_alter_table('adapters', schema=None) as batch_op:
        batch_op.add_column(sa.Column('source', sa.String(length=16), nullable=False, server_default='job'))



def downgrade() -> None:
    with op.batch_alter_table('adapters', schema=None) as batch_op:
        batch_op.drop_column('source')

    with op.batch_alter_table('adapter_aliases', schema=None) as batch_op:
        batch_op.drop_index(batch_op.f('ix_adapter_aliases_team_id'))

    op.drop_table('adapter_aliases')
    with op.batch_alter_table('adapter_alias_events', schema=None) as batch_op:
        batch_op.drop_index(batch_op.f('ix_adapter_alias_events_team_id'))
        batch_op.drop_index(batch_op.f('ix_adapter_alias_events_created_at'))

    op.drop_table('adapter_alias_events')

"""`/v1/models`: base models and the team's fine-tuned adapters."""

from __future__ import annotations

from fastapi import APIRouter
from sqlalchemy import or_, select

from api.deps import CurrentTeam, SessionDep
from api.errors import not_found
from core.models import Adapter, BaseModelRecord
from core.schemas.common import DeletedObject, ListPage
from core.schemas.models import ModelPublic
from core.storage import get_storage

router = APIRouter(prefix="/v1/models", tags=["models"])


def _adapter_model(row: Adapter, team_name: str) -> ModelPublic:
    return ModelPublic(id=row.fine_tuned_model or f"{row.name}@{row.version}", created=int(row.created_at),
                       owned_by=team_name, parent=row.base_model, root=row.base_model)


@router.get("", response_model=ListPage[ModelPublic])
def list_models(session: SessionDep, team: CurrentTeam) -> ListPage[ModelPublic]:
    """Every base model, then the team's adapters."""
    bases = [ModelPublic(id=b.id, created=int(b.created_at), owned_by="patchbay", root=b.id)
             for b in session.scalars(select(BaseModelRecord).order_by(BaseModelRecord.id))]
    adapters = [_adapter_model(a, team.name) for a in session.scalars(
        select(Adapter).where(Adapter.team_id == team.id, Adapter.status != "deleted").order_by(Adapter.created_at)
    )]
    return ListPage[ModelPublic](data=bases + adapters, has_more=False)


def _team_adapter(session, team, model_id: str) -> Adapter:
    row = session.scalar(select(Adapter).where(
        Adapter.team_id == team.id, or_(Adapter.fine_tuned_model == model_id, Adapter.id == model_id)))
    if row is None:
        raise not_found("model", model_id)
    return row


@router.get("/{model_id:path}", response_model=ModelPublic)
def retrieve_model(model_id: str, session: SessionDep, team: CurrentTeam) -> ModelPublic:
    """One base model or one of the team's fine-tuned models."""
    base = session.get(BaseModelRecord, model_id)
    if base is not None:
        return ModelPublic(id=base.id, created=int(base.created_at), owned_by="patchbay", root=base.id)
    return _adapter_model(_team_adapter(session, team, model_id), team.name)


@router.delete("/{model_id:path}", response_model=DeletedObject)
def delete_model(model_id: str, session: SessionDep, team: CurrentTeam) -> DeletedObject:
    """Delete one of the team's fine-tuned models and its stored adapter."""
    row = _team_adapter(session, team, model_id)
    session.delete(row)
    session.flush()
    get_storage().delete(row.storage_key)
    return DeletedObject(id=model_id, object="model")

"""`/v1/models`: base models and the team's fine-tuned adapters."""

from __future__ import annotations

from sqlalchemy import select

from api.deps import CurrentTeam, SessionDep
from api.routing import team_router
from core.errors import not_found
from core.models import Adapter, AdapterAlias, BaseModelRecord
from core.registry import delete_version, find_team_adapter
from core.schemas.common import DeletedObject, ListPage
from core.schemas.models import ModelPublic

router = team_router("/v1/models", "models")


def _adapter_model(row: Adapter, team_name: str) -> ModelPublic:
    return ModelPublic(id=row.fine_tuned_model or f"{row.name}@{row.version}", created=int(row.created_at),
                       owned_by=team_name, parent=row.base_model, root=row.base_model)


@router.get("", response_model=ListPage[ModelPublic])
def list_models(session: SessionDep, team: CurrentTeam) -> ListPage[ModelPublic]:
    """Every base model, then the team's adapters."""
    bases = [ModelPublic(id=b.id, created=int(b.created_at), owned_by="patchbay", root=b.id)
             for b in session.scalars(select(BaseModelRecord).order_by(BaseModelRecord.id))]
    rows = list(session.scalars(
        select(Adapter).where(Adapter.team_id == team.id, Adapter.status == "ready").order_by(Adapter.created_at)))
    by_id = {row.id: row for row in rows}
    adapters = [_adapter_model(a, team.name) for a in rows]
    aliases = [
        ModelPublic(id=f"{alias.name}:{alias.alias}", created=int(alias.updated_at), owned_by=team.name,
                    parent=by_id[alias.adapter_id].base_model, root=by_id[alias.adapter_id].base_model)
        for alias in session.scalars(select(AdapterAlias).where(AdapterAlias.team_id == team.id)
                                     .order_by(AdapterAlias.name, AdapterAlias.alias))
        if alias.adapter_id in by_id
    ]
    return ListPage[ModelPublic](data=bases + adapters + aliases, has_more=False)


def _team_adapter(session, team, model_id: str) -> Adapter:
    row = find_team_adapter(session, team.id, model_id)
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
    delete_version(session, _team_adapter(session, team, model_id))
    return DeletedObject(id=model_id, object="model")

"""`/v1/api_keys`: a team admin lists the team's keys, issues new ones (shown once) and revokes them."""

from __future__ import annotations

from api.deps import AdminTeam, SessionDep
from api.openapi import error_responses
from api.routing import team_router
from core.auth import LastAdminKeyError, issue_api_key, revoke_api_key, team_keys
from core.errors import ApiError, not_found
from core.schemas.common import DeletedObject, ListPage
from core.schemas.keys import ApiKeyCreate, ApiKeyCreated, ApiKeyPublic

router = team_router("/v1/api_keys", "api_keys")
ADMIN_ERRORS = error_responses(403)


@router.get("", response_model=ListPage[ApiKeyPublic], responses=ADMIN_ERRORS)
def list_api_keys(session: SessionDep, team: AdminTeam) -> ListPage[ApiKeyPublic]:
    """The team's keys: prefix, creation time and whether each is an admin key (never the secret)."""
    return ListPage[ApiKeyPublic](data=[ApiKeyPublic.of(k) for k in team_keys(session, team)], has_more=False)


@router.post("", response_model=ApiKeyCreated, responses=ADMIN_ERRORS)
def create_api_key(body: ApiKeyCreate, session: SessionDep, team: AdminTeam) -> ApiKeyCreated:
    """Issue a key for the team; the answer is the only time its secret is shown."""
    record, secret = issue_api_key(session, team, is_admin=body.admin)
    return ApiKeyCreated(**ApiKeyPublic.of(record).model_dump(), key=secret)


@router.delete("/{key_id}", response_model=DeletedObject, responses=error_responses(403, 404, 409))
def delete_api_key(key_id: str, session: SessionDep, team: AdminTeam) -> DeletedObject:
    """Revoke one of the team's keys: it stops working at once. The team's last admin key stays (409)."""
    try:
        revoked = revoke_api_key(session, team, key_id)
    except LastAdminKeyError as exc:
        raise ApiError(409, str(exc), param="key_id", code="last_admin_key") from None
    if not revoked:
        raise not_found("API key", key_id)
    return DeletedObject(id=key_id, object="api_key.deleted", deleted=True)

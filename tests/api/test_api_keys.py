"""`/v1/api_keys`: a team admin lists, issues and revokes the team's keys; nobody sees another team's."""

from __future__ import annotations

from core.auth import create_api_key
from core.db import session_scope
from core.models import Team


def admin_key(team: str = "acme") -> str:
    with session_scope() as session:
        return create_api_key(session, session.query(Team).filter_by(name=team).one(), is_admin=True)


def test_only_admin_keys_manage_keys(api):
    for method, path in (("GET", "/v1/api_keys"), ("POST", "/v1/api_keys"), ("DELETE", "/v1/api_keys/key-x")):
        response = api.client.request(method, path, headers=api.headers(), json={} if method == "POST" else None)
        assert response.status_code == 403, (method, path, response.text)
        assert response.json()["error"]["code"] == "admin_required"


def test_a_new_key_is_shown_once_works_and_is_listed_by_prefix_only(api):
    admin = admin_key()
    created = api.client.post("/v1/api_keys", headers=api.headers(admin), json={})
    assert created.status_code == 200, created.text
    body = created.json()
    assert body["object"] == "api_key" and body["key"].startswith(body["prefix"]) and body["is_admin"] is False
    assert api.client.get("/v1/files", headers=api.headers(body["key"])).status_code == 200
    listed = api.client.get("/v1/api_keys", headers=api.headers(admin)).json()["data"]
    assert body["id"] in [k["id"] for k in listed] and len(listed) == 3  # the fixture's, the admin's, the new one
    assert all("key" not in k for k in listed)
    assert body["key"] not in str(listed)


def test_a_revoked_key_stops_working_at_once(api):
    admin = admin_key()
    victim = api.client.post("/v1/api_keys", headers=api.headers(admin), json={"admin": False}).json()
    gone = api.client.delete(f"/v1/api_keys/{victim['id']}", headers=api.headers(admin))
    assert gone.json() == {"id": victim["id"], "object": "api_key.deleted", "deleted": True}
    assert api.client.get("/v1/files", headers=api.headers(victim["key"])).status_code == 401
    assert api.client.delete(f"/v1/api_keys/{victim['id']}", headers=api.headers(admin)).status_code == 404


def test_the_last_admin_key_cannot_be_revoked(api):
    admin = admin_key()
    own_id = next(k["id"] for k in api.client.get("/v1/api_keys", headers=api.headers(admin)).json()["data"]
                  if k["is_admin"])
    refused = api.client.delete(f"/v1/api_keys/{own_id}", headers=api.headers(admin))
    assert refused.status_code == 409 and refused.json()["error"]["code"] == "last_admin_key"
    second = api.client.post("/v1/api_keys", headers=api.headers(admin), json={"admin": True}).json()
    assert api.client.delete(f"/v1/api_keys/{own_id}", headers=api.headers(admin)).status_code == 200
    assert api.client.get("/v1/api_keys", headers=api.headers(second["key"])).status_code == 200


def test_teams_never_see_or_revoke_each_others_keys(api):
    mine, theirs = admin_key("acme"), admin_key("globex")
    my_ids = {k["id"] for k in api.client.get("/v1/api_keys", headers=api.headers(mine)).json()["data"]}
    their_ids = {k["id"] for k in api.client.get("/v1/api_keys", headers=api.headers(theirs)).json()["data"]}
    assert my_ids and their_ids and not my_ids & their_ids
    for key_id in my_ids:
        assert api.client.delete(f"/v1/api_keys/{key_id}", headers=api.headers(theirs)).status_code == 404
    assert {k["id"] for k in api.client.get("/v1/api_keys", headers=api.headers(mine)).json()["data"]} == my_ids


def test_a_bad_body_names_its_field(api):
    response = api.client.post("/v1/api_keys", headers=api.headers(admin_key()), json={"admin": "maybe"})
    assert response.status_code == 400 and response.json()["error"]["param"] == "admin"
    response = api.client.post("/v1/api_keys", headers=api.headers(admin_key()), json={"scopes": ["all"]})
    assert response.status_code == 400 and response.json()["error"]["param"] == "scopes"

"""`GET /v1/me`: the console signs in with it; it names the calling team and key, and nothing secret."""

from __future__ import annotations

from tests.api.test_api_keys import admin_key


def test_me_names_the_team_and_the_key_without_its_secret(api):
    body = api.client.get("/v1/me", headers=api.headers()).json()
    assert body["object"] == "identity" and body["team"]["name"] == "acme"
    assert body["key"]["is_admin"] is False and api.key.startswith(body["key"]["prefix"])
    assert api.key not in str(body)
    admin = api.client.get("/v1/me", headers=api.headers(admin_key("globex"))).json()
    assert admin["team"]["name"] == "globex" and admin["key"]["is_admin"] is True


def test_a_wrong_key_gets_the_apis_error(api):
    response = api.client.get("/v1/me", headers=api.headers("pb-wrong"))
    assert response.status_code == 401 and response.json()["error"]["code"] == "invalid_api_key"

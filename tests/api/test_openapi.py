"""The OpenAPI schema documents what the API really answers: 400 with OpenAI's error object, never 422."""

from __future__ import annotations


def test_errors_are_documented_as_the_error_object_and_422_is_gone(api):
    schema = api.client.get("/openapi.json").json()
    assert "HTTPValidationError" not in schema["components"]["schemas"]
    error = schema["components"]["schemas"]["ErrorResponse"]
    assert error["required"] == ["error"]
    for path, operations in schema["paths"].items():
        for method, operation in operations.items():
            responses = operation["responses"]
            assert "422" not in responses, (method, path)
            if path.startswith("/v1/"):
                for status in ("400", "401", "429", "503"):
                    assert responses[status]["content"]["application/json"]["schema"]["$ref"].endswith(
                        "/ErrorResponse"), (method, path, status)
            if method in ("post", "patch"):
                assert {"408", "413"} <= set(responses), (method, path)
            if "{" in path:
                assert "404" in responses, (method, path)


def test_a_validation_error_answers_what_the_schema_says(api):
    response = api.client.post("/v1/fine_tuning/jobs", headers=api.headers(), json={"model": 5})
    assert response.status_code == 400
    assert set(response.json()["error"]) >= {"message", "type", "param", "code"}

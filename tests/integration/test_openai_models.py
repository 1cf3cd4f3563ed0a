"""GET /v1/models and /v1/models/{id} with the official openai SDK (`models.list`, `models.retrieve`)."""

from __future__ import annotations

import openai
import pytest

from tests.procs import Cluster


def test_retrieve_a_model_and_404_for_an_unknown_one(cluster: Cluster) -> None:
    api = cluster.api()
    client = openai.OpenAI(base_url=f"{api.url}/v1", api_key="unused", max_retries=0)
    (listed,) = client.models.list().data
    got = client.models.retrieve("smollm2")
    assert got == listed and got.id == "smollm2" and got.object == "model" and got.owned_by == "tokenfan"
    with pytest.raises(openai.NotFoundError) as missing:
        client.models.retrieve("no-such-model")
    assert missing.value.status_code == 404
    assert missing.value.body == {"message": "The model 'no-such-model' does not exist",
                                  "type": "invalid_request_error", "param": "model", "code": "model_not_found"}
    with pytest.raises(openai.NotFoundError):
        client.models.retrieve("org/smollm2")  # an id with a slash is looked up whole

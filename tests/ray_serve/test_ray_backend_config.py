"""How a user names the Ray Serve backend (``ray://<app>``, a handle) reaches ``RayBackend``,
without Ray: the handle is looked up only when the first call needs it."""

from __future__ import annotations

import pytest
from kawhi_client.integrations.backends import as_backend
from kawhi_client.integrations.ray_backend import RayBackend
from kawhi_client.integrations.verl_shared import reweighter_from_config


def test_a_ray_url_is_a_ray_backend_of_that_application() -> None:
    backend = as_backend("ray://kawhi-ref")
    assert isinstance(backend, RayBackend) and backend.app_name == "kawhi-ref"
    assert repr(backend) == "RayBackend(ray://kawhi-ref)"
    with pytest.raises(ValueError, match="ray://<Serve application name>"):
        RayBackend.from_url("ray://")


def test_verl_config_with_a_ray_url_uses_the_handle_with_its_deadline() -> None:
    reweighter = reweighter_from_config({"reward": {"kawhi": {"url": "ray://kawhi", "deadline_s": 30}}})
    assert isinstance(reweighter.backend, RayBackend)
    assert reweighter.backend.app_name == "kawhi" and reweighter.backend.timeout_s == 30.0

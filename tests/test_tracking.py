"""The MLflow layer's own promises: the reachability probe's short timeout stays the probe's."""

from __future__ import annotations

import os
import socket

import pytest

from flat_ray import tracking
from flat_ray.errors import FlatRayError


def test_the_reachability_probe_does_not_change_the_processs_mlflow_settings(monkeypatch):
    monkeypatch.delenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", raising=False)
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_TIMEOUT", "120")  # a user's own setting
    with socket.socket() as s:  # a port nothing listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    with pytest.raises(FlatRayError, match="is unreachable"):
        tracking.check_reachable(f"http://127.0.0.1:{port}")
    assert "MLFLOW_HTTP_REQUEST_MAX_RETRIES" not in os.environ  # MLflow's retries and back-off stay on afterwards
    assert os.environ["MLFLOW_HTTP_REQUEST_TIMEOUT"] == "120"

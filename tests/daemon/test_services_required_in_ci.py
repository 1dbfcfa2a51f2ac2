"""With ``CI=true`` the daemon tests fail, not skip, when PostgreSQL or RabbitMQ is missing."""

from __future__ import annotations

import pytest

from tests.daemon import conftest


@pytest.fixture
def no_rabbitmq(monkeypatch):
    real = conftest._listening
    monkeypatch.setattr(conftest, "_listening", lambda host, port: False if port == conftest.RABBITMQ[1]
                        else real(host, port))


@pytest.mark.parametrize("ci", ["true", "True", "1"])
def test_missing_services_fail_in_ci(no_rabbitmq, monkeypatch, ci):
    monkeypatch.setenv("CI", ci)
    with pytest.raises(pytest.fail.Exception, match="RabbitMQ on 127.0.0.1:5672; with CI=true the daemon tests "
                                                    "must run, not skip"):
        conftest.require_services()


@pytest.mark.parametrize("ci", [None, "false"])
def test_missing_services_skip_outside_ci(no_rabbitmq, monkeypatch, ci):
    if ci is None:
        monkeypatch.delenv("CI", raising=False)
    else:
        monkeypatch.setenv("CI", ci)
    with pytest.raises(pytest.skip.Exception, match="needs .*RabbitMQ on 127.0.0.1:5672"):
        conftest.require_services()


def test_services_of_this_machine_are_there():
    """PostgreSQL and RabbitMQ run where these tests run (project machines, CI): nothing is skipped."""
    conftest.require_services()

"""Kafka and Redis security settings: a SASL protocol needs credentials; PLAINTEXT is flagged."""

from __future__ import annotations

import logging
import ssl

import pytest
from pydantic import ValidationError

from shared.config import ServiceSettings
from shared.infra.redis import redis_acl_rules
from shared.kafka import kafka_client_options, kafka_security_options
from shared.kafka_acls import CONSUMES, PRODUCES, acl_bindings
from shared.redis import redis_tls_options
from shared.topics import TopicName, Topics


def test_sasl_without_a_username_names_the_variable() -> None:
    with pytest.raises(ValidationError, match="HOSTISO_KAFKA_SASL_USERNAME is required"):
        ServiceSettings(dev=True, kafka_security_protocol="SASL_SSL", kafka_sasl_password="pw")


def test_sasl_without_a_password_names_the_variable() -> None:
    with pytest.raises(ValidationError, match="HOSTISO_KAFKA_SASL_PASSWORD is required"):
        ServiceSettings(dev=True, kafka_security_protocol="SASL_SSL", kafka_sasl_username="u")


def test_an_unknown_protocol_or_mechanism_is_refused() -> None:
    with pytest.raises(ValidationError, match="kafka_security_protocol"):
        ServiceSettings(dev=True, kafka_security_protocol="SASL_PLAINTEXT")
    with pytest.raises(ValidationError, match="kafka_sasl_mechanism"):
        ServiceSettings(dev=True, kafka_sasl_mechanism="PLAIN")


def test_plaintext_outside_dev_mode_is_logged(caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.WARNING, logger="shared.config"):
        ServiceSettings(dev=False)
    assert "HOSTISO_KAFKA_SECURITY_PROTOCOL=PLAINTEXT outside dev mode" in caplog.text
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="shared.config"):
        ServiceSettings(dev=True)
    assert caplog.text == ""


def test_the_password_is_secret_in_reprs() -> None:
    settings = ServiceSettings(
        dev=True,
        kafka_security_protocol="SASL_SSL",
        kafka_sasl_username="isolation",
        kafka_sasl_password="very-secret-value",
    )
    assert "very-secret-value" not in repr(settings)


def test_client_options_authenticate_and_verify_the_broker() -> None:
    settings = ServiceSettings(
        dev=True,
        kafka_security_protocol="SASL_SSL",
        kafka_sasl_username="isolation",
        kafka_sasl_password="pw",
    )
    options = kafka_client_options(settings)
    assert options["security_protocol"] == "SASL_SSL"
    assert options["sasl_mechanism"] == "SCRAM-SHA-512"
    assert (options["sasl_plain_username"], options["sasl_plain_password"]) == ("isolation", "pw")
    context = options["ssl_context"]
    assert isinstance(context, ssl.SSLContext)
    assert context.verify_mode == ssl.CERT_REQUIRED and context.check_hostname
    assert kafka_client_options(ServiceSettings(dev=True)) == {}
    assert "sasl_mechanism" not in kafka_security_options("SSL")


def test_redis_tls_options_only_for_rediss() -> None:
    assert redis_tls_options("redis://u:p@h:1/0", "/ca.pem") == {}
    tls = redis_tls_options("rediss://u:p@h:1/0", "/ca.pem")
    assert tls["ssl_ca_certs"] == "/ca.pem" and tls["ssl_cert_reqs"] == "required"


def test_acls_follow_the_design_table() -> None:
    bindings = acl_bindings(Topics("p."))
    writes = {(b.principal, b.name) for b in bindings if b.operation.name == "WRITE"}
    reads = {(b.principal, b.name) for b in bindings if b.operation.name == "READ"}
    writers = {p for p, t in writes if t == "p.enforcer.commands.v1"}
    assert writers == {"isolation"}
    assert {p for p, t in writes if t == "p.isolation.requests.v1"} == {"isolation", "platform"}
    assert {p for p, t in writes if t == "p.settings.allowlist.v1"} == {"settings"}
    assert {p for p, t in reads if t == "p.enforcer.commands.priority.v1"} == {"enforcer"}
    for service in ("settings", "isolation", "enforcer"):
        assert TopicName.AUDIT in PRODUCES[service] and TopicName.DLQ in PRODUCES[service]
    assert CONSUMES["platform"] == () and CONSUMES["settings"] == ()
    transactional = {
        (b.principal, b.name, b.pattern.name)
        for b in bindings
        if b.resource.name == "TRANSACTIONAL_ID"
    }
    # Prefixed: one rule covers every outbox shard's id (p.settings-relay-00, -01, ...).
    assert transactional == {("settings", "p.settings-relay", "PREFIXED")}
    groups = {(b.principal, b.name) for b in bindings if b.resource.name == "GROUP"}
    assert ("enforcer", "p.enforcer-priority") in groups
    assert not any(p == "isolation" and g.startswith("p.enforcer") for p, g in groups)


def test_redis_service_rules_refuse_dangerous_commands_and_other_namespaces() -> None:
    rules = redis_acl_rules("isolation", "hostiso:")
    assert "~hostiso:isolation:*" in rules and rules.endswith("-@dangerous")
    assert "+@pubsub" not in rules and "&" not in rules
    assert "&hostiso:enforcer:*" in redis_acl_rules("enforcer", "hostiso:")

import base64

import pytest

from agent.verification import PinnedKey, PolicyRefusedError, SigningKeyError, verify_policy
from tests.unit.agent.policies import TestSigner, make_policy


@pytest.fixture(scope="module")
def signer() -> TestSigner:
    return TestSigner()


@pytest.fixture(scope="module")
def key(signer: TestSigner) -> PinnedKey:
    return PinnedKey.from_base64(signer.public_b64)


def test_policy_signed_for_this_endpoint_with_higher_sequence_is_accepted(
    signer: TestSigner, key: PinnedKey
) -> None:
    signed = signer.sign(make_policy(sequence=5))
    verify_policy(signed, key=key, account_id="acct-1", endpoint_id="ep-1", last_applied_sequence=4)


def test_tampered_allowlist_is_refused_as_bad_signature(signer: TestSigner, key: PinnedKey) -> None:
    signed = signer.sign(make_policy(sequence=5))
    tampered = signed.model_copy(
        update={"policy": signed.policy.model_copy(update={"allowed_outbound": ()})}
    )
    with pytest.raises(PolicyRefusedError) as refused:
        verify_policy(
            tampered, key=key, account_id="acct-1", endpoint_id="ep-1", last_applied_sequence=0
        )
    assert refused.value.kind == "signature"


def test_signature_from_another_key_with_our_key_id_is_refused(key: PinnedKey) -> None:
    forged = TestSigner().sign(make_policy()).model_copy(update={"key_id": key.key_id})
    with pytest.raises(PolicyRefusedError) as refused:
        verify_policy(
            forged, key=key, account_id="acct-1", endpoint_id="ep-1", last_applied_sequence=0
        )
    assert refused.value.kind == "signature"


def test_unknown_key_id_is_refused(key: PinnedKey) -> None:
    other = TestSigner().sign(make_policy())
    with pytest.raises(PolicyRefusedError) as refused:
        verify_policy(
            other, key=key, account_id="acct-1", endpoint_id="ep-1", last_applied_sequence=0
        )
    assert refused.value.kind == "key"


def test_garbage_signature_is_refused(signer: TestSigner, key: PinnedKey) -> None:
    signed = signer.sign(make_policy()).model_copy(update={"signature": "%%%not base64"})
    with pytest.raises(PolicyRefusedError) as refused:
        verify_policy(
            signed, key=key, account_id="acct-1", endpoint_id="ep-1", last_applied_sequence=0
        )
    assert refused.value.kind == "signature"


def test_policy_for_another_endpoint_is_refused(signer: TestSigner, key: PinnedKey) -> None:
    signed = signer.sign(make_policy(endpoint_id="ep-2"))
    with pytest.raises(PolicyRefusedError) as refused:
        verify_policy(
            signed, key=key, account_id="acct-1", endpoint_id="ep-1", last_applied_sequence=0
        )
    assert refused.value.kind == "endpoint"
    assert "ep-2" in refused.value.reason


@pytest.mark.parametrize("sequence", [3, 4])
def test_older_or_equal_sequence_is_refused(
    signer: TestSigner, key: PinnedKey, sequence: int
) -> None:
    signed = signer.sign(make_policy(sequence=sequence))
    with pytest.raises(PolicyRefusedError) as refused:
        verify_policy(
            signed, key=key, account_id="acct-1", endpoint_id="ep-1", last_applied_sequence=4
        )
    assert refused.value.kind == "sequence"


@pytest.mark.parametrize("value", ["", "not-base64!", base64.b64encode(b"short").decode()])
def test_malformed_public_key_is_a_configuration_error(value: str) -> None:
    with pytest.raises(SigningKeyError):
        PinnedKey.from_base64(value)

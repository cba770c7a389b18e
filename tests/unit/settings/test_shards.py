"""Shard layout of the settings keys: every script's keys share one Redis Cluster hash slot."""

from __future__ import annotations

import pytest
from redis.crc import key_slot

from services.settings.adapters.redis_store import RedisAllowlistStore, shard_tag
from shared.redis import Keys

ACCOUNTS = [f"acct-{i}" for i in range(2000)] + ["a{b}c", "{}", "é-ü", "acct-1\n"]


class _NoRedis:
    """register_script is all the store asks of its client when it is built."""

    def register_script(self, script: str) -> object:
        return object()


def store(shards: int = 16) -> RedisAllowlistStore:
    keys = Keys("hostiso:")
    return RedisAllowlistStore(_NoRedis(), lambda *p: keys("settings", *p), shards=shards)  # type: ignore[arg-type]


def test_every_key_of_a_commit_is_in_its_shards_slot() -> None:
    s = store()
    for account in ACCOUNTS:
        shard = s.shard_of(account)
        slots = {key_slot(k.encode()) for k in s.commit_keys(account)}
        assert slots == {key_slot(s.lease_key(shard).encode())}, account


def test_a_mark_of_many_accounts_of_one_shard_is_in_one_slot() -> None:
    s = store()
    for shard in range(s.shards):
        members = [a for a in ACCOUNTS if s.shard_of(a) == shard]
        assert members, f"shard {shard} has no account among the samples"
        slots = {key_slot(k.encode()) for k in s.mark_keys(shard, members)}
        assert len(slots) == 1


def test_an_account_id_with_braces_cannot_move_its_keys_to_another_slot() -> None:
    # The shard tag comes before the account id in every key, so only it is the hash tag.
    s = store()
    tag = shard_tag(s.shard_of("a{b}c"))
    assert all(f":{tag}:" in k for k in s.commit_keys("a{b}c"))


def test_accounts_spread_over_every_shard_and_the_shard_is_stable() -> None:
    s = store()
    counts = [0] * s.shards
    for account in ACCOUNTS:
        counts[s.shard_of(account)] += 1
    assert min(counts) > len(ACCOUNTS) / s.shards / 2
    assert s.shard_of("acct-42") == store().shard_of("acct-42")  # crc32: the same everywhere


def test_keys_stay_in_the_services_acl_namespace() -> None:
    # Redis' ACL user of the service is confined to <prefix>settings:*.
    s = store()
    assert all(k.startswith("hostiso:settings:{set") for k in s.commit_keys("acct-1"))
    assert s.outbox_key(3) == "hostiso:settings:{set03}:outbox"
    assert s.lease_key(3) == "hostiso:settings:{set03}:relay:leader"


def test_shards_must_be_positive() -> None:
    with pytest.raises(ValueError):
        store(0)

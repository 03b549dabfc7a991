"""The parts of disaggregated prefill that need no model: kv_transfer_params parsing, the
authenticated side channel, leases, descriptor runs and layout compatibility."""
import time

import msgpack
import pytest

from pagoda.kv_transfer import side_channel
from pagoda.kv_transfer.leases import LeaseTable
from pagoda.core.remote_kv import RemotePrefill, parse_kv_transfer_params

GOOD = RemotePrefill("eng", "r#1", (3, 4, 9), 40, "127.0.0.1", 5555, 17).to_json()


# ---------------------------------------------------------------------- params
def test_params_round_trip():
    parsed = parse_kv_transfer_params(GOOD)
    assert parsed.remote_prefill == RemotePrefill("eng", "r#1", (3, 4, 9), 40, "127.0.0.1",
                                                  5555, 17)
    assert parse_kv_transfer_params({"do_remote_decode": True}).do_remote_decode
    assert parse_kv_transfer_params(None) is None


@pytest.mark.parametrize("change, field", [
    ({"remote_block_ids": []}, "remote_block_ids"),
    ({"remote_block_ids": [1, -2]}, "remote_block_ids"),
    ({"remote_block_ids": [1, True]}, "remote_block_ids"),
    ({"remote_num_tokens": 0}, "remote_num_tokens"),
    ({"remote_num_tokens": "9"}, "remote_num_tokens"),
    ({"remote_port": 70000}, "remote_port"),
    ({"remote_host": ""}, "remote_host"),
    ({"remote_engine_id": None}, "remote_engine_id"),
    ({"first_token_id": -1}, "first_token_id"),
    ({"do_remote_decode": True}, "cannot both be true"),
    ({"do_remote_prefill": "yes"}, "do_remote_prefill"),
])
def test_bad_params_name_the_field(change, field):
    with pytest.raises(ValueError, match=field):
        parse_kv_transfer_params({**GOOD, **change})


def test_params_must_be_an_object():
    with pytest.raises(ValueError, match="object"):
        parse_kv_transfer_params([1, 2])


# ---------------------------------------------------------------- side channel
def _echo(message):
    return {"ok": True, "echo": message.get("x"), "blob": b"\x00\x01"}


def test_side_channel_round_trip_and_wrong_secret():
    server = side_channel.SideChannelServer("127.0.0.1", 0, b"secret", _echo)
    try:
        reply = side_channel.call("127.0.0.1", server.port, b"secret", {"x": [1, 2]})
        assert reply["echo"] == [1, 2] and reply["blob"] == b"\x00\x01"
        with pytest.raises(side_channel.SideChannelError, match="refused"):
            side_channel.call("127.0.0.1", server.port, b"wrong", {"x": 1}, timeout_s=2)
        # The server survives refusals and garbage.
        assert side_channel.call("127.0.0.1", server.port, b"secret", {"x": 3})["echo"] == 3
    finally:
        server.close()


def test_sealed_messages_reject_forgery_staleness_and_garbage():
    sealed = side_channel.seal(b"k", {"op": "pin"})
    assert side_channel.open_sealed(b"k", sealed)["op"] == "pin"
    envelope = msgpack.unpackb(sealed)
    forged = msgpack.packb({"body": envelope["body"].replace(b"pin", b"pan"),
                            "mac": envelope["mac"]})
    with pytest.raises(side_channel.SideChannelError, match="authentication"):
        side_channel.open_sealed(b"k", forged)
    with pytest.raises(side_channel.SideChannelError, match="malformed"):
        side_channel.open_sealed(b"k", b"\xc1not msgpack")
    stale_body = msgpack.packb({"op": "pin", "ts": time.time() - 3600})
    import hashlib
    import hmac
    stale = msgpack.packb({"body": stale_body,
                           "mac": hmac.new(b"k", stale_body, hashlib.sha256).digest()})
    with pytest.raises(side_channel.SideChannelError, match="stale"):
        side_channel.open_sealed(b"k", stale)


def test_secret_is_required(monkeypatch):
    monkeypatch.delenv(side_channel.SECRET_ENV, raising=False)
    with pytest.raises(ValueError, match="--kv-secret"):
        side_channel.resolve_secret(None)
    monkeypatch.setenv(side_channel.SECRET_ENV, "from-env")
    assert side_channel.resolve_secret(None) == b"from-env"


# ---------------------------------------------------------------------- leases
def test_leases_expire_and_pins_extend_them():
    table = LeaseTable(lease_seconds=10)
    table.add("a", now=0)
    table.add("b", now=0)
    assert table.pin("a", 30, now=5)           # a now lives until 35
    assert table.pop_expired(now=11) == ["b"]
    assert not table.pin("b", 30, now=11)      # gone: a reader must not use it
    assert table.pop_expired(now=34) == []
    assert table.release("a") and not table.release("a")
    assert table.num_expired == 1 and table.num_released == 1 and len(table) == 0


# ------------------------------------------------------------ NIXL descriptors
def test_block_runs_merge_only_where_both_sides_are_consecutive():
    from pagoda.kv_transfer.nixl import _runs

    assert _runs([4, 5, 6, 9, 10], [0, 1, 2, 3, 4]) == [(4, 0, 3), (9, 3, 2)]
    assert _runs([1, 2], [7, 5]) == [(1, 7, 1), (2, 5, 1)]
    assert _runs([], []) == []


def test_layout_mismatch_names_the_difference():
    import torch

    from pagoda.kv_transfer.nixl import KVLayout

    a = KVLayout.of([torch.zeros(2, 4, 8, 3, 16) for _ in range(2)], "m:float32")
    b = KVLayout.of([torch.zeros(2, 4, 16, 3, 16) for _ in range(2)], "m:float32")
    c = KVLayout.of([torch.zeros(2, 9, 8, 3, 16) for _ in range(2)], "m:float32")
    assert "block_size" in a.mismatch(b)
    assert a.mismatch(c) is None                # pool sizes may differ
    assert KVLayout.from_json(a.to_json()) == a
    assert a.block_addr(1, 1, 2) == a.layer_addrs[1] + (4 + 2) * 8 * 3 * 16 * 4


def test_signature_binds_every_field_and_the_prompt():
    remote = RemotePrefill("eng", "r#1", (3, 4), 9, "127.0.0.1", 5555, 17)
    prompt = list(range(9))
    signed = remote.signed(b"k", prompt)
    assert signed.verify(b"k", prompt)
    assert not signed.verify(b"other-secret", prompt)
    assert not signed.verify(b"k", prompt[:-1] + [99])
    parsed = parse_kv_transfer_params(signed.to_json()).remote_prefill
    assert parsed == signed and parsed.verify(b"k", prompt)
    for change in ({"remote_port": 5556}, {"remote_block_ids": [3, 5]},
                   {"first_token_id": 18}):
        forged = parse_kv_transfer_params({**signed.to_json(), **change}).remote_prefill
        assert not forged.verify(b"k", prompt)

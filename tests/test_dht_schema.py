"""DHT records from untrusted peers: known fields typed, unknown ones ignored, malformed ones skipped."""

from __future__ import annotations

from swarm.dht.schema import ModelInfo, ServerInfo, ServerState, block_key


def test_round_trip_and_unknown_fields_ignored():
    info = ServerInfo(ServerState.ONLINE, 3, 9, dtype="bfloat16", public_name="alice", cache_tokens_left=100,
                      next_pings={"peer": 0.01}, adapters=("org/lora", "style"))
    data = info.to_dict()
    assert ServerInfo.from_dict(data) == info
    assert ServerInfo.from_dict({**data, "field_from_the_future": [1, 2]}) == info
    # adapter names that are not strings are dropped; a list that is not one is ignored
    assert ServerInfo.from_dict({**data, "adapters": ["a", 3, None]}).adapters == ("a",)
    assert ServerInfo.from_dict({**data, "adapters": "a"}).adapters == ()


def test_wrongly_typed_optional_fields_fall_back_to_defaults():
    info = ServerInfo.from_dict({"state": 2, "start": 0, "end": 4, "dtype": 5, "cache_tokens_left": "lots",
                                 "throughput": float("nan"), "next_pings": {"a": "fast", "b": 0.2}})
    assert info == ServerInfo(ServerState.ONLINE, 0, 4, next_pings={"b": 0.2})


def test_malformed_records_are_skipped():
    for bad in (None, [2, 0, 4], {"state": 7, "start": 0, "end": 4}, {"state": 2, "start": 5, "end": 4},
                {"state": 2, "start": True, "end": 4}, {"state": 2, "end": 4}):
        assert ServerInfo.from_dict(bad) is None


def test_model_info_and_keys():
    assert ModelInfo.from_dict(ModelInfo(30, "org/name", "llama").to_dict()) == ModelInfo(30, "org/name", "llama")
    assert ModelInfo.from_dict({"num_blocks": 0}) is None
    assert block_key("org/model", 7) == "org/model.7"

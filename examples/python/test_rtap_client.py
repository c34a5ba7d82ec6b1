"""The Python client against a live rtap-server fed by rtap-simulator
(RTAP_ADDR, default 127.0.0.1:50051): real results, real errors."""

import os
import uuid

import grpc
import pytest

from rtap_client import Rtap, bad_request_fields


@pytest.fixture(scope="module")
def rtap() -> Rtap:
    client = Rtap(os.environ.get("RTAP_ADDR", "127.0.0.1:50051"))
    assert client.serving()
    return client


def test_created_users_and_products_get_ids_and_duplicates_are_already_exists(rtap):
    suffix = uuid.uuid4().hex[:8]
    user = rtap.create_user("Grace", f"Hopper-{suffix}")
    assert user.id > 0
    assert user.create_time.seconds > 0
    with pytest.raises(grpc.RpcError) as duplicate:
        rtap.create_user("grace", f"hopper-{suffix}")
    assert duplicate.value.code() == grpc.StatusCode.ALREADY_EXISTS
    product = rtap.create_product(f"Compiler {suffix}", "software", 9.5)
    assert product.id > 0 and product.price == 9.5


def test_invalid_fields_come_back_as_bad_request_details(rtap):
    with pytest.raises(grpc.RpcError) as invalid:
        rtap.create_product("", "software", -1.0)
    assert invalid.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert set(bad_request_fields(invalid.value)) >= {"product.name", "product.price"}


def test_every_query_returns_the_live_traffic(rtap):
    counts = rtap.event_counts()
    assert sum(b.total for b in counts.buckets) > 0
    assert rtap.unique_users().unique_users > 0
    top = rtap.top_products(5)
    assert 0 < len(top.products) <= 5
    values = [p.value for p in top.products]
    assert values == sorted(values, reverse=True)
    engagement = rtap.engagement(top.products[0].product_id)
    # Live traffic keeps counting between the two calls: never fewer.
    assert engagement.product_views >= top.products[0].value
    assert engagement.unique_users > 0
    funnel = rtap.funnel()
    assert funnel.total.sessions > 0
    assert 0 <= funnel.total.conversion_rate <= 1


def test_a_subscription_sends_a_snapshot_then_deltas_in_sequence(rtap):
    messages = []
    with pytest.raises(grpc.RpcError) as ended:
        for message in rtap.subscribe_event_counts(6.0):
            messages.append(message)
    assert ended.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    assert messages[0].WhichOneof("update") == "snapshot"
    assert [m.sequence for m in messages] == list(range(1, len(messages) + 1))
    kinds = {m.WhichOneof("update") for m in messages[1:]}
    assert "delta" in kinds, f"the simulator's traffic arrives as deltas: {kinds}"
    assert all(m.watermark.offsets for m in messages)


def test_a_cut_subscription_resumes_where_it_stopped(rtap):
    first = rtap.subscribe_event_counts(30.0)
    received = []
    for message in first:
        received.append(message)
        if len(received) == 3:
            break
    first.cancel()  # the connection drops, as far as this stream knows
    resumed = list(rtap.follow_event_counts(3.0, resume_token=received[-1].resume_token))
    assert resumed, "the resumed stream sends messages"
    sequences = [m.sequence for m in received + resumed]
    assert sequences == list(range(1, len(sequences) + 1)), "none missed, none repeated"
    assert all(m.WhichOneof("update") != "snapshot" for m in resumed), "replayed, not resynced"


@pytest.mark.skipif(not os.environ.get("RTAP_API_KEY"), reason="the server requires no key")
def test_a_call_with_an_unknown_key_is_unauthenticated():
    stranger = Rtap(os.environ.get("RTAP_ADDR", "127.0.0.1:50051"), api_key="rtap_0123456789abcdef_" + "A" * 43)
    with pytest.raises(grpc.RpcError) as error:
        stranger.event_counts()
    assert error.value.code() == grpc.StatusCode.UNAUTHENTICATED

"""A small RTAP client in Python, on stubs generated from proto/ (generate.py).

    python rtap_client.py 127.0.0.1:50051

(with RTAP_API_KEY=<key> when the server requires keys, and RTAP_TLS_CA=<CA
file> when it serves TLS) creates a user and a product, runs each kind of analytics query over the
last hour, and follows a subscription for a few messages, resuming it with
its last token if the connection drops. It shows the health service,
deadlines on every call, and how to read the google.rpc.BadRequest details
of an INVALID_ARGUMENT.
"""

import collections
import os
import sys
import time
import uuid

import grpc
from google.protobuf import duration_pb2
from google.rpc import error_details_pb2
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_status import rpc_status

import generate

sys.path.insert(0, str(generate.generate()))

from rtap.v1 import analytics_pb2, analytics_pb2_grpc  # noqa: E402
from rtap.v1 import catalog_pb2, catalog_pb2_grpc  # noqa: E402

#: Deadline of unary calls, in seconds.
DEADLINE = 5.0


def last_hour() -> analytics_pb2.TimeWindow:
    """A rolling window: the last hour."""
    return analytics_pb2.TimeWindow(trailing=duration_pb2.Duration(seconds=3600))


class _CallDetails(
    collections.namedtuple(
        "_CallDetails", ("method", "timeout", "metadata", "credentials", "wait_for_ready", "compression")
    ),
    grpc.ClientCallDetails,
):
    pass


class BearerKey(grpc.UnaryUnaryClientInterceptor, grpc.UnaryStreamClientInterceptor):
    """Sends `authorization: Bearer <key>` with every call (plaintext or TLS)."""

    def __init__(self, key: str):
        self._header = ("authorization", f"Bearer {key}")

    def _with_key(self, details):
        return _CallDetails(
            details.method,
            details.timeout,
            list(details.metadata or []) + [self._header],
            details.credentials,
            details.wait_for_ready,
            details.compression,
        )

    def intercept_unary_unary(self, continuation, details, request):
        return continuation(self._with_key(details), request)

    def intercept_unary_stream(self, continuation, details, request):
        return continuation(self._with_key(details), request)


class Rtap:
    """Stubs of every RTAP service on one channel. `api_key` and `tls_ca`
    (a PEM file) default to RTAP_API_KEY and RTAP_TLS_CA."""

    def __init__(self, address: str, api_key: str | None = None, tls_ca: str | None = None):
        api_key = api_key or os.environ.get("RTAP_API_KEY")
        tls_ca = tls_ca or os.environ.get("RTAP_TLS_CA")
        if tls_ca:
            with open(tls_ca, "rb") as ca:
                credentials = grpc.ssl_channel_credentials(root_certificates=ca.read())
            channel = grpc.secure_channel(address, credentials)
        else:
            channel = grpc.insecure_channel(address)
        self.channel = grpc.intercept_channel(channel, BearerKey(api_key)) if api_key else channel
        self.health = health_pb2_grpc.HealthStub(self.channel)
        self.users = catalog_pb2_grpc.UserServiceStub(self.channel)
        self.products = catalog_pb2_grpc.ProductServiceStub(self.channel)
        self.analytics = analytics_pb2_grpc.AnalyticsServiceStub(self.channel)

    def serving(self) -> bool:
        """Whether the whole server reports SERVING."""
        reply = self.health.Check(health_pb2.HealthCheckRequest(service=""), timeout=DEADLINE)
        return reply.status == health_pb2.HealthCheckResponse.SERVING

    def create_user(self, first_name: str, last_name: str) -> catalog_pb2.User:
        request = catalog_pb2.CreateUserRequest(
            user=catalog_pb2.User(first_name=first_name, last_name=last_name)
        )
        return self.users.CreateUser(request, timeout=DEADLINE).user

    def create_product(self, name: str, category: str, price: float) -> catalog_pb2.Product:
        request = catalog_pb2.CreateProductRequest(
            product=catalog_pb2.Product(name=name, category=category, price=price)
        )
        return self.products.CreateProduct(request, timeout=DEADLINE).product

    def event_counts(self):
        return self.analytics.GetEventCounts(
            analytics_pb2.GetEventCountsRequest(window=last_hour()), timeout=DEADLINE
        )

    def unique_users(self):
        return self.analytics.GetUniqueUsers(
            analytics_pb2.GetUniqueUsersRequest(window=last_hour()), timeout=DEADLINE
        )

    def engagement(self, product_id: int):
        return self.analytics.GetEngagement(
            analytics_pb2.GetEngagementRequest(window=last_hour(), product_id=product_id),
            timeout=DEADLINE,
        )

    def top_products(self, limit: int = 10):
        return self.analytics.GetTopProducts(
            analytics_pb2.GetTopProductsRequest(
                window=last_hour(),
                ranking=analytics_pb2.PRODUCT_RANKING_VIEWS,
                limit=limit,
            ),
            timeout=DEADLINE,
        )

    def funnel(self):
        return self.analytics.GetFunnel(
            analytics_pb2.GetFunnelRequest(window=last_hour()), timeout=DEADLINE
        )

    def subscribe_event_counts(self, seconds: float, resume_token: bytes = b""):
        """Follows the last hour's event counts; the stream ends after
        `seconds` (its deadline). With the `resume_token` of the last message
        of a stream that was cut, it continues that stream."""
        request = analytics_pb2.SubscribeRequest(
            event_counts=analytics_pb2.GetEventCountsRequest(window=last_hour()),
            heartbeat_interval=duration_pb2.Duration(seconds=1),
            resume_token=resume_token,
        )
        return self.analytics.Subscribe(request, timeout=seconds)

    def follow_event_counts(self, seconds: float, resume_token: bytes = b""):
        """Yields the messages of the last hour's event counts for `seconds`.
        When the connection drops, it subscribes again with the last
        message's resume token (waiting 0.2 s, doubling up to 5 s), so the
        stream goes on with the messages missed: none lost, none repeated
        (or a snapshot marked `resync`, with its reason, when the server
        cannot replay them)."""
        deadline = time.monotonic() + seconds
        token, delay = resume_token, 0.2
        while (left := deadline - time.monotonic()) > 0:
            try:
                for message in self.subscribe_event_counts(left, token):
                    token, delay = message.resume_token, 0.2
                    yield message
                return
            except grpc.RpcError as error:
                if error.code() == grpc.StatusCode.DEADLINE_EXCEEDED:
                    return
                if error.code() == grpc.StatusCode.INVALID_ARGUMENT and token:
                    token = b""  # a token the server refuses: start afresh
                elif error.code() not in RESUMABLE:
                    raise
            time.sleep(min(delay, max(deadline - time.monotonic(), 0)))
            delay = min(delay * 2, 5.0)


#: Codes after which a subscription is worth resuming.
RESUMABLE = {grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.CANCELLED, grpc.StatusCode.INTERNAL, grpc.StatusCode.UNKNOWN}


def bad_request_fields(error: grpc.RpcError) -> list[str]:
    """The fields named by the google.rpc.BadRequest detail of an error."""
    status = rpc_status.from_call(error)
    fields = []
    for detail in status.details if status else []:
        if detail.Is(error_details_pb2.BadRequest.DESCRIPTOR):
            bad_request = error_details_pb2.BadRequest()
            detail.Unpack(bad_request)
            fields.extend(v.field for v in bad_request.field_violations)
    return fields


def main(address: str) -> None:
    rtap = Rtap(address)
    print("serving:", rtap.serving())
    suffix = uuid.uuid4().hex[:8]
    user = rtap.create_user("Ada", f"Lovelace-{suffix}")
    product = rtap.create_product(f"Analytical Engine {suffix}", "machines", 1843.0)
    print("created user", user.id, "and product", product.id)
    try:
        rtap.create_product("", "machines", -1.0)
    except grpc.RpcError as error:
        print(error.code().name, "on fields", bad_request_fields(error))
    counts = rtap.event_counts()
    print("events in the last hour:", sum(b.total for b in counts.buckets))
    print("unique users:", rtap.unique_users().unique_users)
    top = rtap.top_products(3)
    print("top products:", [(p.product_id, p.value) for p in top.products])
    if top.products:
        engagement = rtap.engagement(top.products[0].product_id)
        print("average dwell per user:", engagement.average_dwell_time_per_user.ToTimedelta())
    print("conversion:", rtap.funnel().total.conversion_rate)
    for message in rtap.follow_event_counts(3.5):
        print("message", message.sequence, message.WhichOneof("update"))


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else "127.0.0.1:50051")

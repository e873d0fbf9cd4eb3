"""Section 14 of microsocket.py: the HTTP routes, in-process.

A route is a function from a Request to a Response, so these tests call App.handle with requests
built by make_request, on a broker driven by BrokerDriver, and never open a socket. How responses
travel on a connection (keep-alive, HEAD, errors that close it) is test_server.py's business.
"""

from __future__ import annotations

import json

import microsocket as ms
from conftest import make_request


def app_of(d) -> ms.App:
    """The App the server would build around the driver's broker."""
    return d.app()


def respond(d, app: ms.App, request: ms.Request) -> ms.Response:
    """app.handle(request) as a Response: a PendingResponse (a publishing route) is followed until the backbone
    answered, which with the in-memory backbone is at once, before anything else runs."""
    response = app.handle(request)
    if not isinstance(response, ms.PendingResponse):
        return response
    got: list[ms.Response] = []
    response.then(got.append)
    if isinstance(d.backbone, ms.MemoryBackbone):
        assert len(got) == 1, "the in-memory backbone answers at once"
    d.settle()
    (answer,) = got
    assert isinstance(answer, ms.Response)
    return answer


def test_index_redirects_to_docs(broker_driver):
    """GET / is a 302 to /docs."""
    response = app_of(broker_driver()).handle(make_request("GET", "/"))
    assert (response.status, dict(response.headers)["Location"]) == (302, "/docs")


def test_healthz(broker_driver):
    """GET /healthz answers 200 "ok"."""
    response = app_of(broker_driver()).handle(make_request("GET", "/healthz"))
    assert (response.status, response.body.strip()) == (200, b"ok")


def test_stats_is_what_the_broker_counts(broker_driver):
    """GET /stats is the broker's counters as JSON, as they are at the time of the request."""
    d = broker_driver()
    app = app_of(d)
    d.connect("alice", topics=["t"])
    d.server_publish("t", 2)
    response = app.handle(make_request("GET", "/stats"))
    assert response.status == 200 and response.content_type.startswith("application/json")
    assert json.loads(response.body) == json.loads(json.dumps(d.stats()))
    assert json.loads(response.body)["published"] == 2


def test_route_errors_are_json_with_their_headers(broker_driver):
    """An unknown path is 404, a wrong method 405 with Allow, a page request on /ws 426 with Upgrade: all JSON {"error": ...}."""
    app = app_of(broker_driver())
    for request, status, headers in (
        (make_request("GET", "/nope"), 404, {}),
        (make_request("GET", "/publish"), 405, {"Allow": "POST"}),
        (make_request("GET", "/ws"), 426, {"Upgrade": "websocket", "Connection": "Upgrade", "Sec-WebSocket-Version": "13"}),
    ):
        response = app.handle(request)
        assert response.status == status, request.path
        assert headers.items() <= dict(response.headers).items()
        assert response.content_type.startswith("application/json")
        assert isinstance(json.loads(response.body)["error"], str)


def test_demo_publish(broker_driver):
    """GET /demo/publish/{topic}?k=v publishes {"k": "v"} as user demo with a new seqNo and reports the subscribers it reached."""
    d = broker_driver()
    app = app_of(d)
    response = respond(d, app, make_request("GET", "/demo/publish/prices?k=v"))
    first = json.loads(response.body)
    assert response.status == 200 and isinstance(first.pop("messageId"), str)
    assert first == {"ok": True, "topic": "prices", "seqNo": 1, "subscribers": 0}
    sub = d.connect("alice", topics=["prices"])
    second = json.loads(respond(d, app, make_request("GET", "/demo/publish/prices?k=v")).body)
    assert (second["seqNo"], second["subscribers"]) == (2, 1)
    assert d.take(sub) == [{"type": "message", "topic": "prices", "seqNo": 2, "messageId": second["messageId"], "data": {"k": "v"}}]


def test_demo_publish_off(broker_driver):
    """With demo=False, /demo/publish/{topic} is 404 and publishes nothing."""
    d = broker_driver(demo=False)
    assert app_of(d).handle(make_request("GET", "/demo/publish/prices?k=v")).status == 404
    assert d.stats()["published"] == 0


def test_post_publish(broker_driver):
    """POST /publish needs a Bearer token, a JSON object and a valid topic; it dedups by messageId per user."""
    d = broker_driver()
    app = app_of(d)

    def post(body: bytes, *headers: str):
        response = respond(d, app, make_request("POST", "/publish", "Host: x", *headers, body=body))
        return response.status, {k.lower(): v for k, v in response.headers}, json.loads(response.body)

    as_alice, as_bob = "Authorization: Bearer alice", "Authorization: bearer bob"
    ok = json.dumps({"topic": "t", "messageId": "m1", "data": {"x": 1}}).encode()
    for headers in ((), ("Authorization: Basic YTpi",), ("Authorization: Bearer ",)):
        status, got_headers, data = post(ok, *headers)
        assert status == 401 and got_headers["www-authenticate"].lower().startswith("bearer") and "error" in data
    for bad in (b"{nope", b"\xff", b"[1]", b'{"topic": "two words", "data": 1}', b'{"topic": "t", "messageId": 5}', b'{"data": 1}'):
        status, _, data = post(bad, as_alice)
        assert status == 400 and "error" in data, bad
    assert d.stats()["published"] == 0
    assert post(ok, as_alice)[::2] == (200, {"status": "ok", "messageId": "m1", "seqNo": 1})
    assert post(ok, as_alice)[::2] == (200, {"status": "duplicate", "messageId": "m1", "seqNo": 1})
    assert post(ok, as_bob)[::2] == (200, {"status": "ok", "messageId": "m1", "seqNo": 2})
    status, _, data = post(b'{"topic": "t", "data": null}', as_alice)
    assert (status, data["status"], data["seqNo"]) == (200, "ok", 3) and data["messageId"]


def test_head_demo_publish_does_not_publish(broker_driver):
    """HEAD has no side effect: HEAD /demo/publish/{topic} is 405 (Allow: GET) and publishes nothing, while HEAD works on the pages."""
    d = broker_driver()
    app = app_of(d)
    response = app.handle(make_request("HEAD", "/demo/publish/prices?k=v"))
    assert response.status == 405 and ("Allow", "GET") in response.headers
    assert d.stats()["published"] == 0
    assert app.handle(make_request("HEAD", "/healthz")).status == 200

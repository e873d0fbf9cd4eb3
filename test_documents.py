"""The documents: docs.html, /openapi.json, /openapi and /asyncapi.json, checked against the server itself.

Every message type, error code, close code and route the server has is documented, and what is
documented but not built yet is marked `class="planned"`; every `$ref` resolves; every example
validates against its own schema (with the small JSON Schema validator below) and is accepted by
a live server.
"""

from __future__ import annotations

import asyncio
import collections
import html
import json
import os
import re
import urllib.parse

import pytest

import microsocket as ms
from conftest import HERE, BrokerDriver, SCRIPT, http_request, recv_json, run


with open(os.path.join(HERE, "docs.html"), encoding="utf-8") as _f:
    DOCS_HTML = _f.read()
del _f


HTTP_METHODS = ("get", "put", "post", "delete", "options", "head", "patch", "trace")
COMPONENT_KEY = re.compile(r"[a-zA-Z0-9.\-_]+\Z")  # OpenAPI 3.1 and AsyncAPI 3.0 component names


# The routes every server has (with demo on); the route table may hold more (/echo with echo on).
ROUTE_PATHS = {"/", "/docs", "/healthz", "/stats", "/openapi.json", "/openapi", "/publish"}
ROUTE_PATHS |= {"/ws", "/ws/sub/{topic}", "/demo/publish/{topic}"}


# -- a small JSON Schema (2020-12) validator: the keywords the documents use, and no others


SCHEMA_KEYWORDS = frozenset(
    ("$ref", "type", "const", "enum", "required", "properties", "items", "additionalProperties",
     "minLength", "maxLength", "minimum", "pattern")
)
SCHEMA_ANNOTATIONS = frozenset(("description", "title", "examples", "example", "default", "format", "$comment"))
_JSON_TYPES = {
    "null": lambda v: v is None,
    "boolean": lambda v: isinstance(v, bool),
    "integer": lambda v: (isinstance(v, int) and not isinstance(v, bool)) or (isinstance(v, float) and v.is_integer()),
    "number": lambda v: isinstance(v, (int, float)) and not isinstance(v, bool),
    "string": lambda v: isinstance(v, str),
    "array": lambda v: isinstance(v, list),
    "object": lambda v: isinstance(v, dict),
}


def json_equal(a, b) -> bool:
    """Equality as JSON means it: true is not 1, 1 is 1.0."""
    if isinstance(a, bool) or isinstance(b, bool):
        return isinstance(a, bool) and isinstance(b, bool) and a == b
    if isinstance(a, (int, float)) and isinstance(b, (int, float)):
        return a == b
    if isinstance(a, list) and isinstance(b, list):
        return len(a) == len(b) and all(json_equal(x, y) for x, y in zip(a, b))
    if isinstance(a, dict) and isinstance(b, dict):
        return a.keys() == b.keys() and all(json_equal(a[k], b[k]) for k in a)
    return type(a) is type(b) and a == b


def resolve_ref(root: dict, ref: str):
    """The node a local `$ref` ("#/a/b~1c") points to; KeyError if it does not resolve."""
    assert ref.startswith("#/"), f"not a local reference: {ref}"
    node = root
    for part in ref[2:].split("/"):
        part = urllib.parse.unquote(part).replace("~1", "/").replace("~0", "~")
        if isinstance(node, list):
            node = node[int(part)]
        elif isinstance(node, dict) and part in node:
            node = node[part]
        else:
            raise KeyError(f"{ref}: no {part!r}")
    return node


def schema_errors(value, schema, root: dict, where: str = "$") -> list[str]:
    """What is wrong with `value` under `schema` (empty when valid); refs resolve inside `root`."""
    if schema is True:
        return []
    if schema is False:
        return [f"{where}: no value is allowed here"]
    unknown = set(schema) - SCHEMA_KEYWORDS - SCHEMA_ANNOTATIONS
    if unknown:
        return [f"{where}: the test's validator does not know {sorted(unknown)}"]
    errors: list[str] = []
    if "$ref" in schema:
        errors += schema_errors(value, resolve_ref(root, schema["$ref"]), root, where)
    if "type" in schema:
        kinds = schema["type"] if isinstance(schema["type"], list) else [schema["type"]]
        if not any(_JSON_TYPES[k](value) for k in kinds):
            errors.append(f"{where}: {value!r} is not of type {kinds}")
            return errors
    if "const" in schema and not json_equal(value, schema["const"]):
        errors.append(f"{where}: {value!r} is not {schema['const']!r}")
    if "enum" in schema and not any(json_equal(value, e) for e in schema["enum"]):
        errors.append(f"{where}: {value!r} is not one of {schema['enum']}")
    if isinstance(value, str):
        if len(value) < schema.get("minLength", 0):
            errors.append(f"{where}: shorter than {schema['minLength']}")
        if "maxLength" in schema and len(value) > schema["maxLength"]:
            errors.append(f"{where}: longer than {schema['maxLength']}")
        if "pattern" in schema:
            pattern = re.sub(r"(?<!\\)\$\Z", r"\\Z", schema["pattern"])  # ECMA `$` is Python's `\Z`
            if not re.search(pattern, value):
                errors.append(f"{where}: {value!r} does not match {schema['pattern']}")
    if _JSON_TYPES["number"](value) and "minimum" in schema and value < schema["minimum"]:
        errors.append(f"{where}: {value} is under {schema['minimum']}")
    if isinstance(value, list) and "items" in schema:
        for i, item in enumerate(value):
            errors += schema_errors(item, schema["items"], root, f"{where}[{i}]")
    if isinstance(value, dict):
        for key in schema.get("required", []):
            if key not in value:
                errors.append(f"{where}: missing {key!r}")
        properties = schema.get("properties", {})
        for key, item in value.items():
            if key in properties:
                errors += schema_errors(item, properties[key], root, f"{where}.{key}")
            elif "additionalProperties" in schema:
                errors += schema_errors(item, schema["additionalProperties"], root, f"{where}.{key}")
    return errors


def iter_refs(node, where: str = "#"):
    """Every ($ref value, location) pair in a document."""
    if isinstance(node, dict):
        for key, value in node.items():
            if key == "$ref" and isinstance(value, str):
                yield value, where
            else:
                yield from iter_refs(value, f"{where}/{key}")
    elif isinstance(node, list):
        for i, value in enumerate(node):
            yield from iter_refs(value, f"{where}/{i}")


def iter_schemas(node):
    """Every schema object under a `schema`/`payload`/`schemas` key, to check the validator covers them."""
    if isinstance(node, dict):
        for key, value in node.items():
            if key in ("example", "examples"):
                continue  # values, not schemas
            if key in ("schema", "payload") and isinstance(value, dict):
                yield value
            elif key == "schemas" and isinstance(value, dict):
                yield from value.values()
            else:
                yield from iter_schemas(value)
    elif isinstance(node, list):
        for value in node:
            yield from iter_schemas(value)


def schema_keywords(schema) -> set[str]:
    """Every keyword used in a schema and its subschemas."""
    if not isinstance(schema, dict):
        return set()
    found = set(schema)
    for key in ("properties",):
        for sub in schema.get(key, {}).values():
            found |= schema_keywords(sub)
    for key in ("items", "additionalProperties"):
        found |= schema_keywords(schema.get(key))
    return found


def asyncapi_schema(doc: dict, kind: str, direction: str) -> dict:
    """The payload schema of one message type in the AsyncAPI document."""
    message = doc["components"]["messages"][f"{direction}.{kind}"]
    return message["payload"]


def table_after(anchor: str) -> str:
    """The HTML of the first table after `id="anchor"` in docs.html."""
    start = DOCS_HTML.index(f'id="{anchor}"')
    return DOCS_HTML[start:DOCS_HTML.index("</table>", start)]


def first_cells(table: str) -> list[str]:
    """What each row's first cell names: its first <code>, else its text, without the "planned" tag; rows may
    carry attributes (class="planned") and a planned cell says so (`<code>ACL_DENIED</code> <span class="tag">planned</span>`)."""
    names = []
    for cell in re.findall(r"<tr\b[^>]*><td>(.*?)</td>", table, re.S):
        cell = re.sub(r"""<span\b[^>]*\bclass\s*=\s*["']tag["'][^>]*>\s*planned\s*</span>""", "", cell, flags=re.I)
        code = re.search(r"<code>(.*?)</code>", cell, re.S)
        names.append((code.group(1) if code else re.sub(r"<[^>]+>", "", cell)).strip())
    return names


def planned_elements() -> list[str]:
    """The HTML of every table row or list item of docs.html with class "planned": what is documented but not built yet."""
    pattern = r"""<(tr|li)\b[^>]*\bclass\s*=\s*["'][^"']*\bplanned\b[^"']*["'][^>]*>(.*?)</\1>"""
    return [m.group(0) for m in re.finditer(pattern, DOCS_HTML, re.S | re.I)]


def emitted_error_codes() -> set[str]:
    """The error codes microsocket.py can send, read from its source: every code a ClientError is made with or Broker._error sends."""
    with open(SCRIPT, encoding="utf-8") as f:
        source = f.read()
    codes = set(re.findall(r'ClientError\(\s*"([A-Z_]+)"', source)) | set(re.findall(r'_error\(\s*\w+,\s*"([A-Z_]+)"', source))
    assert codes == set(ms.ERROR_CODES), codes ^ set(ms.ERROR_CODES)  # ERROR_CODES lists exactly what is sent
    assert not codes & set(ms.PLANNED_ERROR_CODES), codes & set(ms.PLANNED_ERROR_CODES)
    assert {"AUTH_REQUIRED", "INVALID_JSON", "INTERNAL_ERROR", "RATE_LIMITED"} <= codes, "the source scan found too little"
    return codes


def emitted_close_codes() -> set[int]:
    """The close codes the server sends or reports, read from microsocket.py's source: every CloseCode it names,
    but 1005 and 1015 (never on the wire), and 1000 (a peer's normal close, echoed)."""
    with open(SCRIPT, encoding="utf-8") as f:
        source = f.read()
    body = source[source.index("# === 2. Errors"):]  # after the CloseCode table itself
    codes = {int(ms.CloseCode[name]) for name in re.findall(r"\bCloseCode\.([A-Z_]+)", body)}
    codes = (codes - {ms.CloseCode.NO_STATUS_RCVD, ms.CloseCode.TLS_HANDSHAKE}) | {ms.CloseCode.NORMAL_CLOSURE}
    assert {1001, 1002, 1007, 1009, 1011, 4000, 4001, 4002} <= codes, "the source scan found too little"
    return codes


def route_path(pattern: re.Pattern) -> str:
    """An App.routes regex as an OpenAPI path: `/ws/sub/(?P<topic>.+)\\Z` -> `/ws/sub/{topic}`."""
    path = re.sub(r"\(\?P<(\w+)>[^)]*\)", r"{\1}", pattern.pattern)
    path = path.removesuffix(r"\Z").replace("\\.", ".")
    assert not re.search(r"[\\()\[\]*+?^$|]", path), f"cannot turn {pattern.pattern!r} into a path"
    return path


def test_schema_validator_accepts_and_refuses():
    """The test's JSON Schema validator refuses what each keyword forbids and accepts what it allows."""
    root = {"defs": {"n": {"type": "integer", "minimum": 1}}}
    cases = [
        ({"type": "integer"}, 3, True), ({"type": "integer"}, True, False), ({"type": "integer"}, 1.5, False),
        ({"type": ["string", "number"]}, 2.5, True), ({"type": ["string", "number"]}, False, False),
        ({"type": ["integer", "null"]}, None, True), ({"const": True}, 1, False), ({"const": "x"}, "x", True),
        ({"enum": ["ok", "duplicate"]}, "maybe", False), ({"enum": [1]}, 1.0, True),
        ({"type": "string", "minLength": 1}, "", False), ({"type": "string", "maxLength": 2}, "abc", False),
        ({"pattern": r"^[^\s*]+$"}, "a b", False), ({"pattern": r"^[^\s*]+$"}, "a\n", False),
        ({"pattern": r"^[^\s*]+$"}, "prices.btc", True), ({"minimum": 0}, -1, False),
        ({"required": ["a"]}, {"b": 1}, False), ({"properties": {"a": {"type": "string"}}}, {"a": 1}, False),
        ({"items": {"type": "string"}}, ["a", 2], False), ({"additionalProperties": {"type": "integer"}}, {"x": "1"}, False),
        ({"additionalProperties": False}, {"x": 1}, False), ({"$ref": "#/defs/n"}, 0, False), ({"$ref": "#/defs/n"}, 5, True),
        ({"uniqueItems": True}, [], False),  # a keyword the validator does not know is an error, not a pass
    ]
    for schema, value, valid in cases:
        errors = schema_errors(value, schema, root)
        assert (not errors) == valid, (schema, value, errors)


# -- docs.html


def test_docs_lists_every_message_type():
    """docs.html's client and server message tables name exactly the server's CLIENT_TYPES and SERVER_TYPES."""
    assert set(first_cells(table_after("client-messages"))) == set(ms.CLIENT_TYPES)
    assert set(first_cells(table_after("server-messages"))) == set(ms.SERVER_TYPES)
    for kind in ms.CLIENT_TYPES | ms.SERVER_TYPES:
        assert f"<code>{kind}</code>" in DOCS_HTML, kind


def test_docs_lists_every_error_code():
    """docs.html's error table documents every error code the server can send, each with what a client should do; a code it cannot send yet is marked planned."""
    table = table_after("errors")
    documented = set(first_cells(table))
    emitted = emitted_error_codes()
    assert emitted <= documented, f"undocumented error codes: {emitted - documented}"
    spec = set(ms.ERROR_CODES) | set(ms.PLANNED_ERROR_CODES)
    assert documented <= spec, f"error codes the SPEC does not have: {documented - spec}"
    assert documented - emitted <= set(ms.PLANNED_ERROR_CODES), documented - emitted
    for row in re.findall(r"<tr\b[^>]*><td>.*?</tr>", table):
        assert row.count("<td>") == 3 and not re.search(r"<td>\s*</td>", row), row
    planned = planned_elements()
    for code in documented - emitted:
        rows = [row for row in planned if f"<code>{code}</code>" in row]
        assert rows, f"{code} is documented but the server never sends it: mark its row class=\"planned\""
        assert all(re.search(r"\bplanned\b", re.sub(r"<[^>]+>", " ", row), re.I) for row in rows), f"{code}: say 'planned' in its row"
    for code in emitted:
        assert not any(f"<code>{code}</code>" in row for row in planned), f"{code} is built: its row is not planned"


def test_docs_lists_every_close_code():
    """Every close code the server sends or reports is in docs.html's close-code table and the console's explanations; one it cannot send yet is marked planned."""
    table = table_after("close-codes")
    listed = {int(code) for code in first_cells(table)}
    emitted = emitted_close_codes()
    assert emitted <= listed, f"undocumented close codes: {emitted - listed}"
    assert listed <= {int(c) for c in ms.CloseCode}, "a close code the module does not have"
    explained = {int(code) for code in re.findall(r"\b(\d{4}): '", DOCS_HTML)}
    assert emitted <= explained, f"close codes the console does not explain: {emitted - explained}"
    planned = [row for row in planned_elements() if row.lower().startswith("<tr")]
    for code in listed - emitted:
        rows = [row for row in planned if re.search(rf"<td>\s*{code}\b", row)]
        assert rows, f"close code {code} is documented but the server never sends it: mark its row class=\"planned\""
        assert all(re.search(r"\bplanned\b", re.sub(r"<[^>]+>", " ", row), re.I) for row in rows), f"{code}: say 'planned' in its row"
    for code in emitted:
        assert not any(re.search(rf"<td>\s*{code}\b", row) for row in planned), f"close code {code} is built: its row is not planned"


def test_docs_lists_every_endpoint():
    """docs.html's endpoint table names every route of /openapi.json (demo and echo on), WebSockets as ws:// URLs."""
    table = table_after("endpoints")
    doc = ms.openapi_document(ms.Config(demo=True, echo=True))
    for path, item in doc["paths"].items():
        for method, op in item.items():
            if "101" in op["responses"]:
                assert f"<code>ws://HOST:PORT{path}</code>" in table, path
            else:
                assert f"<code>{method.upper()} {path}" in table, (method, path)


def test_docs_console_offers_every_client_message():
    """The console's message-type selector offers every client message type."""
    select = re.search(r'<select id="type">(.*?)</select>', DOCS_HTML, re.S).group(1)
    assert set(re.findall(r"<option>(\w+)</option>", select)) == set(ms.CLIENT_TYPES)


def test_docs_examples_match_the_message_schemas():
    """Every example in docs.html's message tables is valid JSON of its row's type and validates against its schema."""
    doc = ms.asyncapi_document(ms.Config())
    for anchor, direction in (("client-messages", "client"), ("server-messages", "server")):
        rows = re.findall(r"<tr><td><code>(\w+)</code></td>(.*?)</tr>", table_after(anchor), re.S)
        assert rows
        for kind, rest in rows:
            example = json.loads(html.unescape(re.findall(r"<code>(\{.*?\})</code>", rest)[-1]))
            assert example["type"] == kind
            assert schema_errors(example, asyncapi_schema(doc, kind, direction), doc) == [], (kind, example)


def test_docs_makes_no_request_to_another_host():
    """docs.html loads nothing from another host: no absolute URL in src/href/action/fetch/import/url(), no //cdn."""
    absolute = r"""(?:https?:)?//"""
    forbidden = [
        rf"""\b(?:src|href|action|poster|srcset)\s*=\s*["']?\s*{absolute}""",
        rf"""\bfetch\(\s*["'`]\s*{absolute}""",
        rf"""\bimport\s*\(?\s*["'`]\s*{absolute}""",
        rf"""\burl\(\s*["']?\s*{absolute}""",
        r"""@import""",
        r"""//cdn""",
        r"""new\s+(?:WebSocket|EventSource|Worker)\(\s*["'`]""",  # only URLs built from the page's origin
    ]
    for pattern in forbidden:
        assert not re.search(pattern, DOCS_HTML, re.I), pattern
    for match in re.finditer(r"https?://[^\s\"'<>`]+", DOCS_HTML):
        raise AssertionError(f"absolute URL in docs.html: {match.group()}")
    assert "location.host" in DOCS_HTML and "'wss://'" in DOCS_HTML, "WebSocket URLs come from the page's origin"


def test_docs_has_every_id_the_browser_test_uses():
    """Every element id test_browser.py uses (read from its source) exists exactly once in docs.html."""
    with open(os.path.join(HERE, "test_browser.py"), encoding="utf-8") as f:
        source = f.read()
    browser_ids = set(re.findall(r"""["'][^"'\n]*#([A-Za-z][\w-]*)""", source))
    assert {"url", "connect", "state", "log", "send"} <= browser_ids, "the source scan found too little"
    for element_id in browser_ids:
        assert DOCS_HTML.count(f'id="{element_id}"') == 1, element_id
    ids = re.findall(r'\bid="([^"]+)"', DOCS_HTML)
    assert len(ids) == len(set(ids)), "duplicate ids"
    for target in re.findall(r'<label for="([^"]+)"', DOCS_HTML):
        assert target in ids, f"label for a missing id {target!r}"


def test_docs_openapi_and_asyncapi_are_served(server_factory):
    """/docs serves docs.html (from beside the module) as is; /openapi.json and /asyncapi.json are the documents built from the config."""
    server = server_factory()
    status, headers, body = http_request(server.url("/docs"))
    assert (status, headers["content-type"]) == (200, "text/html; charset=utf-8")
    assert body.decode() == DOCS_HTML
    status, headers, body = http_request(server.url("/openapi.json"))
    assert (status, headers["content-type"].split(";")[0]) == (200, "application/json")
    assert json.loads(body) == ms.openapi_document(server.server.config)
    status, headers, body = http_request(server.url("/asyncapi.json"))
    assert (status, headers["content-type"].split(";")[0]) == (200, "application/json")
    assert json.loads(body) == ms.asyncapi_document(server.server.config, f"127.0.0.1:{server.port}")


def test_openapi_page_lists_every_documented_path(server_factory):
    """/openapi is an HTML page listing every documented path, loading no script or style from the network."""
    server = server_factory()
    status, headers, body = http_request(server.url("/openapi"))
    page = body.decode()
    assert status == 200 and headers["content-type"].startswith("text/html")
    paths = ms.openapi_document(server.server.config)["paths"]
    assert ROUTE_PATHS <= set(paths)
    for path in paths:
        assert f"<code>{html.escape(path)}</code>" in page, path
    assert not re.search(r"""(?:src|href)\s*=\s*["']?(?:https?:)?//|@import|url\(\s*["']?(?:https?:)?//""", page, re.I)
    assert "<script" not in page and "//cdn" not in page


# -- OpenAPI


def test_openapi_structure():
    """/openapi.json is OpenAPI 3.1.0 with info, operations that all have described responses, and resolving $refs."""
    for demo in (True, False):
        for echo in (True, False):
            doc = ms.openapi_document(ms.Config(demo=demo, echo=echo))
            assert doc["openapi"] == "3.1.0"
            assert doc["info"]["title"] == "microsocket" and doc["info"]["version"] == ms.__version__
            schemes = doc["components"].get("securitySchemes", {})
            for group in doc["components"].values():
                assert all(COMPONENT_KEY.match(name) for name in group), group.keys()
            for path, item in doc["paths"].items():
                assert path.startswith("/"), path
                for method, op in item.items():
                    assert method in HTTP_METHODS, (path, method)
                    assert op.get("summary"), (path, method)
                    assert op["responses"], (path, method)
                    for status, response in op["responses"].items():
                        assert re.fullmatch(r"[1-5]\d\d|[1-5]XX|default", status), (path, status)
                        assert "$ref" in response or response.get("description"), (path, status)
                    names = {p["name"] for p in item.get("parameters", []) + op.get("parameters", []) if p["in"] == "path"}
                    assert names == set(re.findall(r"\{(\w+)\}", path)), (path, names)
                    for p in op.get("parameters", []):
                        assert p["in"] in ("path", "query", "header", "cookie") and (p["in"] != "path" or p["required"] is True)
                    for requirement in op.get("security", []):
                        assert set(requirement) <= set(schemes), requirement
            for ref, where in iter_refs(doc):
                resolve_ref(doc, ref)  # raises when it does not resolve
            for schema in iter_schemas(doc):
                unknown = schema_keywords(schema) - SCHEMA_KEYWORDS - SCHEMA_ANNOTATIONS
                assert not unknown, f"the test's validator does not know {unknown}"


def test_openapi_documents_every_route_and_nothing_more():
    """With demo and echo on and off, the (path, method) pairs of /openapi.json are exactly App.routes'."""
    for demo in (True, False):
        for echo in (True, False):
            config = ms.Config(demo=demo, echo=echo)
            app = BrokerDriver(demo=demo, echo=echo).app()
            # HEAD is not an operation of its own in the document: it answers as GET, without a body.
            routes = {(route_path(pattern), method.lower()) for pattern, methods, _ in app.routes for method in methods if method != "HEAD"}
            for pattern, methods, _ in app.routes:  # and HEAD goes with every GET that has no side effect
                if "GET" in methods:
                    assert ("HEAD" in methods) == (route_path(pattern) != "/demo/publish/{topic}"), pattern
            doc = ms.openapi_document(config)
            documented = {(path, method) for path, item in doc["paths"].items() for method in item if method in HTTP_METHODS}
            assert documented == routes, (demo, echo, documented ^ routes)
            for path, _ in documented:  # and each documented path is one the router matches
                concrete = path.replace("{topic}", "prices")
                assert any(pattern.match(concrete) for pattern, _, _ in app.routes), path
            assert ("/demo/publish/{topic}", "get") in documented if demo else True
            assert (("/echo", "get") in documented) == echo


def test_openapi_error_responses_reference_the_error_schema():
    """Every 4xx/5xx response of every operation is application/json with the Error schema."""
    doc = ms.openapi_document(ms.Config(demo=True, echo=True))
    error = doc["components"]["schemas"]["Error"]
    assert error["required"] == ["error"] and error["properties"]["error"]["type"] == "string"
    count = 0
    for path, item in doc["paths"].items():
        for method, op in item.items():
            for status, response in op["responses"].items():
                if status[0] in "45":
                    schema = response["content"]["application/json"]["schema"]
                    assert schema == {"$ref": "#/components/schemas/Error"}, (path, method, status)
                    count += 1
    assert count >= 10


def test_openapi_examples_validate_against_their_schemas():
    """Every example in /openapi.json (parameters, request bodies, responses) validates against its schema."""
    doc = ms.openapi_document(ms.Config(demo=True, echo=True))
    count = 0
    for path, item in doc["paths"].items():
        for method, op in item.items():
            holders = [p for p in op.get("parameters", [])]
            holders += list(op.get("requestBody", {}).get("content", {}).values())
            for response in op["responses"].values():
                holders += list(response.get("content", {}).values())
            for holder in holders:
                values = [holder["example"]] if "example" in holder else []
                values += [e["value"] for e in holder.get("examples", {}).values()]
                for value in values:
                    assert "schema" in holder, (path, method, holder)
                    assert schema_errors(value, holder["schema"], doc) == [], (path, method, value)
                    count += 1
    assert count >= 10


def test_openapi_request_examples_validate_and_are_accepted(server_factory):
    """Every request-body example validates against its schema and a live POST of it answers 200 as documented."""
    server = server_factory()
    doc = ms.openapi_document(server.server.config)
    examples = 0
    for path, item in doc["paths"].items():
        for method, op in item.items():
            for media, content in op.get("requestBody", {}).get("content", {}).items():
                assert media == "application/json"
                values = [content["example"]] if "example" in content else []
                values += [e["value"] for e in content.get("examples", {}).values()]
                assert values, f"{method} {path} has no request example"
                for value in values:
                    assert schema_errors(value, content["schema"], doc) == [], (path, value)
                    status, headers, body = http_request(
                        server.url(path), method.upper(), {"Authorization": "Bearer demo", "Content-Type": media},
                        json.dumps(value).encode(),
                    )
                    assert status == 200, body
                    answer = op["responses"]["200"]["content"]["application/json"]["schema"]
                    assert schema_errors(json.loads(body), answer, doc) == [], body
                    examples += 1
    assert examples >= 1


def _live_responses(server, doc: dict):
    """(path, method, status, response object, media, decoded body) for a plain request to every operation, and for the wrong method."""
    for path, item in doc["paths"].items():
        for method, op in item.items():
            concrete = path.replace("{topic}", "prices")
            if "{topic}" in path and not path.startswith("/ws"):
                concrete += "?price=42"
            for verb in (method.upper(), "GET" if method == "post" else "POST"):
                body = json.dumps({"topic": "prices", "data": 1}).encode() if verb == "POST" else b""
                headers = {"Authorization": "Bearer demo", "Content-Type": "application/json"} if body else {}
                status, answer_headers, raw = http_request(server.url(concrete), verb, headers, body)
                assert str(status) in op["responses"], (verb, path, status, raw[:200])
                if verb.lower() != method:
                    assert status == 405 and answer_headers["allow"].startswith(method.upper()), (verb, path)
                media = answer_headers.get("content-type", "").split(";")[0]
                value = json.loads(raw) if media == "application/json" else raw.decode()
                yield path, method, status, op["responses"][str(status)], media, value


def test_openapi_responses_match_the_live_server(server_factory):
    """Every operation, and the same path with the wrong method, answers a documented status whose body validates against its schema."""
    server = server_factory(echo=True)
    doc = ms.openapi_document(server.server.config)
    seen = set()
    for path, method, status, response, media, value in _live_responses(server, doc):
        seen.add((path, method))
        if response.get("content"):
            assert media in response["content"], (path, status, media)
            schema = response["content"][media].get("schema")
            if schema is not None:
                assert schema_errors(value, schema, doc) == [], (path, status, media, str(value)[:200])
    assert len(seen) == sum(len(item) for item in doc["paths"].values())


# -- AsyncAPI


def test_asyncapi_server_is_the_address_the_client_used(server_factory):
    """/asyncapi.json names the host and port of the request, not the configured port 0."""
    server = server_factory()
    status, _, raw = http_request(server.url("/asyncapi.json"))
    assert status == 200
    assert json.loads(raw)["servers"]["local"] == {"host": f"127.0.0.1:{server.port}", "protocol": "ws"}


def test_asyncapi_structure():
    """/asyncapi.json is AsyncAPI 3.0.0 with channels /ws and /ws/sub/{topic} and operations whose refs point into their channel."""
    doc = ms.asyncapi_document(ms.Config())
    assert doc["asyncapi"] == "3.0.0"
    assert doc["info"]["title"] == "microsocket" and doc["info"]["version"] == ms.__version__
    for server in doc["servers"].values():
        assert server["host"] and server["protocol"] in ("ws", "wss")
    channels = doc["channels"]
    assert sorted(c["address"] for c in channels.values()) == ["/ws", "/ws/sub/{topic}"]
    for name, channel in channels.items():
        assert COMPONENT_KEY.match(name)
        assert set(re.findall(r"\{(\w+)\}", channel["address"])) == set(channel.get("parameters", {})), name
    for group in doc["components"].values():
        assert all(COMPONENT_KEY.match(name) for name in group), group.keys()
    for ref, where in iter_refs(doc):
        resolve_ref(doc, ref)  # raises when it does not resolve
    for schema in iter_schemas(doc):
        unknown = schema_keywords(schema) - SCHEMA_KEYWORDS - SCHEMA_ANNOTATIONS
        assert not unknown, f"the test's validator does not know {unknown}"
    seen = set()
    for name, op in doc["operations"].items():
        assert COMPONENT_KEY.match(name)
        assert op["action"] in ("send", "receive"), name
        channel_ref = op["channel"]["$ref"]
        assert channel_ref.startswith("#/channels/") and resolve_ref(doc, channel_ref) in channels.values()
        channel = resolve_ref(doc, channel_ref)
        assert op["messages"], name
        for message in op["messages"]:
            assert message["$ref"].startswith(channel_ref + "/messages/"), (name, message)
            key = message["$ref"].rsplit("/", 1)[1]
            assert key in channel["messages"], (name, key)
            target = resolve_ref(doc, channel["messages"][key]["$ref"])
            direction = "client" if op["action"] == "receive" else "server"  # written from the server's side
            assert target is doc["components"]["messages"][f"{direction}.{target['name']}"], (name, key)
            seen.add((channel["address"], op["action"], target["name"]))
    for channel in channels.values():
        for kind in ms.CLIENT_TYPES:
            assert (channel["address"], "receive", kind) in seen, (channel["address"], kind)
        for kind in ms.SERVER_TYPES:
            assert (channel["address"], "send", kind) in seen, (channel["address"], kind)


def test_asyncapi_has_a_message_for_every_type():
    """Every client and server type has one message whose payload schema fixes `type` to it, with an example."""
    doc = ms.asyncapi_document(ms.Config())
    messages = doc["components"]["messages"]
    client = {m["name"] for k, m in messages.items() if k.startswith("client.")}
    server = {m["name"] for k, m in messages.items() if k.startswith("server.")}
    assert (client, server) == (set(ms.CLIENT_TYPES), set(ms.SERVER_TYPES))
    assert {kind for kind, *_ in ms.CLIENT_MESSAGES} == set(ms.CLIENT_TYPES)
    assert {kind for kind, *_ in ms.SERVER_MESSAGES} == set(ms.SERVER_TYPES)
    for key, message in messages.items():
        schema = resolve_ref(doc, message["payload"]["$ref"])
        assert schema["properties"]["type"] == {"const": message["name"]}, key
        assert "type" in schema["required"] and message["examples"], key
        assert message["contentType"] == "application/json"


def test_asyncapi_examples_validate_against_their_schema():
    """Each message's example validates against its own payload schema and no other type's."""
    doc = ms.asyncapi_document(ms.Config())
    messages = doc["components"]["messages"]
    for key, message in messages.items():
        for example in message["examples"]:
            assert schema_errors(example["payload"], message["payload"], doc) == [], (key, example)
            direction = key.split(".")[0]
            for other_key, other in messages.items():
                if other_key != key and other_key.startswith(direction + "."):
                    assert schema_errors(example["payload"], other["payload"], doc), (key, other_key)


async def _exchange(ws, msg: dict, barrier: str) -> list[dict]:
    """Send `msg`, then a ping with id `barrier`; return everything received before that pong."""
    await ws.send(json.dumps(msg))
    await ws.send(json.dumps({"type": "ping", "id": barrier}))
    replies = []
    while True:
        reply = await recv_json(ws)
        if reply == {"type": "pong", "id": barrier}:
            return replies
        replies.append(reply)


def test_asyncapi_client_examples_are_accepted_and_server_examples_match(server_factory, wsclient):
    """On both channels every client example is accepted by a live server, and every server example has the live reply's fields."""
    doc = ms.asyncapi_document(ms.Config())
    client_examples = {m["name"]: m["examples"][0]["payload"] for k, m in doc["components"]["messages"].items() if k.startswith("client.")}
    server_messages = {m["name"]: m for k, m in doc["components"]["messages"].items() if k.startswith("server.")}
    order = [kind for kind, *_ in ms.CLIENT_MESSAGES]
    assert order[0] == "setup"
    refused = {"INVALID_MESSAGE", "UNKNOWN_TYPE", "INVALID_JSON", "INVALID_TOPIC"}

    async def main():
        observed: dict[str, list[dict]] = collections.defaultdict(list)
        server = server_factory()
        for channel in doc["channels"].values():
            path = channel["address"].replace("{topic}", "prices")
            async with wsclient.connect(server.ws_url(path)) as ws:
                for n, kind in enumerate(order):
                    example = client_examples[kind]
                    replies = await _exchange(ws, example, f"barrier-{n}")
                    for reply in replies:
                        observed[reply["type"]].append(reply)
                        if reply["type"] == "error":
                            assert reply["code"] not in refused, (path, example, reply)
                            assert (kind, reply["code"]) == ("resume", "SESSION_EXPIRED"), (path, example, reply)
                        elif "id" in example and reply["type"] != "message":
                            assert reply.get("id") == example["id"], (example, reply)  # direct replies echo the id
                    expected = {"setup": "ready", "subscribe": "subscribed", "unsubscribe": "unsubscribed",
                                "publish": "ack", "replay": "replayed", "resume": "error", "refresh": "refreshed",
                                "presence": "presence", "ping": "pong"}.get(kind)
                    if expected:
                        assert expected in [r["type"] for r in replies], (path, kind, replies)
                    if kind == "ack":
                        assert replies == [], (path, replies)
                # The resume example with a real session: resumed (the old connection is taken over, 4002).
                async with wsclient.connect(server.ws_url(path)) as again:
                    await _exchange(again, client_examples["setup"], "again-1")
                    replies = await _exchange(again, {**client_examples["resume"], "sessionId": observed["ready"][-1]["sessionId"]}, "again-2")
                    assert [r["type"] for r in replies if r["type"] != "message"] == ["resumed"], replies
                    for reply in replies:
                        observed[reply["type"]].append(reply)
                with pytest.raises(wsclient.ConnectionClosed) as closed:
                    await asyncio.wait_for(ws.recv(), 5)
                assert closed.value.rcvd.code == 4002
        return observed

    observed = run(main())
    assert set(observed) == set(ms.SERVER_TYPES), set(ms.SERVER_TYPES) - set(observed)
    for kind, replies in observed.items():
        message = server_messages[kind]
        example = message["examples"][0]["payload"]
        for reply in replies:
            assert schema_errors(reply, message["payload"], doc) == [], (kind, reply)
            assert set(reply) - {"id"} == set(example) - {"id"}, (kind, sorted(reply), sorted(example))

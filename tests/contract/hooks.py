"""Schemathesis hooks: keep generated search filters within the limits JSON Schema cannot state.

docs/openapi.json describes each filter, but three limits are on the filter as a whole (shared/src/search/filter.rs:
MAX_DEPTH, MAX_FILTERS, MAX_TOTAL_VALUES), and the document's own fields take values of one type each. Likewise a
search query must hold something once normalised (shared/src/api/search.rs: NFKC, invisible characters dropped,
whitespace trimmed; `"\u0085"` is 1 character but blank) and stay within 4,000 characters in that form. A
generated body that breaks one of those is refused with a 422 the schema cannot foresee, so such bodies are not
sent as valid ones; every other schema-valid body must still be accepted.
"""

import unicodedata

import schemathesis

MAX_DEPTH = 5
MAX_FILTERS = 100
MAX_TOTAL_VALUES = 500
MAX_QUERY_CHARS = 4000
DOCUMENT_FIELDS = {"filename", "content_type", "created_at", "document_id"}


def _size(node, depth):
    """(deepest level, filters, values) of a filter; None when it names a document field."""
    if not isinstance(node, dict):
        return depth, 1, 0
    if node.get("type") in ("and", "or") and isinstance(node.get("filters"), list):
        deepest, filters, values = depth, 1, 0
        for child in node["filters"]:
            size = _size(child, depth + 1)
            if size is None:
                return None
            deepest, filters, values = max(deepest, size[0]), filters + size[1], values + size[2]
        return deepest, filters, values
    # Negative cases put anything in `key` (a list is not hashable): only a string can name a document field.
    key = node.get("key")
    if isinstance(key, str) and key in DOCUMENT_FIELDS:
        return None
    value = node.get("value")
    return depth, 1, len(value) if isinstance(value, list) else 1


def _query_fits(query):
    """Whether the API takes `query` once normalised. Errs on the side of leaving a query out: every format and
    control character counts as invisible here, though the API keeps some (joiners)."""
    if len(query.strip()) > MAX_QUERY_CHARS:
        return False
    normalised = unicodedata.normalize("NFKC", query)
    if len(normalised) > MAX_QUERY_CHARS:
        return False
    visible = "".join(c for c in normalised if unicodedata.category(c) not in ("Cf", "Cc"))
    return visible.strip() != ""


@schemathesis.hook
def filter_body(ctx, body):
    if isinstance(body, dict) and isinstance(body.get("query"), str) and not _query_fits(body["query"]):
        return False
    if not isinstance(body, dict) or not isinstance(body.get("filters"), dict):
        return True
    size = _size(body["filters"], 1)
    return (
        size is not None
        and size[0] <= MAX_DEPTH
        and size[1] <= MAX_FILTERS
        and size[2] <= MAX_TOTAL_VALUES
    )

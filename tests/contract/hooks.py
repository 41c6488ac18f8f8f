"""Schemathesis hooks: keep generated search filters within the limits JSON Schema cannot state.

docs/openapi.json describes each filter, but three limits are on the filter as a whole (shared/src/search/filter.rs:
MAX_DEPTH, MAX_FILTERS, MAX_TOTAL_VALUES), and the document's own fields take values of one type each. A generated
body that breaks one of those is refused with a 422 the schema cannot foresee, so such bodies are not sent as valid
ones; every other schema-valid filter must still be accepted.
"""

import schemathesis

MAX_DEPTH = 5
MAX_FILTERS = 100
MAX_TOTAL_VALUES = 500
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
    if node.get("key") in DOCUMENT_FIELDS:
        return None
    value = node.get("value")
    return depth, 1, len(value) if isinstance(value, list) else 1


@schemathesis.hook
def filter_body(ctx, body):
    if not isinstance(body, dict) or not isinstance(body.get("filters"), dict):
        return True
    size = _size(body["filters"], 1)
    return (
        size is not None
        and size[0] <= MAX_DEPTH
        and size[1] <= MAX_FILTERS
        and size[2] <= MAX_TOTAL_VALUES
    )

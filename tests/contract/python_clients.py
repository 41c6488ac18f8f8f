"""The official Python clients, unchanged, against fake-providers: proof that the fake speaks the real protocols.

Run by tests/contract/python-clients.sh with FAKE_URL (the fake's base URL) and CORPUS (tests/fixtures/corpus).
Every check raises on failure; the script exits non-zero.
"""
import base64
import json
import os
import struct
import urllib.request

import cohere
import openai
from llama_cloud import LlamaCloud
from openai import AzureOpenAI, OpenAI

URL = os.environ["FAKE_URL"]
CORPUS = os.environ["CORPUS"]


def configure(config):
    req = urllib.request.Request(
        f"{URL}/_fake/config", data=json.dumps(config).encode(), method="PUT",
        headers={"content-type": "application/json"},
    )
    urllib.request.urlopen(req).read()


def reset():
    urllib.request.urlopen(urllib.request.Request(f"{URL}/_fake/reset", data=b"", method="POST")).read()


def stats():
    return json.load(urllib.request.urlopen(f"{URL}/_fake/stats"))


KEYS = {"openai": {"keys": ["sk-test", "azure-key"]}, "llamaparse": {"keys": ["llx-test"]}, "rerank": {"keys": ["co-test"]}}
configure(KEYS)
checks = []

# openai: base64 by default (the client decodes it), floats on request, dimensions, order by index.
client = OpenAI(api_key="sk-test", base_url=f"{URL}/v1", max_retries=0)
texts = ["the lighthouse keeper", "honeybees dance", "spring tides"]
r = client.embeddings.create(model="text-embedding-3-small", input=texts, dimensions=384)
assert [d.index for d in r.data] == [0, 1, 2], r
assert all(len(d.embedding) == 384 for d in r.data)
assert r.usage.prompt_tokens > 0 and r.model == "text-embedding-3-small"
f = client.embeddings.create(model="text-embedding-3-small", input=texts, dimensions=384, encoding_format="float")
assert max(abs(a - b) for a, b in zip(f.data[1].embedding, r.data[1].embedding)) < 1e-6
raw = client.embeddings.create(model="text-embedding-3-small", input="spring tides", dimensions=8,
                               encoding_format="base64")
vec = struct.unpack("<8f", base64.b64decode(raw.data[0].embedding))
assert abs(sum(x * x for x in vec) - 1.0) < 1e-4
checks.append("openai embeddings: base64 (default), float, dimensions")

# openai's typed errors.
try:
    OpenAI(api_key="sk-wrong", base_url=f"{URL}/v1", max_retries=0).embeddings.create(
        model="text-embedding-3-small", input="x")
    raise AssertionError("a wrong key must fail")
except openai.AuthenticationError as e:
    assert e.code == "invalid_api_key", e
try:
    client.embeddings.create(model="no-such-model", input="x")
    raise AssertionError("an unknown model must fail")
except openai.NotFoundError as e:
    assert e.code == "model_not_found", e
try:
    client.embeddings.create(model="text-embedding-ada-002", input="x", dimensions=8)
    raise AssertionError("ada-002 takes no dimensions")
except openai.BadRequestError:
    pass
reset()
configure({**KEYS, "openai": {**KEYS["openai"], "requests": {"limit": 1, "window_ms": 60000}}})
client.embeddings.create(model="text-embedding-3-small", input="one")
try:
    client.embeddings.create(model="text-embedding-3-small", input="two")
    raise AssertionError("the second request in the window must be limited")
except openai.RateLimitError as e:
    assert e.code == "rate_limit_exceeded", e
    assert e.response.headers["x-ratelimit-remaining-requests"] == "0"
    assert e.response.headers["x-ratelimit-reset-requests"].endswith("s")
configure({**KEYS, "openai": {**KEYS["openai"], "quota_exhausted": True}})
try:
    client.embeddings.create(model="text-embedding-3-small", input="x")
    raise AssertionError("quota exhausted must fail")
except openai.RateLimitError as e:
    assert e.code == "insufficient_quota" and e.type == "insufficient_quota", e
configure(KEYS)
checks.append("openai errors: AuthenticationError, NotFoundError, BadRequestError, RateLimitError (both kinds)")

# openai's retries recover from injected 5xx.
configure({**KEYS, "openai": {**KEYS["openai"], "fail_next": 2}})
before = stats()
retrying = OpenAI(api_key="sk-test", base_url=f"{URL}/v1", max_retries=3)
retrying.embeddings.create(model="text-embedding-3-small", input="retried twice")
after = stats()
assert after["embedding_requests"] - before["embedding_requests"] == 3, (before, after)
assert after["faults"] - before["faults"] == 2
configure(KEYS)
checks.append("openai retries through injected 5xx")

# Azure OpenAI: deployment URL, api-key header, api-version.
azure = AzureOpenAI(api_key="azure-key", azure_endpoint=URL, api_version="2024-10-21", max_retries=0)
a = azure.embeddings.create(model="text-embedding-3-small", input=["azure works"])
assert len(a.data[0].embedding) == 1536
checks.append("AzureOpenAI embeddings")

# llama-cloud v2: upload, poll, read per-page Markdown.
lc = LlamaCloud(api_key="llx-test", base_url=URL, max_retries=0)
with open(os.path.join(CORPUS, "honeybees.pdf"), "rb") as fh:
    result = lc.parsing.parse(tier="fast", version="latest", upload_file=("honeybees.pdf", fh.read(), "application/pdf"),
                              expand=["markdown"], polling_interval=0.05, max_interval=0.2, timeout=30)
pages = result.markdown.pages
assert [p.page_number for p in pages] == [1, 2], pages
assert "waggle" in pages[0].markdown.lower(), pages[0]
assert result.job.status == "COMPLETED"
checks.append("llama-cloud parsing.parse (v2): two pages of Markdown")

# A job that ends in error surfaces as the SDK's error.
configure({**KEYS, "llamaparse": {**KEYS["llamaparse"], "faults": {"job_error": 1.0}}})
try:
    with open(os.path.join(CORPUS, "honeybees.pdf"), "rb") as fh:
        lc.parsing.parse(tier="fast", version="latest", upload_file=("honeybees.pdf", fh.read(), "application/pdf"),
                         expand=["markdown"], polling_interval=0.05, max_interval=0.2, timeout=30)
    raise AssertionError("a failed job must raise")
except AssertionError:
    raise
except Exception as e:  # the SDK's own error type for failed jobs
    assert "Injected failure" in str(e) or "FAILED" in str(e), repr(e)
configure(KEYS)
checks.append("llama-cloud: a failed job raises with the provider's reason")

# cohere: rerank v2 (and v1, which Jina's /v1/rerank shares) in the fake's order: the share of the query's words.
docs = ["spring tides follow the moon", "the harbour pilot climbs the boarding ladder", "a pilot boat"]
co = cohere.ClientV2(api_key="co-test", base_url=URL, max_retries=0)
ranked = co.rerank(model="rerank-v3.5", query="harbour pilot ladder", documents=docs, top_n=2)
assert [(r.index, round(r.relevance_score, 3)) for r in ranked.results] == [(1, 1.0), (2, 0.333)], ranked
assert ranked.meta.billed_units.search_units == 1, ranked
v1 = cohere.Client(api_key="co-test", base_url=URL, max_retries=0).rerank(
    model="rerank-v3.5", query="harbour pilot ladder", documents=docs, top_n=1, return_documents=True)
assert v1.results[0].index == 1 and v1.results[0].document.text == docs[1], v1
try:
    cohere.ClientV2(api_key="co-wrong", base_url=URL, max_retries=0).rerank(model="m", query="q", documents=["d"])
    raise AssertionError("a wrong key must fail")
except cohere.errors.UnauthorizedError as e:
    assert e.status_code == 401, e
configure({**KEYS, "rerank": {**KEYS["rerank"], "fail_next": [429], "retry_after_s": 3}})
try:
    co.rerank(model="rerank-v3.5", query="q", documents=["d"])
    raise AssertionError("a scripted 429 must fail")
except cohere.errors.TooManyRequestsError as e:
    assert e.headers["retry-after"] == "3", e.headers
configure(KEYS)
checks.append("cohere rerank (v2, v1 with documents), UnauthorizedError, TooManyRequestsError with Retry-After")

for c in checks:
    print("ok  " + c)
print(f"{len(checks)} checks passed")

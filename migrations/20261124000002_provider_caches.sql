-- Provider result caches. Both are content-addressed and shared by every user: a re-upload of a known file by
-- anyone, or the retry of a half-finished document, costs no repeated provider call. Neither is reachable
-- through the API; only the stages read and write them (as upload_pipeline_app), so they carry no user data
-- beyond what the same bytes would produce again.

-- Parse results by the file's SHA-256 (hex, as documents.sha256) and the parser with every setting that changes its output.
CREATE TABLE upload_pipeline.parse_cache (
  file_sha256 text NOT NULL CHECK (file_sha256 ~ '^[0-9a-f]{64}$'),
  parser      text NOT NULL,
  sections    jsonb NOT NULL,
  created_at  timestamptz NOT NULL DEFAULT now(),
  PRIMARY KEY (file_sha256, parser)
);

-- Embeddings by model, dimensions and the SHA-256 of the exact text embedded (hex, as document_chunks.content_sha256).
CREATE TABLE upload_pipeline.embedding_cache (
  model       text NOT NULL,
  dimensions  integer NOT NULL CHECK (dimensions > 0),
  text_sha256 text NOT NULL CHECK (text_sha256 ~ '^[0-9a-f]{64}$'),
  embedding   vector NOT NULL CHECK (vector_dims(embedding) = dimensions),
  created_at  timestamptz NOT NULL DEFAULT now(),
  PRIMARY KEY (model, dimensions, text_sha256)
);

GRANT SELECT, INSERT ON upload_pipeline.parse_cache, upload_pipeline.embedding_cache TO upload_pipeline_app;

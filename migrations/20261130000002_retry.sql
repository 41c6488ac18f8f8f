-- Failed documents for operators: which stage gave up and why, fleet-wide, so that failures can be counted by
-- stage and reason and retried in bulk (`GET /v1/admin/failures`, `producer failures`, `producer retry`).
--
-- Like stale_jobs, these run as the function's owner and see every user's rows. They return ids, the stage and
-- the failure reason the document's owner sees, never content. A transaction that set upload_pipeline.user_id
-- (every request, every stage, an agent's SQL) sees only that user's failures. The whole fleet is seen only by a
-- transaction that asked for it (upload_pipeline.operator = 'on', set by the operator paths of the library);
-- a session that set neither sees nothing.

-- The failures listing reads failed documents newest first and pages by (updated_at, id).
CREATE INDEX documents_failed_idx ON upload_pipeline.documents (updated_at DESC, id DESC) WHERE status = 'failed';

-- The stage a failed document re-runs from is the one that gave up: its row in state `dead` (first in pipeline
-- order). A document failed without one (older rows) re-runs from its first stage not done. upload_pipeline::retry
-- picks the stage by the same rule.
CREATE FUNCTION upload_pipeline.failed_documents(
  p_stage text, p_since timestamptz, p_user uuid, p_limit integer,
  p_before timestamptz DEFAULT NULL, p_before_id uuid DEFAULT NULL)
RETURNS TABLE (document_id uuid, user_id uuid, stage text, error text, reason text, failed_at timestamptz)
LANGUAGE sql STABLE SECURITY DEFINER SET search_path = pg_catalog, upload_pipeline AS $$
  SELECT d.id, d.user_id, j.stage, d.error, coalesce(j.last_error, d.error), d.updated_at
  FROM upload_pipeline.documents d
  CROSS JOIN LATERAL (
    SELECT s.stage, s.last_error FROM upload_pipeline.upload_jobs s
    WHERE s.document_id = d.id
    ORDER BY s.state = 'dead' DESC, s.state = 'done', array_position(ARRAY['parse', 'chunk', 'embed'], s.stage)
    LIMIT 1
  ) j
  WHERE d.status = 'failed'
    AND (d.user_id = upload_pipeline.current_user_id()
         OR (upload_pipeline.current_user_id() IS NULL
             AND current_setting('upload_pipeline.operator', true) = 'on'))
    AND (p_stage IS NULL OR j.stage = p_stage)
    AND (p_since IS NULL OR d.updated_at >= p_since)
    AND (p_user IS NULL OR d.user_id = p_user)
    AND (p_before IS NULL OR (d.updated_at, d.id) < (p_before, p_before_id))
  ORDER BY d.updated_at DESC, d.id DESC
  LIMIT p_limit
$$;

-- The same failures counted by stage and reason, most frequent first.
CREATE FUNCTION upload_pipeline.failure_counts(p_stage text, p_since timestamptz, p_user uuid)
RETURNS TABLE (stage text, reason text, documents bigint, last_failed_at timestamptz)
LANGUAGE sql STABLE SECURITY DEFINER SET search_path = pg_catalog, upload_pipeline AS $$
  SELECT f.stage, f.reason, count(*), max(f.failed_at)
  FROM upload_pipeline.failed_documents(p_stage, p_since, p_user, NULL) f
  GROUP BY f.stage, f.reason
  ORDER BY count(*) DESC, f.stage, f.reason
$$;

REVOKE ALL ON FUNCTION upload_pipeline.failed_documents(text, timestamptz, uuid, integer, timestamptz, uuid) FROM PUBLIC;
GRANT EXECUTE ON FUNCTION upload_pipeline.failed_documents(text, timestamptz, uuid, integer, timestamptz, uuid)
  TO upload_pipeline_app;
REVOKE ALL ON FUNCTION upload_pipeline.failure_counts(text, timestamptz, uuid) FROM PUBLIC;
GRANT EXECUTE ON FUNCTION upload_pipeline.failure_counts(text, timestamptz, uuid) TO upload_pipeline_app;

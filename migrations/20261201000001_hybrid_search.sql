-- Hybrid search (issue 20): keyword search beside the vectors, fused by reciprocal rank; OpenAI-style filters on
-- the documents' fields and metadata; only ready documents in every search; citations (page, headings, span);
-- embedding models of up to 4,000 dimensions.
--
-- One search path: the API (`POST /v1/search`) and agents in SQL both call search_chunks. The query it runs is
-- built by search_chunks_sql, so tests can EXPLAIN exactly that (as match_chunks_sql does for match_chunks):
--   vector  : the model's partial HNSW index (embedding::vector(d), or ::halfvec(d) above 2,000 dimensions)
--   keyword : the GIN index on content_tsv, matched by websearch_to_tsquery, ranked by ts_rank_cd (through
--             keyword_candidates, which asks for the caller's rows itself so that the index can serve it)
--   hybrid  : both lists (their top `candidates` each), fused by reciprocal rank: sum of w / (rrf_k + rank)
-- A filter is evaluated once per document, before either list: search_chunks collects the caller's ready documents
-- that pass it, and each candidate query keeps the chunks of those documents (`document_id = ANY (...)`, a hashed
-- lookup), so the top of each list is taken among them: HNSW iterative scans (relaxed_order) keep walking the
-- graph until enough rows pass, within the bounds search_chunks sets (hnsw.max_scan_tuples, scan_mem_multiplier).

-- Full text ------------------------------------------------------------------------------------------------------

-- The text-search configuration of content_tsv and of queries (`search.text_config`, stored at migration and
-- start-up by set_text_search_config). One row. indexed_config is the configuration in which every chunk's
-- content_tsv was found computed by the last complete pass of backfill_content_tsv (Rust: db::backfill_keywords);
-- NULL, or another than config, means a pass is due.
CREATE TABLE upload_pipeline.text_search (
  singleton      boolean PRIMARY KEY DEFAULT true CHECK (singleton),
  config         regconfig NOT NULL DEFAULT 'english',
  indexed_config regconfig,
  updated_at     timestamptz NOT NULL DEFAULT now()
);
INSERT INTO upload_pipeline.text_search DEFAULT VALUES;

CREATE FUNCTION upload_pipeline.text_search_config() RETURNS regconfig
LANGUAGE sql STABLE PARALLEL SAFE AS $$
  SELECT coalesce((SELECT t.config FROM upload_pipeline.text_search t), 'english'::regconfig)
$$;

-- content_tsv: the chunk's words, in the configuration content_tsv_config. Adding columns without a default only
-- changes the catalogue; the existing chunks are filled afterwards, in batches, by backfill_content_tsv (run by
-- `producer migrate` and at start-up), and keyword search skips a chunk until then (NULL matches nothing).
ALTER TABLE upload_pipeline.document_chunks ADD COLUMN content_tsv tsvector, ADD COLUMN content_tsv_config regconfig;

-- Fills content_tsv whenever a chunk's text is written. Volatile, so each row reads the configuration committed last.
CREATE FUNCTION upload_pipeline.document_chunks_tsv() RETURNS trigger
LANGUAGE plpgsql AS $$
DECLARE
  v_config regconfig := upload_pipeline.text_search_config();
BEGIN
  NEW.content_tsv := to_tsvector(v_config, NEW.content);
  NEW.content_tsv_config := v_config;
  RETURN NEW;
END
$$;

CREATE TRIGGER document_chunks_tsv BEFORE INSERT OR UPDATE OF content ON upload_pipeline.document_chunks
  FOR EACH ROW EXECUTE FUNCTION upload_pipeline.document_chunks_tsv();

-- Over a column that is NULL in every row this builds quickly (one read of the table, no entries), though the
-- migration's lock on the table is held while it reads.
CREATE INDEX document_chunks_content_tsv ON upload_pipeline.document_chunks USING gin (content_tsv);

-- Stores the text-search configuration (`search.text_config`); returns whether it changed. It recomputes nothing:
-- the next backfill_content_tsv pass does, a batch at a time (until then keyword search reads the older chunks in
-- the configuration they were written in). It waits for the chunk writes under way (a SHARE lock, at most
-- lock_timeout), so every chunk written after it returns is read in the new configuration and the pass that
-- follows misses none. Run by `producer migrate` and at start-up, like register_embedding_model.
CREATE FUNCTION upload_pipeline.set_text_search_config(p_config regconfig) RETURNS boolean
LANGUAGE plpgsql
SET lock_timeout = '10s'
AS $$
DECLARE
  v_old regconfig;
BEGIN
  IF p_config IS NULL THEN
    RAISE EXCEPTION 'the text search configuration must not be null' USING ERRCODE = 'invalid_parameter_value';
  END IF;
  SELECT t.config INTO v_old FROM upload_pipeline.text_search t FOR UPDATE;
  IF v_old = p_config THEN
    RETURN false;
  END IF;
  LOCK TABLE upload_pipeline.document_chunks IN SHARE MODE;
  UPDATE upload_pipeline.text_search SET config = p_config, updated_at = now();
  RETURN true;
END
$$;

-- One batch of the pass that brings every chunk's content_tsv to the configured text-search configuration: of the
-- `p_limit` chunks after `p_after` in id order (NULL: from the first), recomputes those whose content_tsv_config
-- differs (NULL: never computed). Returns the last id looked at (NULL: none left, the pass is over) and the chunks
-- recomputed. Each call is meant to be its own transaction (db::backfill_keywords loops over it), so a chunk write
-- waits for at most one batch. The table forces row-level security on its owner too: a migrating role that does
-- not bypass it lifts that for the batch's transaction only, which takes the table's ACCESS EXCLUSIVE lock (reads
-- wait for the batch as well, and the lock is given up after 2 s of waiting rather than queue everyone behind it).
CREATE FUNCTION upload_pipeline.backfill_content_tsv(
  p_after uuid, p_limit integer, OUT last_id uuid, OUT recomputed integer)
LANGUAGE plpgsql AS $$
DECLARE
  v_config regconfig := upload_pipeline.text_search_config();
  v_bypass boolean;
  v_ids    uuid[];
BEGIN
  IF p_limit IS NULL OR p_limit NOT BETWEEN 1 AND 100000 THEN
    RAISE EXCEPTION 'p_limit must be between 1 and 100000, got %', p_limit USING ERRCODE = 'invalid_parameter_value';
  END IF;
  SELECT r.rolsuper OR r.rolbypassrls INTO v_bypass FROM pg_catalog.pg_roles r WHERE r.rolname = current_user;
  IF NOT coalesce(v_bypass, false) THEN
    PERFORM set_config('lock_timeout', '2s', true);
    ALTER TABLE upload_pipeline.document_chunks NO FORCE ROW LEVEL SECURITY;
  END IF;
  -- Two statements rather than `p_after IS NULL OR c.id > p_after`, which a generic plan could not bound.
  IF p_after IS NULL THEN
    SELECT array_agg(b.id ORDER BY b.id) INTO v_ids
    FROM (SELECT c.id FROM upload_pipeline.document_chunks c ORDER BY c.id LIMIT p_limit) b;
  ELSE
    SELECT array_agg(b.id ORDER BY b.id) INTO v_ids
    FROM (SELECT c.id FROM upload_pipeline.document_chunks c WHERE c.id > p_after ORDER BY c.id LIMIT p_limit) b;
  END IF;
  last_id := v_ids[cardinality(v_ids)];
  UPDATE upload_pipeline.document_chunks c
  SET content_tsv = to_tsvector(v_config, c.content), content_tsv_config = v_config
  WHERE c.id = ANY (v_ids) AND c.content_tsv_config IS DISTINCT FROM v_config;
  GET DIAGNOSTICS recomputed = ROW_COUNT;
  IF NOT coalesce(v_bypass, false) THEN
    ALTER TABLE upload_pipeline.document_chunks FORCE ROW LEVEL SECURITY;
  END IF;
END
$$;

-- Wide models -----------------------------------------------------------------------------------------------------

-- pgvector's HNSW indexes take up to 2,000 dimensions of vector and 4,000 of halfvec (half precision): a model
-- above 2,000 dimensions is indexed, and searched, as embedding::halfvec(d). The stored column stays vector.
CREATE FUNCTION upload_pipeline.vector_type_for(p_dimensions integer) RETURNS text
LANGUAGE sql IMMUTABLE PARALLEL SAFE AS $$
  SELECT CASE WHEN p_dimensions > 2000 THEN 'halfvec' ELSE 'vector' END
$$;

ALTER TABLE upload_pipeline.embedding_models DROP CONSTRAINT embedding_models_dimensions_check;
ALTER TABLE upload_pipeline.embedding_models
  ADD COLUMN vector_type text NOT NULL DEFAULT 'vector',
  ADD CONSTRAINT embedding_models_dimensions_check CHECK (dimensions BETWEEN 1 AND 4000),
  ADD CONSTRAINT embedding_models_vector_type_check
    CHECK (vector_type = CASE WHEN dimensions > 2000 THEN 'halfvec' ELSE 'vector' END);

CREATE OR REPLACE FUNCTION upload_pipeline.register_embedding_model(p_model text, p_dimensions integer) RETURNS text
LANGUAGE plpgsql AS $$
DECLARE
  idx text := left('document_chunks_hnsw_' || regexp_replace(lower(p_model), '[^a-z0-9]+', '_', 'g'), 45)
              || '_' || p_dimensions || '_' || left(md5(p_model), 6);
  typ text := upload_pipeline.vector_type_for(p_dimensions);
BEGIN
  IF p_dimensions IS NULL OR p_dimensions < 1 OR p_dimensions > 4000 THEN
    RAISE EXCEPTION 'embedding dimensions must be between 1 and 4000 for an HNSW index (halfvec above 2000), got %',
      p_dimensions;
  END IF;
  EXECUTE format(
    'CREATE INDEX IF NOT EXISTS %I ON upload_pipeline.document_chunks USING hnsw ((embedding::%s(%s)) %s_cosine_ops) WHERE embedding_model = %L',
    idx, typ, p_dimensions, typ, p_model);
  INSERT INTO upload_pipeline.embedding_models (model, dimensions, index_name, vector_type)
  VALUES (p_model, p_dimensions, idx, typ)
  ON CONFLICT (model) DO UPDATE
  SET dimensions = excluded.dimensions, index_name = excluded.index_name, vector_type = excluded.vector_type;
  RETURN idx;
END
$$;

-- match_chunks, as before, but only over ready documents and with halfvec models: $1 query vector, $2 metadata
-- filter, $3 count.
CREATE OR REPLACE FUNCTION upload_pipeline.match_chunks_sql(p_model text, p_dimensions integer, p_filtered boolean)
RETURNS text
LANGUAGE sql IMMUTABLE AS $$
  SELECT format(
    'SELECT c.id, c.document_id, c.chunk_index, c.content, c.metadata, '
    '1 - (c.embedding::%4$s(%1$s) <=> $1::%4$s(%1$s)) AS similarity '
    'FROM upload_pipeline.document_chunks c JOIN upload_pipeline.documents d ON d.id = c.document_id '
    'WHERE c.embedding_model = %2$L AND d.status = ''ready'' %3$s'
    'ORDER BY c.embedding::%4$s(%1$s) <=> $1::%4$s(%1$s) LIMIT $3',
    p_dimensions, p_model, CASE WHEN p_filtered THEN 'AND c.metadata @> $2 ' ELSE '' END,
    upload_pipeline.vector_type_for(p_dimensions))
$$;

-- Filters -----------------------------------------------------------------------------------------------------------
--
-- OpenAI's vector store filters: {"type": "eq"|"ne"|"gt"|"gte"|"lt"|"lte"|"in"|"nin", "key": k, "value": v} and
-- {"type": "and"|"or", "filters": [...]}. The keys filename, content_type, created_at and document_id name the
-- document's own fields; any other key is a top-level key of its metadata. The API checks a filter in Rust before
-- it gets here (with the same limits); agents' filters are checked by filter_validate. The limits bound the work
-- per document: at most 100 filters (so at most 99 comparisons) and 500 values in all.

-- Checks one filter node at `path`, `depth` levels deep; returns the number of nodes (filters) and of values in it
-- (a comparison's value counts 1, a list its items).
-- Errors are 22023 (invalid_parameter_value) and name the part, e.g.
-- `filter.filters[1].type: unknown filter type 'like'`.
CREATE FUNCTION upload_pipeline.filter_check(
  p_filter jsonb, p_path text, p_depth integer, OUT nodes integer, OUT value_count integer)
LANGUAGE plpgsql IMMUTABLE AS $$
DECLARE
  v_type jsonb := p_filter -> 'type';
  v_i    integer := 0;
  v_part jsonb;
  v_sub  record;
BEGIN
  IF p_depth > 5 THEN
    RAISE EXCEPTION '%: filters nest at most 5 deep', p_path USING ERRCODE = 'invalid_parameter_value';
  END IF;
  IF jsonb_typeof(p_filter) IS DISTINCT FROM 'object' THEN
    RAISE EXCEPTION '%: must be an object, not %', p_path, coalesce(jsonb_typeof(p_filter), 'null')
      USING ERRCODE = 'invalid_parameter_value';
  END IF;
  IF jsonb_typeof(v_type) IS DISTINCT FROM 'string' THEN
    RAISE EXCEPTION '%.type: missing, or not a string', p_path USING ERRCODE = 'invalid_parameter_value';
  END IF;
  IF v_type #>> '{}' IN ('and', 'or') THEN
    IF p_filter - 'type' - 'filters' <> '{}' THEN
      RAISE EXCEPTION '%: unknown field of a compound filter (type, filters)', p_path
        USING ERRCODE = 'invalid_parameter_value';
    END IF;
    IF jsonb_typeof(p_filter -> 'filters') IS DISTINCT FROM 'array'
       OR jsonb_array_length(p_filter -> 'filters') NOT BETWEEN 1 AND 99 THEN
      RAISE EXCEPTION '%.filters: must be an array of 1 to 99 filters', p_path USING ERRCODE = 'invalid_parameter_value';
    END IF;
    nodes := 1;
    value_count := 0;
    FOR v_part IN SELECT e FROM jsonb_array_elements(p_filter -> 'filters') e LOOP
      v_sub := upload_pipeline.filter_check(v_part, format('%s.filters[%s]', p_path, v_i), p_depth + 1);
      nodes := nodes + v_sub.nodes;
      value_count := value_count + v_sub.value_count;
      v_i := v_i + 1;
    END LOOP;
    RETURN;
  END IF;
  IF v_type #>> '{}' NOT IN ('eq', 'ne', 'gt', 'gte', 'lt', 'lte', 'in', 'nin') THEN
    RAISE EXCEPTION '%.type: unknown filter type ''%'' (eq, ne, gt, gte, lt, lte, in, nin, and, or)', p_path,
      v_type #>> '{}'
      USING ERRCODE = 'invalid_parameter_value';
  END IF;
  PERFORM upload_pipeline.filter_check_comparison(p_filter, p_path);
  nodes := 1;
  value_count := CASE WHEN jsonb_typeof(p_filter -> 'value') = 'array' THEN jsonb_array_length(p_filter -> 'value') ELSE 1 END;
END
$$;

-- Checks a comparison filter: its key, and its value against the operator and the key.
CREATE FUNCTION upload_pipeline.filter_check_comparison(p_filter jsonb, p_path text) RETURNS void
LANGUAGE plpgsql IMMUTABLE AS $$
DECLARE
  v_op    text := p_filter ->> 'type';
  v_key   jsonb := p_filter -> 'key';
  v_value jsonb := p_filter -> 'value';
  v_list  boolean := v_op IN ('in', 'nin');
  v_item  jsonb;
  v_i     bigint;
BEGIN
  IF p_filter - 'type' - 'key' - 'value' <> '{}' THEN
    RAISE EXCEPTION '%: unknown field of a comparison filter (type, key, value)', p_path
      USING ERRCODE = 'invalid_parameter_value';
  END IF;
  IF jsonb_typeof(v_key) IS DISTINCT FROM 'string' OR length(v_key #>> '{}') NOT BETWEEN 1 AND 256 THEN
    RAISE EXCEPTION '%.key: must be a string of 1 to 256 characters', p_path USING ERRCODE = 'invalid_parameter_value';
  END IF;
  IF v_list AND (jsonb_typeof(v_value) IS DISTINCT FROM 'array' OR jsonb_array_length(v_value) NOT BETWEEN 1 AND 100) THEN
    RAISE EXCEPTION '%.value: % takes an array of 1 to 100 values', p_path, v_op USING ERRCODE = 'invalid_parameter_value';
  END IF;
  IF NOT v_list THEN
    PERFORM upload_pipeline.filter_check_value(v_op, v_key #>> '{}', v_value, p_path || '.value');
    RETURN;
  END IF;
  FOR v_item, v_i IN SELECT e, n - 1 FROM jsonb_array_elements(v_value) WITH ORDINALITY AS a (e, n) LOOP
    PERFORM upload_pipeline.filter_check_value(v_op, v_key #>> '{}', v_item, format('%s.value[%s]', p_path, v_i));
  END LOOP;
END
$$;

-- Checks one value compared with the key `p_key` by `p_op`.
CREATE FUNCTION upload_pipeline.filter_check_value(p_op text, p_key text, p_value jsonb, p_path text) RETURNS void
LANGUAGE plpgsql IMMUTABLE AS $$
DECLARE
  v_type  text := jsonb_typeof(p_value);
  v_range boolean := p_op IN ('gt', 'gte', 'lt', 'lte');
BEGIN
  IF v_type IS NULL THEN
    RAISE EXCEPTION '%: missing', p_path USING ERRCODE = 'invalid_parameter_value';
  ELSIF v_type NOT IN ('string', 'number', 'boolean') THEN
    RAISE EXCEPTION '%: must be a string, a number or a boolean%', p_path,
      CASE WHEN v_type = 'array' THEN ' (a list of values takes in or nin)' ELSE ', not ' || v_type END
      USING ERRCODE = 'invalid_parameter_value';
  END IF;
  IF v_range AND v_type = 'boolean' THEN
    RAISE EXCEPTION '%: % compares numbers, strings or times, not booleans', p_path, p_op
      USING ERRCODE = 'invalid_parameter_value';
  END IF;
  IF v_type = 'string' AND length(p_value #>> '{}') > 1000 THEN
    RAISE EXCEPTION '%: strings are limited to 1000 characters', p_path USING ERRCODE = 'invalid_parameter_value';
  END IF;
  IF p_key IN ('filename', 'content_type') AND v_type <> 'string' THEN
    RAISE EXCEPTION '%: % is compared with strings', p_path, p_key USING ERRCODE = 'invalid_parameter_value';
  ELSIF p_key = 'document_id' THEN
    IF v_range THEN
      RAISE EXCEPTION '%: document_id takes eq, ne, in or nin', p_path USING ERRCODE = 'invalid_parameter_value';
    END IF;
    IF v_type <> 'string' OR (p_value #>> '{}') !~* '^[0-9a-f]{8}-?([0-9a-f]{4}-?){3}[0-9a-f]{12}$' THEN
      RAISE EXCEPTION '%: document_id is compared with UUID strings', p_path USING ERRCODE = 'invalid_parameter_value';
    END IF;
  ELSIF p_key = 'created_at' THEN
    BEGIN
      IF v_type = 'boolean' OR (v_type = 'string' AND ((p_value #>> '{}') !~
          '^[0-9]{4}-[0-9]{2}-[0-9]{2}[Tt ][0-9]{2}:[0-9]{2}:[0-9]{2}(\.[0-9]+)?([Zz]|[+-][0-9]{2}:[0-9]{2})$'
          OR (p_value #>> '{}')::timestamptz IS NULL)) THEN
        RAISE EXCEPTION USING ERRCODE = 'data_exception';
      END IF;
    EXCEPTION WHEN data_exception THEN
      RAISE EXCEPTION '%: created_at is compared with an RFC 3339 time or Unix seconds', p_path
        USING ERRCODE = 'invalid_parameter_value';
    END;
  END IF;
END
$$;

-- Checks a whole filter (`{}` is no filter): nesting, size and types. Errors as filter_check's.
CREATE FUNCTION upload_pipeline.filter_validate(p_filter jsonb) RETURNS void
LANGUAGE plpgsql IMMUTABLE AS $$
DECLARE
  v_size record;
BEGIN
  IF p_filter IS NULL OR p_filter = '{}' THEN
    RETURN;
  END IF;
  v_size := upload_pipeline.filter_check(p_filter, 'filter', 1);
  IF v_size.nodes > 100 THEN
    RAISE EXCEPTION 'filter: at most 100 filters in all' USING ERRCODE = 'invalid_parameter_value';
  ELSIF v_size.value_count > 500 THEN
    RAISE EXCEPTION 'filter: at most 500 values in all' USING ERRCODE = 'invalid_parameter_value';
  END IF;
END
$$;

-- The value a filter key names in a document, as JSON: its own field, or the top-level key of its metadata.
-- created_at is Unix seconds (a number, to the microsecond), so times compare as numbers.
CREATE FUNCTION upload_pipeline.filter_field(p_doc upload_pipeline.documents, p_key text) RETURNS jsonb
LANGUAGE sql IMMUTABLE PARALLEL SAFE AS $$
  SELECT CASE p_key
    WHEN 'filename' THEN to_jsonb(p_doc.filename)
    WHEN 'content_type' THEN to_jsonb(p_doc.content_type)
    WHEN 'document_id' THEN to_jsonb(p_doc.id::text)
    WHEN 'created_at' THEN to_jsonb(extract(epoch FROM p_doc.created_at))
    ELSE p_doc.metadata -> p_key
  END
$$;

-- A filter's value in the form filter_field gives the key: created_at times as Unix seconds, ids as lowercase
-- hyphenated UUIDs.
CREATE FUNCTION upload_pipeline.filter_operand(p_key text, p_value jsonb) RETURNS jsonb
LANGUAGE sql STABLE PARALLEL SAFE AS $$
  SELECT CASE
    WHEN p_key = 'created_at' AND jsonb_typeof(p_value) = 'string'
      THEN to_jsonb(extract(epoch FROM (p_value #>> '{}')::timestamptz))
    WHEN p_key = 'document_id' AND jsonb_typeof(p_value) = 'string' THEN to_jsonb((p_value #>> '{}')::uuid::text)
    ELSE p_value
  END
$$;

-- A checked filter with every value in the form filter_field gives its key (filter_operand), so that
-- filter_matches compares values as they are: converted once per search, not once per document.
CREATE FUNCTION upload_pipeline.filter_prepare(p_filter jsonb) RETURNS jsonb
LANGUAGE plpgsql STABLE PARALLEL SAFE AS $$
DECLARE
  v_key text := p_filter ->> 'key';
BEGIN
  IF p_filter ->> 'type' IN ('and', 'or') THEN
    RETURN jsonb_build_object('type', p_filter -> 'type', 'filters',
      (SELECT jsonb_agg(upload_pipeline.filter_prepare(a.e) ORDER BY a.n)
       FROM jsonb_array_elements(p_filter -> 'filters') WITH ORDINALITY AS a (e, n)));
  ELSIF v_key IN ('created_at', 'document_id') THEN
    RETURN jsonb_set(p_filter, '{value}', CASE
      WHEN jsonb_typeof(p_filter -> 'value') = 'array' THEN
        (SELECT jsonb_agg(upload_pipeline.filter_operand(v_key, a.e) ORDER BY a.n)
         FROM jsonb_array_elements(p_filter -> 'value') WITH ORDINALITY AS a (e, n))
      ELSE upload_pipeline.filter_operand(v_key, p_filter -> 'value') END);
  END IF;
  RETURN p_filter;
END
$$;

-- Compares a document's value with a filter's (eq, gt, gte, lt, lte): numbers as numbers, strings by code point,
-- booleans as booleans; values of different types, or a missing key, never match. A list in the metadata matches
-- when one of its items does.
CREATE FUNCTION upload_pipeline.filter_compare(p_have jsonb, p_op text, p_want jsonb) RETURNS boolean
LANGUAGE plpgsql IMMUTABLE PARALLEL SAFE AS $$
DECLARE
  v_type text := jsonb_typeof(p_have);
  v_cmp  integer;
BEGIN
  IF v_type IS NULL OR p_want IS NULL THEN
    RETURN false;
  ELSIF v_type = 'array' THEN
    RETURN EXISTS (SELECT 1 FROM jsonb_array_elements(p_have) e WHERE upload_pipeline.filter_compare(e, p_op, p_want));
  ELSIF v_type IS DISTINCT FROM jsonb_typeof(p_want) THEN
    RETURN false;
  ELSIF v_type = 'number' THEN
    v_cmp := sign(p_have::numeric - p_want::numeric);
  ELSIF v_type = 'string' THEN
    v_cmp := CASE WHEN (p_have #>> '{}') COLLATE "C" < (p_want #>> '{}') THEN -1
                  WHEN (p_have #>> '{}') COLLATE "C" > (p_want #>> '{}') THEN 1 ELSE 0 END;
  ELSIF v_type = 'boolean' THEN
    v_cmp := CASE WHEN p_have::boolean = p_want::boolean THEN 0 WHEN p_have::boolean THEN 1 ELSE -1 END;
  ELSE
    RETURN false;
  END IF;
  RETURN CASE p_op WHEN 'eq' THEN v_cmp = 0 WHEN 'gt' THEN v_cmp > 0 WHEN 'gte' THEN v_cmp >= 0
                   WHEN 'lt' THEN v_cmp < 0 WHEN 'lte' THEN v_cmp <= 0 ELSE false END;
END
$$;

-- Whether a document's value equals one of a list of strings, numbers and booleans (filter_compare's eq, for every
-- item at once): jsonb containment compares numbers as numbers and strings and booleans exactly, in one call.
CREATE FUNCTION upload_pipeline.filter_in(p_have jsonb, p_list jsonb) RETURNS boolean
LANGUAGE plpgsql IMMUTABLE PARALLEL SAFE AS $$
DECLARE
  v_type text := jsonb_typeof(p_have);
BEGIN
  IF v_type IN ('string', 'number', 'boolean') THEN
    RETURN p_list @> jsonb_build_array(p_have);
  ELSIF v_type = 'array' THEN
    RETURN EXISTS (SELECT 1 FROM jsonb_array_elements(p_have) e WHERE upload_pipeline.filter_in(e, p_list));
  END IF;
  RETURN false;
END
$$;

-- Whether a document passes a filter checked by filter_validate and prepared by filter_prepare; `{}` passes every
-- document. ne and nin are the negations of eq and in, so a document without the key passes them. search_chunks
-- calls it once per document of the caller's, never per chunk.
CREATE FUNCTION upload_pipeline.filter_matches(doc upload_pipeline.documents, filter jsonb) RETURNS boolean
LANGUAGE plpgsql STABLE PARALLEL SAFE AS $$
DECLARE
  v_op   text := filter ->> 'type';
  v_have jsonb;
  v_part jsonb;
BEGIN
  IF filter IS NULL OR filter = '{}' THEN
    RETURN true;
  ELSIF v_op IN ('and', 'or') THEN
    FOR v_part IN SELECT e FROM jsonb_array_elements(filter -> 'filters') e LOOP
      IF upload_pipeline.filter_matches(doc, v_part) = (v_op = 'or') THEN
        RETURN v_op = 'or';
      END IF;
    END LOOP;
    RETURN v_op = 'and';
  END IF;
  v_have := upload_pipeline.filter_field(doc, filter ->> 'key');
  IF v_op IN ('in', 'nin') THEN
    RETURN (v_op = 'nin') <> upload_pipeline.filter_in(v_have, filter -> 'value');
  ELSIF v_op = 'ne' THEN
    RETURN NOT upload_pipeline.filter_compare(v_have, 'eq', filter -> 'value');
  END IF;
  RETURN upload_pipeline.filter_compare(v_have, v_op, filter -> 'value');
END
$$;

-- Search -------------------------------------------------------------------------------------------------------------

-- The query keyword_candidates runs: $1 tsquery, $2 the documents to look in (NULL: every ready one), $3 count.
-- Run through EXECUTE, so $2 is a constant of the plan and `= ANY` a hashed lookup rather than a walk of the list
-- per chunk; tests EXPLAIN this text.
CREATE FUNCTION upload_pipeline.keyword_candidates_sql() RETURNS text
LANGUAGE sql IMMUTABLE AS $$
  SELECT 'SELECT c.id, ts_rank_cd(c.content_tsv, $1, 32) AS rank '
         'FROM upload_pipeline.document_chunks c JOIN upload_pipeline.documents d ON d.id = c.document_id '
         'WHERE c.content_tsv @@ $1 AND c.user_id = upload_pipeline.current_user_id() AND d.user_id = c.user_id '
         'AND d.status = ''ready'' AND ($2::uuid[] IS NULL OR c.document_id = ANY ($2)) '
         'ORDER BY rank DESC, c.id LIMIT $3'
$$;

-- The keyword list: the ids and ranks of the caller's chunks of ready documents that match `p_query`, among the
-- documents `p_documents` (NULL: all; search_chunks passes those that pass its filter), best `p_limit` first. It
-- runs as its owner for one reason: under row-level security Postgres may not use `content_tsv @@ query` as an
-- index condition (ts_match_vq is not leakproof, so it must run after the policy's filter), and every search would
-- read all of the caller's chunks. So it asks for the caller's rows itself (`user_id = current_user_id()`, as the
-- policy does), the GIN index finds the matches, and it returns ids and ranks only: search_chunks reads the chunks
-- under row-level security. That needs an owner that bypasses row-level security (a superuser or BYPASSRLS, as
-- the migrating role should be; db::migrate warns otherwise): under a policy applied to the owner too, the index
-- is no use and the keyword list reads every chunk of the caller's.
CREATE FUNCTION upload_pipeline.keyword_candidates(p_query tsquery, p_documents uuid[], p_limit integer)
RETURNS TABLE (id uuid, rank real)
LANGUAGE plpgsql STABLE SECURITY DEFINER SET search_path = pg_catalog, upload_pipeline AS $$
BEGIN
  RETURN QUERY EXECUTE upload_pipeline.keyword_candidates_sql() USING p_query, p_documents, p_limit;
END
$$;

-- The query search_chunks runs for `p_mode` (vector, keyword or hybrid) on the model `p_model` of `p_dimensions`:
-- $1 query vector, $2 tsquery, $3 the ids of the ready documents that pass the filter (when `p_filtered`), $4
-- candidates per list, $5 rrf_k, $6 vector weight, $7 keyword weight, $8 count. Each list is taken among those
-- documents (without a filter: among ready documents), then ranked exactly (the HNSW scan's relaxed order is only
-- approximately sorted). search_chunks runs it through EXECUTE, so $3 is a constant of the plan: `= ANY` is then a
-- hashed lookup, and the planner may prefer the chunks of a few documents by their index to the HNSW graph.
CREATE FUNCTION upload_pipeline.search_chunks_sql(p_mode text, p_model text, p_dimensions integer, p_filtered boolean)
RETURNS text
LANGUAGE sql IMMUTABLE AS $$
  SELECT format(
    'WITH %1$s fused AS (%2$s), '
    'top AS MATERIALIZED (SELECT f.id, f.score, f.vector_rank, f.keyword_rank FROM fused f '
    'ORDER BY f.score DESC, f.vector_rank NULLS LAST, f.keyword_rank NULLS LAST, f.id LIMIT $8) '
    'SELECT c.id, c.document_id, d.filename, d.content_type, c.chunk_index, c.content, c.metadata, '
    'd.metadata AS document_metadata, '
    'CASE WHEN jsonb_typeof(c.metadata -> ''page'') = ''number'' THEN (c.metadata ->> ''page'')::numeric::integer END AS page, '
    'CASE WHEN jsonb_typeof(c.metadata -> ''headings'') = ''array'' '
    'THEN ARRAY(SELECT jsonb_array_elements_text(c.metadata -> ''headings'')) ELSE ''{}''::text[] END AS headings, '
    'CASE WHEN jsonb_typeof(c.metadata #> ''{span,0}'') = ''number'' AND jsonb_typeof(c.metadata #> ''{span,1}'') = ''number'' '
    'THEN ARRAY[(c.metadata #>> ''{span,0}'')::numeric::bigint, (c.metadata #>> ''{span,1}'')::numeric::bigint] END AS span, '
    'f.score::double precision, f.vector_rank::integer, f.keyword_rank::integer '
    'FROM top f JOIN upload_pipeline.document_chunks c ON c.id = f.id '
    'JOIN upload_pipeline.documents d ON d.id = c.document_id '
    'ORDER BY f.score DESC, f.vector_rank NULLS LAST, f.keyword_rank NULLS LAST, f.id',
    concat_ws(' ',
      CASE WHEN p_mode IN ('vector', 'hybrid') THEN format(
        'vec AS MATERIALIZED (SELECT c.id, c.embedding::%1$s(%2$s) <=> $1::%1$s(%2$s) AS distance '
        'FROM upload_pipeline.document_chunks c %3$s'
        'ORDER BY c.embedding::%1$s(%2$s) <=> $1::%1$s(%2$s) LIMIT $4), '
        'vec_ranked AS (SELECT v.id, v.distance, row_number() OVER (ORDER BY v.distance, v.id) AS r FROM vec v),',
        upload_pipeline.vector_type_for(p_dimensions), p_dimensions,
        CASE WHEN p_filtered THEN format('WHERE c.embedding_model = %L AND c.document_id = ANY ($3) ', p_model)
             ELSE format('JOIN upload_pipeline.documents d ON d.id = c.document_id '
                         'WHERE c.embedding_model = %L AND d.status = ''ready'' ', p_model) END) END,
      CASE WHEN p_mode IN ('keyword', 'hybrid') THEN format(
        'kw AS MATERIALIZED (SELECT k.id, k.rank FROM upload_pipeline.keyword_candidates($2, %1$s, $4) k), '
        'kw_ranked AS (SELECT k.id, k.rank, row_number() OVER (ORDER BY k.rank DESC, k.id) AS r FROM kw k),',
        CASE WHEN p_filtered THEN '$3' ELSE 'NULL' END) END),
    CASE p_mode
      WHEN 'vector' THEN
        'SELECT v.id, 1 - v.distance AS score, v.r AS vector_rank, NULL::bigint AS keyword_rank FROM vec_ranked v'
      WHEN 'keyword' THEN
        'SELECT k.id, k.rank AS score, NULL::bigint AS vector_rank, k.r AS keyword_rank FROM kw_ranked k'
      ELSE
        'SELECT coalesce(v.id, k.id) AS id, '
        'coalesce($6 / ($5 + v.r), 0) + coalesce($7 / ($5 + k.r), 0) AS score, v.r AS vector_rank, k.r AS keyword_rank '
        'FROM vec_ranked v FULL JOIN kw_ranked k ON k.id = v.id'
    END)
$$;

-- The bounds of search_chunks' arguments (those of the `[search]` settings and `api.max_search_k`).
CREATE FUNCTION upload_pipeline.search_check(
  p_count integer, p_mode text, p_candidates integer, p_rrf_k integer, p_vector_weight double precision,
  p_keyword_weight double precision) RETURNS void
LANGUAGE plpgsql IMMUTABLE AS $$
BEGIN
  IF p_count IS NULL OR p_count NOT BETWEEN 1 AND 100 THEN
    RAISE EXCEPTION 'match_count must be between 1 and 100, got %', p_count USING ERRCODE = 'invalid_parameter_value';
  ELSIF p_mode IS NULL OR p_mode NOT IN ('hybrid', 'vector', 'keyword') THEN
    RAISE EXCEPTION 'mode must be hybrid, vector or keyword, got %', p_mode USING ERRCODE = 'invalid_parameter_value';
  ELSIF p_candidates IS NULL OR p_candidates NOT BETWEEN 1 AND 1000 THEN
    RAISE EXCEPTION 'candidates must be between 1 and 1000, got %', p_candidates
      USING ERRCODE = 'invalid_parameter_value';
  ELSIF p_rrf_k IS NULL OR p_rrf_k NOT BETWEEN 1 AND 1000 THEN
    RAISE EXCEPTION 'rrf_k must be between 1 and 1000, got %', p_rrf_k USING ERRCODE = 'invalid_parameter_value';
  ELSIF p_vector_weight IS NULL OR p_keyword_weight IS NULL OR p_vector_weight NOT BETWEEN 0 AND 100
        OR p_keyword_weight NOT BETWEEN 0 AND 100 OR p_vector_weight + p_keyword_weight = 0 THEN
    RAISE EXCEPTION 'vector_weight and keyword_weight must be between 0 and 100, not both 0'
      USING ERRCODE = 'invalid_parameter_value';
  END IF;
END
$$;

-- The best `match_count` chunks of the caller's ready documents for a query, for agents that query in SQL (the
-- API calls it too):
--   SET upload_pipeline.user_id = '<uuid>';  -- done by the API for its callers
--   SELECT * FROM upload_pipeline.search_chunks('ERR_TLS_CERT_ALTNAME_INVALID', '[...]'::vector, 5,
--                                               '{"type": "eq", "key": "team", "value": "ops"}');
-- mode: 'vector' (cosine similarity on the model's HNSW index; score = similarity), 'keyword'
-- (websearch_to_tsquery on content_tsv's GIN index; score = ts_rank_cd normalised to 0..1, query_embedding may be
-- NULL) or 'hybrid' (reciprocal rank fusion of the top `candidates` of both; score = sum of
-- weight / (rrf_k + rank)). vector_rank and keyword_rank are the hit's place in each list (NULL: not in it).
-- embedding_model: default the newest registered model of the query's dimension. Row-level security limits the
-- rows to the caller's; only ready documents are searched.
-- When the planner takes the vector list from the HNSW graph, the scan walks the graph's entries, the caller's and
-- other users' alike, until it has `candidates` rows that pass the filter and row-level security, or until it has
-- walked hnsw.max_scan_tuples entries, or outgrown work_mem times hnsw.scan_mem_multiplier. pgvector's defaults
-- (20,000 entries, 1 x work_mem: about 19,000 entries of 384 dimensions with the default 4 MB) are raised here to
-- 200,000 entries and 10 x work_mem (about 40 MB with 4 MB), so a selective filter, or a caller with few chunks
-- among many, is served from further down the graph. Past that it gets fewer than match_count hits: the function
-- promises the best of what the scan reached, not match_count hits. It sets no statement timeout (a timeout set
-- inside a function does not bound the statement that called it): the API sets `search.timeout` for its
-- transaction, and agents should set statement_timeout themselves.
CREATE FUNCTION upload_pipeline.search_chunks(
  query_text text,
  query_embedding vector,
  match_count integer DEFAULT 10,
  filter jsonb DEFAULT '{}',
  mode text DEFAULT 'hybrid',
  candidates integer DEFAULT 40,
  rrf_k integer DEFAULT 60,
  vector_weight double precision DEFAULT 1,
  keyword_weight double precision DEFAULT 1,
  embedding_model text DEFAULT NULL)
RETURNS TABLE (
  id uuid, document_id uuid, filename text, content_type text, chunk_index integer, content text, metadata jsonb,
  document_metadata jsonb, page integer, headings text[], span bigint[], score double precision,
  vector_rank integer, keyword_rank integer)
LANGUAGE plpgsql STABLE
SET hnsw.iterative_scan = 'relaxed_order'
SET hnsw.ef_search = 100
SET hnsw.max_scan_tuples = 200000
SET hnsw.scan_mem_multiplier = 10
AS $$
DECLARE
  v_filter jsonb := nullif(coalesce(search_chunks.filter, '{}'), '{}');
  v_model  text := search_chunks.embedding_model;
  v_dims   integer;
  v_query  tsquery;
  v_pool   integer;
  v_docs   uuid[];
BEGIN
  PERFORM upload_pipeline.search_check(search_chunks.match_count, search_chunks.mode, search_chunks.candidates,
    search_chunks.rrf_k, search_chunks.vector_weight, search_chunks.keyword_weight);
  PERFORM upload_pipeline.filter_validate(v_filter);
  IF search_chunks.mode <> 'keyword' THEN
    IF query_embedding IS NULL THEN
      RAISE EXCEPTION 'query_embedding is required in % mode', search_chunks.mode
        USING ERRCODE = 'invalid_parameter_value';
    END IF;
    v_dims := vector_dims(query_embedding);
    SELECT m.model INTO v_model FROM upload_pipeline.embedding_models m
    WHERE m.dimensions = v_dims AND (v_model IS NULL OR m.model = v_model)
    ORDER BY m.created_at DESC LIMIT 1;
    IF v_model IS NULL THEN
      RAISE EXCEPTION 'no embedding model of % dimensions is registered%', v_dims,
        coalesce(' under the name ' || quote_literal(search_chunks.embedding_model), '')
        USING ERRCODE = 'invalid_parameter_value';
    END IF;
  END IF;
  IF search_chunks.mode <> 'vector' THEN
    IF coalesce(btrim(query_text), '') = '' THEN
      RAISE EXCEPTION 'query_text is required in % mode', search_chunks.mode USING ERRCODE = 'invalid_parameter_value';
    END IF;
    v_query := websearch_to_tsquery(upload_pipeline.text_search_config(), query_text);
  END IF;
  -- The filter, once per document: the caller's ready documents that pass it (row-level security shows only the
  -- caller's). None: nothing to search.
  IF v_filter IS NOT NULL THEN
    v_filter := upload_pipeline.filter_prepare(v_filter);
    SELECT coalesce(array_agg(d.id), '{}') INTO v_docs FROM upload_pipeline.documents d
    WHERE d.status = 'ready' AND upload_pipeline.filter_matches(d, v_filter);
    IF cardinality(v_docs) = 0 THEN
      RETURN;
    END IF;
  END IF;
  -- Each list holds at least the hits asked for, and the HNSW scan looks at least that wide.
  v_pool := greatest(search_chunks.candidates, search_chunks.match_count);
  PERFORM set_config('hnsw.ef_search', greatest(100, v_pool)::text, true);
  RETURN QUERY EXECUTE upload_pipeline.search_chunks_sql(search_chunks.mode, v_model, v_dims, v_filter IS NOT NULL)
    USING query_embedding, v_query, v_docs, v_pool, search_chunks.rrf_k, search_chunks.vector_weight,
          search_chunks.keyword_weight, search_chunks.match_count;
END
$$;

-- match_chunks' HNSW scan may look as far as search_chunks' (see there).
ALTER FUNCTION upload_pipeline.match_chunks(vector, integer, jsonb) SET hnsw.max_scan_tuples = 200000;
ALTER FUNCTION upload_pipeline.match_chunks(vector, integer, jsonb) SET hnsw.scan_mem_multiplier = 10;

-- Privileges ---------------------------------------------------------------------------------------------------------
--
-- Postgres lets PUBLIC execute every new function. No function of this schema is for PUBLIC (it has no USAGE on the
-- schema either): the app role is granted what requests and stages call, explicitly, and the rest (setting the text
-- configuration, the keyword backfill, registering models) stays the owner's. That includes the two-argument
-- stale_jobs of the first migration, a fleet-wide read left callable by PUBLIC until now.
REVOKE EXECUTE ON ALL FUNCTIONS IN SCHEMA upload_pipeline FROM PUBLIC;
GRANT SELECT ON upload_pipeline.text_search TO upload_pipeline_app;
GRANT EXECUTE ON FUNCTION
  upload_pipeline.stale_jobs(timestamptz, integer),
  upload_pipeline.text_search_config(),
  upload_pipeline.vector_type_for(integer),
  upload_pipeline.filter_check(jsonb, text, integer),
  upload_pipeline.filter_check_comparison(jsonb, text),
  upload_pipeline.filter_check_value(text, text, jsonb, text),
  upload_pipeline.filter_validate(jsonb),
  upload_pipeline.filter_field(upload_pipeline.documents, text),
  upload_pipeline.filter_operand(text, jsonb),
  upload_pipeline.filter_prepare(jsonb),
  upload_pipeline.filter_compare(jsonb, text, jsonb),
  upload_pipeline.filter_in(jsonb, jsonb),
  upload_pipeline.filter_matches(upload_pipeline.documents, jsonb),
  upload_pipeline.keyword_candidates_sql(),
  upload_pipeline.keyword_candidates(tsquery, uuid[], integer),
  upload_pipeline.search_chunks_sql(text, text, integer, boolean),
  upload_pipeline.search_check(integer, text, integer, integer, double precision, double precision),
  upload_pipeline.search_chunks(text, vector, integer, jsonb, text, integer, integer, double precision,
                                double precision, text)
TO upload_pipeline_app;
REVOKE ALL ON FUNCTION upload_pipeline.set_text_search_config(regconfig) FROM upload_pipeline_app;
REVOKE ALL ON FUNCTION upload_pipeline.backfill_content_tsv(uuid, integer) FROM upload_pipeline_app;

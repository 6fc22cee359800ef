-- Revisions of each document, the current version included; a write adds one and prunes
-- those older than the kept bound, in the document's transaction. Every query of it runs
-- along the primary key (twin_id, name, version).

CREATE TABLE IF NOT EXISTS document_revisions (
    twin_id TEXT NOT NULL,
    name TEXT NOT NULL,
    version BIGINT NOT NULL,
    updated BIGINT NOT NULL,
    data JSONB NOT NULL,
    op TEXT NOT NULL,
    by_kind TEXT NOT NULL,
    by_id TEXT NOT NULL,
    PRIMARY KEY (twin_id, name, version)
);

-- Documents written before revisions were kept start their history at their current
-- version; who wrote it is unknown and recorded as the service.
INSERT INTO document_revisions (twin_id, name, version, updated, data, op, by_kind, by_id)
SELECT twin_id, name, version, updated, data,
    CASE WHEN version = 1 THEN 'create' ELSE 'put' END, 'service', ''
FROM documents
ON CONFLICT (twin_id, name, version) DO NOTHING;

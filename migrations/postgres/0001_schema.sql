-- The PostgreSQL store's tables. Times are Unix nanoseconds (BIGINT), as in the SQLite
-- store: a timestamptz keeps only microseconds, and SenML times carry more.

CREATE TABLE IF NOT EXISTS twins (
    id TEXT PRIMARY KEY,
    -- Creation order, for listing pages.
    pos BIGINT GENERATED ALWAYS AS IDENTITY,
    owner TEXT NOT NULL,
    name TEXT NOT NULL,
    revision BIGINT NOT NULL,
    created BIGINT NOT NULL,
    updated BIGINT NOT NULL,
    definitions JSONB NOT NULL,
    metadata JSONB NOT NULL
);
CREATE INDEX IF NOT EXISTS twins_owner_pos ON twins (owner, pos);
CREATE INDEX IF NOT EXISTS twins_owner_name ON twins (owner, name);
-- The metadata filter is a containment (@>) on this index, refined to equal values.
CREATE INDEX IF NOT EXISTS twins_metadata ON twins USING GIN (metadata jsonb_path_ops);

-- The attributes of each twin's current definition, for ingestion's lookup by channel
-- and subtopic.
CREATE TABLE IF NOT EXISTS twin_attributes (
    twin_id TEXT NOT NULL,
    channel TEXT NOT NULL,
    subtopic TEXT NOT NULL
);
CREATE INDEX IF NOT EXISTS twin_attributes_channel ON twin_attributes (channel, subtopic);
CREATE INDEX IF NOT EXISTS twin_attributes_twin ON twin_attributes (twin_id);

CREATE TABLE IF NOT EXISTS states (
    twin_id TEXT NOT NULL,
    id BIGINT NOT NULL,
    definition BIGINT NOT NULL,
    created BIGINT NOT NULL,
    payload JSONB NOT NULL,
    PRIMARY KEY (twin_id, id)
);
CREATE INDEX IF NOT EXISTS states_created ON states (twin_id, created);

CREATE TABLE IF NOT EXISTS documents (
    twin_id TEXT NOT NULL,
    name TEXT NOT NULL,
    version BIGINT NOT NULL,
    updated BIGINT NOT NULL,
    data JSONB NOT NULL,
    PRIMARY KEY (twin_id, name)
);

-- Stream sequence of the last message applied per twin, so redelivered messages never
-- create a second state.
CREATE TABLE IF NOT EXISTS ingest_cursors (
    twin_id TEXT PRIMARY KEY,
    seq BIGINT NOT NULL
);

-- Per instance group: the stream sequence of the last message applied, and the lease of
-- the one instance allowed to move it (until = Unix ns).
CREATE TABLE IF NOT EXISTS ingest_groups (
    grp TEXT PRIMARY KEY,
    seq BIGINT NOT NULL,
    holder TEXT NOT NULL,
    until BIGINT NOT NULL
);

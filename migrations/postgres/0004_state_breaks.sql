-- Per twin, the greatest id of a state created before the state before it. While it is
-- at or before the twin's first kept state, the history is in time order and a window
-- of it is a run of ids: its size and any page of it come from the primary key. Twins
-- whose states always came in order have no row.
CREATE TABLE IF NOT EXISTS state_breaks (
    twin_id TEXT PRIMARY KEY,
    last_break BIGINT NOT NULL
);
INSERT INTO state_breaks (twin_id, last_break)
    SELECT twin_id, MAX(id) FROM (
        SELECT twin_id, id, created < LAG(created) OVER (PARTITION BY twin_id ORDER BY id) AS b
        FROM states) AS s
    WHERE b GROUP BY twin_id
    ON CONFLICT (twin_id) DO NOTHING;

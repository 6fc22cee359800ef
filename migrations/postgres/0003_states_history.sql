-- History order (created, then id) in one index: ranges of states, the state in force at
-- an instant and summaries read it without sorting, and a page of a range is found on it
-- alone. It covers everything the (twin_id, created) index did.
CREATE INDEX IF NOT EXISTS states_history ON states (twin_id, created, id);
DROP INDEX IF EXISTS states_created;

-- Change events recorded with the writes that made them, until the relay has put them
-- on the feed's stream; relayed in id order, then deleted.
CREATE TABLE IF NOT EXISTS feed_outbox (
    id BIGINT GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    msg_id TEXT NOT NULL,
    owner TEXT NOT NULL,
    payload TEXT NOT NULL
);

-- [billing] events source (issue 16): events read from a table of the billing's own
-- database move into events_stack_compact exactly once. The cursor (the highest billing
-- id moved) changes in the same transaction as the insert; billing_moved remembers each
-- billing id moved, so that a row is never moved twice, and whether the billing row was
-- deleted or marked afterwards (`[billing] after_move`).
CREATE TABLE billing_cursor (
    id          BIGINT PRIMARY KEY CHECK (id = 1),
    last_id     BIGINT NOT NULL,
    updated_at  TIMESTAMPTZ NOT NULL DEFAULT now()
);

CREATE TABLE billing_moved (
    billing_id  BIGINT PRIMARY KEY,
    compact_id  BIGINT NOT NULL,
    moved_at    TIMESTAMPTZ NOT NULL DEFAULT now(),
    -- The billing row was deleted or marked (or nothing was to be done with it).
    done        BOOLEAN NOT NULL DEFAULT false
);
CREATE INDEX billing_moved_pending ON billing_moved (billing_id) WHERE NOT done;

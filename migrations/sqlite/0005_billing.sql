-- [billing] events source (issue 16): see migrations/postgres/0005_billing.sql.
CREATE TABLE billing_cursor (
    id          INTEGER PRIMARY KEY CHECK (id = 1),
    last_id     INTEGER NOT NULL,
    updated_at  INTEGER NOT NULL DEFAULT (CAST((julianday('now') - 2440587.5) * 86400000 AS INTEGER))
);

CREATE TABLE billing_moved (
    billing_id  INTEGER PRIMARY KEY,
    compact_id  INTEGER NOT NULL,
    moved_at    INTEGER NOT NULL DEFAULT (CAST((julianday('now') - 2440587.5) * 86400000 AS INTEGER)),
    done        INTEGER NOT NULL DEFAULT 0
);
CREATE INDEX billing_moved_pending ON billing_moved (billing_id) WHERE done = 0;

-- Coalescing (issue 17): see migrations/postgres/0006_superseded.sql. SQLite cannot
-- change a CHECK constraint, so events_history is rebuilt: a new table with the wider
-- CHECK, every row copied with its id, the AUTOINCREMENT sequence carried over (ids are
-- never reused, also those of pruned rows), the old table dropped, the new one renamed,
-- and the indexes of 0001 and 0004 made again. The migration runs in one transaction.

CREATE TABLE events_history_new (
    id               INTEGER PRIMARY KEY AUTOINCREMENT,
    event_id         INTEGER,
    compact_id       INTEGER,
    event_date       INTEGER,
    enqueued_at      INTEGER NOT NULL,
    cmd              TEXT NOT NULL,
    user_id          INTEGER NOT NULL,
    abonent_id       INTEGER,
    nas_id           INTEGER,
    usluga_id        INTEGER,
    acct_session_id  TEXT,
    params           TEXT NOT NULL DEFAULT '{}',
    outcome          TEXT NOT NULL CHECK (outcome IN ('done', 'failed', 'superseded')),
    attempts         INTEGER NOT NULL DEFAULT 0,
    commands         TEXT NOT NULL DEFAULT '[]',
    answer           TEXT NOT NULL DEFAULT '',
    error            TEXT,
    duration_ms      INTEGER NOT NULL DEFAULT 0,
    finished_at      INTEGER NOT NULL
);

INSERT INTO events_history_new (id, event_id, compact_id, event_date, enqueued_at, cmd,
    user_id, abonent_id, nas_id, usluga_id, acct_session_id, params, outcome, attempts,
    commands, answer, error, duration_ms, finished_at)
SELECT id, event_id, compact_id, event_date, enqueued_at, cmd, user_id, abonent_id,
    nas_id, usluga_id, acct_session_id, params, outcome, attempts, commands, answer,
    error, duration_ms, finished_at
FROM events_history ORDER BY id;

-- The copy set the new table's sequence to its highest id; the old one may be higher
-- (the newest rows pruned). sqlite_sequence has no key on name: replace the row.
DELETE FROM sqlite_sequence WHERE name = 'events_history_new';
INSERT INTO sqlite_sequence (name, seq)
    SELECT 'events_history_new', seq FROM sqlite_sequence WHERE name = 'events_history';

DROP TABLE events_history;
ALTER TABLE events_history_new RENAME TO events_history;

CREATE INDEX events_history_user_id ON events_history (user_id, id);
CREATE INDEX events_history_event_id ON events_history (event_id);
CREATE INDEX events_history_compact_id ON events_history (compact_id);
CREATE INDEX events_history_nas_id ON events_history (nas_id, id);
CREATE INDEX events_history_cmd ON events_history (cmd, id);
CREATE INDEX events_history_finished_at ON events_history (finished_at);
CREATE INDEX events_history_failed ON events_history (id) WHERE outcome = 'failed';
CREATE INDEX events_history_failed_nas ON events_history (nas_id, id) WHERE outcome = 'failed';
-- The console's `superseded` list, as for `failed`.
CREATE INDEX events_history_superseded ON events_history (id) WHERE outcome = 'superseded';

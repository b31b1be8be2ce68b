-- nasd schema for SQLite. Times are INTEGER milliseconds since the Unix epoch
-- (read them with datetime(col / 1000, 'unixepoch')); JSON is TEXT.

CREATE TABLE nas (
    id           INTEGER PRIMARY KEY,
    name         TEXT NOT NULL,
    ip           TEXT NOT NULL,
    scheme       TEXT,
    script_name  TEXT,
    n_workers    INTEGER NOT NULL DEFAULT 4 CHECK (n_workers BETWEEN 1 AND 100),
    protocol     TEXT,
    port         INTEGER CHECK (port BETWEEN 1 AND 65535),
    login        TEXT,
    password     TEXT,
    secret       TEXT,
    max_sessions INTEGER NOT NULL DEFAULT 4 CHECK (max_sessions BETWEEN 1 AND 100),
    enabled      INTEGER NOT NULL DEFAULT 1,
    updated_at   INTEGER NOT NULL DEFAULT (CAST((julianday('now') - 2440587.5) * 86400000 AS INTEGER)),
    CHECK (scheme IS NOT NULL OR script_name IS NOT NULL)
);
CREATE UNIQUE INDEX nas_ip_key ON nas (ip);

CREATE TABLE accounts (
    user_id     INTEGER PRIMARY KEY,
    abonent_id  INTEGER NOT NULL,
    nas_id      INTEGER NOT NULL,
    login       TEXT,
    ip          TEXT,
    mac         TEXT,
    vlan        INTEGER,
    auth_type   TEXT,
    snat_ip     TEXT,
    rate_in     INTEGER,
    rate_out    INTEGER,
    ceil_in     INTEGER,
    ceil_out    INTEGER,
    burst_in    INTEGER,
    burst_out   INTEGER,
    extra       TEXT NOT NULL DEFAULT '{}',
    updated_at  INTEGER NOT NULL DEFAULT (CAST((julianday('now') - 2440587.5) * 86400000 AS INTEGER))
);

CREATE TABLE events_stack_compact (
    id               INTEGER PRIMARY KEY AUTOINCREMENT,
    cmd              TEXT NOT NULL,
    user_id          INTEGER NOT NULL,
    abonent_id       INTEGER,
    nas_ip           TEXT,
    usluga_id        INTEGER,
    acct_session_id  TEXT,
    created_at       INTEGER NOT NULL DEFAULT (CAST((julianday('now') - 2440587.5) * 86400000 AS INTEGER))
);

CREATE TABLE events_stack (
    id               INTEGER PRIMARY KEY AUTOINCREMENT,
    compact_id       INTEGER,
    event_date       INTEGER NOT NULL,
    enqueued_at      INTEGER NOT NULL,
    cmd              TEXT NOT NULL,
    user_id          INTEGER NOT NULL,
    abonent_id       INTEGER,
    nas_id           INTEGER NOT NULL,
    usluga_id        INTEGER,
    acct_session_id  TEXT,
    params           TEXT NOT NULL DEFAULT '{}',
    owner_script     TEXT NOT NULL DEFAULT 'nasd',
    owner_function   TEXT NOT NULL DEFAULT 'expand',
    try_count        INTEGER NOT NULL DEFAULT 0,
    state            TEXT NOT NULL DEFAULT 'ready' CHECK (state IN ('ready', 'running')),
    retry_at         INTEGER,
    claim_token      INTEGER,
    claimed_at       INTEGER,
    lease_until      INTEGER,
    last_error       TEXT
);
CREATE INDEX events_stack_nas_id ON events_stack (nas_id, id);

CREATE TABLE events_history (
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
    outcome          TEXT NOT NULL CHECK (outcome IN ('done', 'failed')),
    attempts         INTEGER NOT NULL DEFAULT 0,
    commands         TEXT NOT NULL DEFAULT '[]',
    answer           TEXT NOT NULL DEFAULT '',
    error            TEXT,
    duration_ms      INTEGER NOT NULL DEFAULT 0,
    finished_at      INTEGER NOT NULL
);
CREATE INDEX events_history_user_id ON events_history (user_id, id);
CREATE INDEX events_history_event_id ON events_history (event_id);
CREATE INDEX events_history_compact_id ON events_history (compact_id);

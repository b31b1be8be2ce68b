-- nasd schema for PostgreSQL. Times are timestamptz; JSON is jsonb.

CREATE TABLE nas (
    id           BIGINT PRIMARY KEY,
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
    enabled      BOOLEAN NOT NULL DEFAULT TRUE,
    updated_at   TIMESTAMPTZ NOT NULL DEFAULT clock_timestamp(),
    CHECK (scheme IS NOT NULL OR script_name IS NOT NULL)
);
CREATE UNIQUE INDEX nas_ip_key ON nas (ip);

CREATE TABLE accounts (
    user_id     BIGINT PRIMARY KEY,
    abonent_id  BIGINT NOT NULL,
    nas_id      BIGINT NOT NULL,
    login       TEXT,
    ip          TEXT,
    mac         TEXT,
    vlan        INTEGER,
    auth_type   TEXT,
    snat_ip     TEXT,
    rate_in     BIGINT,
    rate_out    BIGINT,
    ceil_in     BIGINT,
    ceil_out    BIGINT,
    burst_in    BIGINT,
    burst_out   BIGINT,
    extra       JSONB NOT NULL DEFAULT '{}',
    updated_at  TIMESTAMPTZ NOT NULL DEFAULT clock_timestamp()
);

CREATE TABLE events_stack_compact (
    id               BIGSERIAL PRIMARY KEY,
    cmd              TEXT NOT NULL,
    user_id          BIGINT NOT NULL,
    abonent_id       BIGINT,
    nas_ip           TEXT,
    usluga_id        BIGINT,
    acct_session_id  TEXT,
    created_at       TIMESTAMPTZ NOT NULL DEFAULT clock_timestamp()
);

-- A wake-up hint for the daemon's expander; it polls as well.
CREATE FUNCTION nasd_notify_compact() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    PERFORM pg_notify('nasd_compact', '');
    RETURN NULL;
END
$$;
CREATE TRIGGER events_stack_compact_notify AFTER INSERT ON events_stack_compact
    FOR EACH STATEMENT EXECUTE FUNCTION nasd_notify_compact();

CREATE TABLE events_stack (
    id               BIGSERIAL PRIMARY KEY,
    compact_id       BIGINT,
    event_date       TIMESTAMPTZ NOT NULL DEFAULT clock_timestamp(),
    enqueued_at      TIMESTAMPTZ NOT NULL DEFAULT clock_timestamp(),
    cmd              TEXT NOT NULL,
    user_id          BIGINT NOT NULL,
    abonent_id       BIGINT,
    nas_id           BIGINT NOT NULL,
    usluga_id        BIGINT,
    acct_session_id  TEXT,
    params           JSONB NOT NULL DEFAULT '{}',
    owner_script     TEXT NOT NULL DEFAULT 'nasd',
    owner_function   TEXT NOT NULL DEFAULT 'expand',
    try_count        INTEGER NOT NULL DEFAULT 0,
    state            TEXT NOT NULL DEFAULT 'ready' CHECK (state IN ('ready', 'running')),
    retry_at         TIMESTAMPTZ,
    claim_token      BIGINT,
    claimed_at       TIMESTAMPTZ,
    lease_until      TIMESTAMPTZ,
    last_error       TEXT
);
CREATE INDEX events_stack_nas_id ON events_stack (nas_id, id);

CREATE TABLE events_history (
    id               BIGSERIAL PRIMARY KEY,
    event_id         BIGINT,
    compact_id       BIGINT,
    event_date       TIMESTAMPTZ,
    enqueued_at      TIMESTAMPTZ NOT NULL,
    cmd              TEXT NOT NULL,
    user_id          BIGINT NOT NULL,
    abonent_id       BIGINT,
    nas_id           BIGINT,
    usluga_id        BIGINT,
    acct_session_id  TEXT,
    params           JSONB NOT NULL DEFAULT '{}',
    outcome          TEXT NOT NULL CHECK (outcome IN ('done', 'failed')),
    attempts         INTEGER NOT NULL DEFAULT 0,
    commands         JSONB NOT NULL DEFAULT '[]',
    answer           TEXT NOT NULL DEFAULT '',
    error            TEXT,
    duration_ms      BIGINT NOT NULL DEFAULT 0,
    finished_at      TIMESTAMPTZ NOT NULL DEFAULT clock_timestamp()
);
CREATE INDEX events_history_user_id ON events_history (user_id, id);
CREATE INDEX events_history_event_id ON events_history (event_id);
CREATE INDEX events_history_compact_id ON events_history (compact_id);

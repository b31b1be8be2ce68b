-- Several daemons on one database (issue 13). Both tables are logged: a promoted
-- standby must know who owned what.

-- One row per daemon that joined. `session` is new at every join, so a daemon that
-- restarts under the same name does not inherit what its previous life held. The
-- lease is renewed in database time by the daemon's heartbeat.
CREATE TABLE nasd_daemons (
    id            TEXT PRIMARY KEY,
    session       BIGINT NOT NULL,
    host          TEXT NOT NULL,
    pid           INTEGER NOT NULL,
    version       TEXT NOT NULL,
    api           TEXT,
    started_at    TIMESTAMPTZ NOT NULL DEFAULT now(),
    heartbeat_at  TIMESTAMPTZ NOT NULL DEFAULT now(),
    lease_until   TIMESTAMPTZ NOT NULL,
    state         TEXT NOT NULL DEFAULT 'live'
                  CHECK (state IN ('live', 'draining', 'left', 'lost'))
);

-- Who owns each NAS. An ownership is valid while its daemon row has the same session
-- and an unexpired lease. `epoch` grows by one at every change of owner; claims carry
-- it, so an owner that lost the NAS claims nothing.
CREATE TABLE nas_owner (
    nas_id     BIGINT PRIMARY KEY,
    daemon_id  TEXT,
    session    BIGINT,
    epoch      BIGINT NOT NULL DEFAULT 0,
    since      TIMESTAMPTZ
);
CREATE INDEX nas_owner_session ON nas_owner (session);

-- Wake-ups for the owners of other daemons after an expansion (a hint; they poll too).
CREATE FUNCTION nasd_notify_stack(nas_ids BIGINT[]) RETURNS void LANGUAGE sql AS $$
    SELECT pg_notify('nasd_stack', array_to_string(nas_ids, ','));
$$;

-- The operator console (issue 14): a NAS can be paused, operator actions are audited,
-- and the console's lists and searches are answered from indexes.

ALTER TABLE nas ADD COLUMN paused INTEGER NOT NULL DEFAULT 0;

CREATE TABLE nasd_audit (
    id      INTEGER PRIMARY KEY AUTOINCREMENT,
    at      INTEGER NOT NULL DEFAULT (CAST((julianday('now') - 2440587.5) * 86400000 AS INTEGER)),
    who     TEXT NOT NULL,
    action  TEXT NOT NULL,
    target  TEXT NOT NULL DEFAULT '',
    detail  TEXT NOT NULL DEFAULT '',
    count   INTEGER NOT NULL DEFAULT 0
);

CREATE INDEX events_history_nas_id ON events_history (nas_id, id);
CREATE INDEX events_history_cmd ON events_history (cmd, id);
CREATE INDEX events_history_finished_at ON events_history (finished_at);
CREATE INDEX events_history_failed ON events_history (id) WHERE outcome = 'failed';
-- Bulk actions by NAS on failed events (the confirmation count walks only that NAS's failures).
CREATE INDEX events_history_failed_nas ON events_history (nas_id, id) WHERE outcome = 'failed';

CREATE INDEX events_stack_user_id ON events_stack (user_id, id);
CREATE INDEX events_stack_compact_id ON events_stack (compact_id);
CREATE INDEX events_stack_compact_user_id ON events_stack_compact (user_id, id);

-- Login compared lowercased in byte order (a prefix is a range); MAC as 12 lowercase
-- hex digits whatever the notation stored.
CREATE INDEX accounts_abonent_id ON accounts (abonent_id);
CREATE INDEX accounts_login ON accounts (lower(login));
CREATE INDEX accounts_ip ON accounts (ip);
CREATE INDEX accounts_mac ON accounts
    (lower(replace(replace(replace(mac, ':', ''), '-', ''), '.', '')));

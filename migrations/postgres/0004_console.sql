-- The operator console (issue 14): a NAS can be paused, operator actions are audited,
-- and the console's lists and searches are answered from indexes (1M history rows,
-- 100k queued events).

ALTER TABLE nas ADD COLUMN paused BOOLEAN NOT NULL DEFAULT FALSE;

CREATE TABLE nasd_audit (
    id      BIGSERIAL PRIMARY KEY,
    at      TIMESTAMPTZ NOT NULL DEFAULT now(),
    who     TEXT NOT NULL,
    action  TEXT NOT NULL,
    target  TEXT NOT NULL DEFAULT '',
    detail  TEXT NOT NULL DEFAULT '',
    count   BIGINT NOT NULL DEFAULT 0
);
-- The audit list pages by id (newest first): the primary key serves it.

-- History filtered by NAS, command, finish time; failed events on their own.
CREATE INDEX events_history_nas_id ON events_history (nas_id, id);
CREATE INDEX events_history_cmd ON events_history (cmd, id);
CREATE INDEX events_history_finished_at ON events_history (finished_at);
CREATE INDEX events_history_failed ON events_history (id) WHERE outcome = 'failed';
-- Bulk actions by NAS on failed events: the confirmation count walks only that NAS's
-- failures, and reads the error text from the index (an index-only scan).
CREATE INDEX events_history_failed_nas ON events_history (nas_id, id) INCLUDE (compact_id, error)
    WHERE outcome = 'failed';

-- An account's queued and running events; an event by its id (status, bulk actions).
CREATE INDEX events_stack_user_id ON events_stack (user_id, id);
CREATE INDEX events_stack_compact_id ON events_stack (compact_id);
CREATE INDEX events_stack_compact_user_id ON events_stack_compact (user_id, id);

-- Account search: by abonent, by login (exact or prefix, case-insensitive: compared
-- in byte order so a prefix is a range), by ip, by MAC in any notation (compared as
-- 12 lowercase hex digits).
CREATE INDEX accounts_abonent_id ON accounts (abonent_id);
CREATE INDEX accounts_login ON accounts ((lower(login)) COLLATE "C");
CREATE INDEX accounts_ip ON accounts (ip);
CREATE INDEX accounts_mac ON accounts
    ((lower(replace(replace(replace(mac, ':', ''), '-', ''), '.', ''))));

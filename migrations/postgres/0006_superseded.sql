-- Coalescing (issue 17): an event that a later queued event of the same account and
-- `[coalesce]` group replaced goes to history as `superseded`, never sent.
--
-- The CHECK of 0001 is replaced by one that also allows `superseded` (a superset, so
-- the rows already there pass it; adding it reads the table once, as the index below
-- does). 0001 left the constraint its default name.
ALTER TABLE events_history DROP CONSTRAINT IF EXISTS events_history_outcome_check;
ALTER TABLE events_history ADD CONSTRAINT events_history_outcome_check
    CHECK (outcome IN ('done', 'failed', 'superseded'));

-- The console's `superseded` list, as for `failed` (0004).
CREATE INDEX events_history_superseded ON events_history (id) WHERE outcome = 'superseded';

-- Per-NAS SSH settings: host key policy (strict | accept-new), a pinned key
-- fingerprint (SHA256:...), and legacy key exchange / ciphers for old devices.
ALTER TABLE nas ADD COLUMN host_key_policy TEXT NOT NULL DEFAULT 'strict'
    CHECK (host_key_policy IN ('strict', 'accept-new'));
ALTER TABLE nas ADD COLUMN host_key TEXT;
ALTER TABLE nas ADD COLUMN legacy_crypto BOOLEAN NOT NULL DEFAULT FALSE;

-- An ABillS-like billing schema (MySQL/MariaDB), reduced to what nasd reads: users,
-- their internet service (IP stored as an unsigned integer, as ABillS does) and tariff
-- plans. tests/billing.rs creates these tables in a database of its own and runs
-- contrib/billing/abills.toml against them.
CREATE TABLE users (
    uid         INT UNSIGNED NOT NULL PRIMARY KEY,
    id          VARCHAR(20) NOT NULL,
    company_id  INT UNSIGNED,
    disable     TINYINT(1) NOT NULL DEFAULT 0,
    deposit     DECIMAL(14, 2) NOT NULL DEFAULT 0
);
CREATE TABLE tarif_plans (
    tp_id      SMALLINT UNSIGNED NOT NULL PRIMARY KEY,
    name       VARCHAR(40) NOT NULL,
    speed_in   INT UNSIGNED NOT NULL,
    speed_out  INT UNSIGNED NOT NULL
);
CREATE TABLE internet_main (
    uid     INT UNSIGNED NOT NULL PRIMARY KEY,
    tp_id   SMALLINT UNSIGNED NOT NULL,
    ip      INT UNSIGNED NOT NULL DEFAULT 0,
    cid     VARCHAR(35) NOT NULL DEFAULT '',
    nas_id  SMALLINT UNSIGNED NOT NULL,
    vlan    SMALLINT UNSIGNED
);

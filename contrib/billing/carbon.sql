-- A Carbon-like billing schema (MySQL/MariaDB): the accounts and, beside them, the
-- billing's own compact event stack EVENTS_STACK_COMPACT that billing triggers fill.
-- tests/billing.rs creates these tables in a database of its own and runs
-- contrib/billing/carbon.toml against them.
CREATE TABLE USERS (
    ID          BIGINT NOT NULL PRIMARY KEY,
    ABONENT_ID  BIGINT NOT NULL,
    LOGIN       VARCHAR(64) NOT NULL,
    IP_ADDR     VARCHAR(45),
    NAS_ID      INT NOT NULL,
    SPEED_IN    BIGINT,
    SPEED_OUT   BIGINT,
    BALANCE     DECIMAL(12, 2) NOT NULL DEFAULT 0
);
CREATE TABLE EVENTS_STACK_COMPACT (
    ID               BIGINT NOT NULL AUTO_INCREMENT PRIMARY KEY,
    CMD              VARCHAR(64) NOT NULL,
    USER_ID          BIGINT NOT NULL,
    ABONENT_ID       BIGINT,
    NAS_IP           VARCHAR(45),
    USLUGA_ID        BIGINT,
    ACCT_SESSION_ID  VARCHAR(64),
    CREATED          DATETIME NOT NULL DEFAULT CURRENT_TIMESTAMP
);

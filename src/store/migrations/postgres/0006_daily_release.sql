-- PostgreSQL twin of sqlite/0006.
CREATE TABLE daily_contributions (
    day     BIGINT  NOT NULL,
    cell    BIGINT  NOT NULL,
    device  BYTEA   NOT NULL,
    PRIMARY KEY (day, cell, device)
);

CREATE INDEX daily_contributions_device ON daily_contributions (device, day);

CREATE TABLE daily_releases (
    day         BIGINT  NOT NULL,
    cell        BIGINT  NOT NULL,
    noisy       BIGINT  NOT NULL,
    suppressed  BIGINT  NOT NULL,
    PRIMARY KEY (day, cell)
);

CREATE INDEX daily_releases_cell ON daily_releases (cell, day);

CREATE TABLE daily_ledger (
    day            BIGINT           PRIMARY KEY NOT NULL,
    released_at    BIGINT           NOT NULL,
    mechanism      TEXT             NOT NULL,
    scale          DOUBLE PRECISION NOT NULL,
    rho            DOUBLE PRECISION NOT NULL,
    epsilon        DOUBLE PRECISION NOT NULL,
    l1_sensitivity DOUBLE PRECISION NOT NULL,
    l2_sensitivity DOUBLE PRECISION NOT NULL,
    threshold      BIGINT           NOT NULL,
    cells          BIGINT           NOT NULL
);

-- PostgreSQL twin of sqlite/0003.
CREATE TABLE contributions (
    bucket  BIGINT  NOT NULL,
    cell    BIGINT  NOT NULL,
    device  BYTEA   NOT NULL,
    PRIMARY KEY (bucket, cell, device)
);

CREATE INDEX contributions_device ON contributions (device);

CREATE TABLE releases (
    bucket      BIGINT  NOT NULL,
    cell        BIGINT  NOT NULL,
    noisy       BIGINT  NOT NULL,
    suppressed  BIGINT  NOT NULL,
    PRIMARY KEY (bucket, cell)
);

-- One entry per released bucket; the primary key is what makes a release happen once, on
-- every node (a second node's insert waits for the first's commit, then inserts nothing).
CREATE TABLE ledger (
    bucket         BIGINT           PRIMARY KEY NOT NULL,
    bucket_len_ms  BIGINT           NOT NULL,
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

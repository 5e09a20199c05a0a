-- PostgreSQL twin of sqlite/0005.
CREATE TABLE contribution_spend (
    device  BYTEA   NOT NULL,
    bucket  BIGINT  NOT NULL,
    pairs   BIGINT  NOT NULL,
    PRIMARY KEY (device, bucket)
);

CREATE INDEX contribution_spend_bucket ON contribution_spend (bucket);

CREATE TABLE offer_stats (
    day          BIGINT  NOT NULL,
    offer_id     TEXT    NOT NULL,
    merchant_id  TEXT    NOT NULL,
    deliveries   BIGINT  NOT NULL,
    opens        BIGINT  NOT NULL,
    PRIMARY KEY (day, offer_id)
);

CREATE INDEX offer_stats_merchant ON offer_stats (merchant_id, day);

CREATE TABLE offer_stats_ledger (
    day            BIGINT           PRIMARY KEY NOT NULL,
    released_at    BIGINT           NOT NULL,
    mechanism      TEXT             NOT NULL,
    scale          DOUBLE PRECISION NOT NULL,
    rho            DOUBLE PRECISION NOT NULL,
    epsilon        DOUBLE PRECISION NOT NULL,
    l1_sensitivity DOUBLE PRECISION NOT NULL,
    l2_sensitivity DOUBLE PRECISION NOT NULL,
    offers         BIGINT           NOT NULL
);

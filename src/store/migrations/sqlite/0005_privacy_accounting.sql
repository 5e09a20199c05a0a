-- Per-device contribution spend: how many (cell, bucket) pairs a device contributed per
-- bucket, without the cell. The raw contributions go when their bucket is released, but the
-- per-day bound holds over any 24 hours, so the spend of released buckets is kept until it
-- can no longer share a window with a new contribution (then the release deletes it).
CREATE TABLE contribution_spend (
    device  BLOB    NOT NULL,
    bucket  INTEGER NOT NULL,
    pairs   INTEGER NOT NULL,
    PRIMARY KEY (device, bucket)
) WITHOUT ROWID;

CREATE INDEX contribution_spend_bucket ON contribution_spend (bucket);

-- Released offer statistics: per offer and UTC day, noisy deliveries and opens. They hold
-- no individual; exact counts are never stored anywhere a merchant can read.
CREATE TABLE offer_stats (
    day          INTEGER NOT NULL,
    offer_id     TEXT    NOT NULL,
    merchant_id  TEXT    NOT NULL,
    deliveries   INTEGER NOT NULL,
    opens        INTEGER NOT NULL,
    PRIMARY KEY (day, offer_id)
) WITHOUT ROWID;

CREATE INDEX offer_stats_merchant ON offer_stats (merchant_id, day);

-- One entry per released day of offer statistics; the key makes a day release once.
CREATE TABLE offer_stats_ledger (
    day            INTEGER PRIMARY KEY NOT NULL,
    released_at    INTEGER NOT NULL,
    mechanism      TEXT    NOT NULL,
    scale          REAL    NOT NULL,
    rho            REAL    NOT NULL,
    epsilon        REAL    NOT NULL,
    l1_sensitivity REAL    NOT NULL,
    l2_sensitivity REAL    NOT NULL,
    offers         INTEGER NOT NULL
);

-- Raw foot-traffic contributions: one row per (bucket, cell, device), deduplicated by the
-- key. They live only until their bucket is released, then are deleted in the release's
-- own transaction.
CREATE TABLE contributions (
    bucket  INTEGER NOT NULL,
    cell    INTEGER NOT NULL,
    device  BLOB    NOT NULL,
    PRIMARY KEY (bucket, cell, device)
) WITHOUT ROWID;

CREATE INDEX contributions_device ON contributions (device);

-- Released noisy counts: what merchants read. They hold no individual.
CREATE TABLE releases (
    bucket      INTEGER NOT NULL,
    cell        INTEGER NOT NULL,
    noisy       INTEGER NOT NULL,
    suppressed  INTEGER NOT NULL,
    PRIMARY KEY (bucket, cell)
) WITHOUT ROWID;

-- One entry per released bucket; the primary key is what makes a release happen once.
CREATE TABLE ledger (
    bucket        INTEGER PRIMARY KEY NOT NULL,
    bucket_len_ms INTEGER NOT NULL,
    released_at   INTEGER NOT NULL,
    mechanism     TEXT    NOT NULL,
    scale         REAL    NOT NULL,
    rho           REAL    NOT NULL,
    epsilon       REAL    NOT NULL,
    l1_sensitivity REAL   NOT NULL,
    l2_sensitivity REAL   NOT NULL,
    threshold     INTEGER NOT NULL,
    cells         INTEGER NOT NULL
);

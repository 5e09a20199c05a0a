-- The daily release: distinct consenting devices per cell and UTC day.
-- Raw daily contributions: one row per (day, cell, device), at most privacy.max_cells_per_day
-- rows per (device, day) (the insert checks it in its own transaction, so the bound holds
-- across hourly releases, restarts and nodes). They live only until their day is released,
-- then are deleted in the release's own transaction.
CREATE TABLE daily_contributions (
    day     INTEGER NOT NULL,
    cell    INTEGER NOT NULL,
    device  BLOB    NOT NULL,
    PRIMARY KEY (day, cell, device)
) WITHOUT ROWID;

CREATE INDEX daily_contributions_device ON daily_contributions (device, day);

-- Released noisy daily counts: what merchants read for DAY. They hold no individual.
CREATE TABLE daily_releases (
    day         INTEGER NOT NULL,
    cell        INTEGER NOT NULL,
    noisy       INTEGER NOT NULL,
    suppressed  INTEGER NOT NULL,
    PRIMARY KEY (day, cell)
) WITHOUT ROWID;

CREATE INDEX daily_releases_cell ON daily_releases (cell, day);

-- One entry per released day; the primary key is what makes a day release once.
CREATE TABLE daily_ledger (
    day            INTEGER PRIMARY KEY NOT NULL,
    released_at    INTEGER NOT NULL,
    mechanism      TEXT    NOT NULL,
    scale          REAL    NOT NULL,
    rho            REAL    NOT NULL,
    epsilon        REAL    NOT NULL,
    l1_sensitivity REAL    NOT NULL,
    l2_sensitivity REAL    NOT NULL,
    threshold      INTEGER NOT NULL,
    cells          INTEGER NOT NULL
);

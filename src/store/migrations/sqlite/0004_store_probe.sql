-- The writer's health probe: a scratch table it inserts a 64 KiB blob into and deletes again
-- in one transaction, to learn whether the database can still take fresh pages. It holds no
-- data between probes.
CREATE TABLE store_probe (
    id INTEGER PRIMARY KEY,
    filler BLOB NOT NULL
);

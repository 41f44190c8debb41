//! Versioned schema migrations. Each entry moves the database from version `i` to `i + 1`
//! inside one transaction; `PRAGMA user_version` records where a database stands.

pub const MIGRATIONS: &[&str] = &[
    // 1: samples, versions, events (the outbox), traffic, metrics, key-value state.
    "
    CREATE TABLE state (
        key TEXT PRIMARY KEY,
        value TEXT NOT NULL
    );
    CREATE TABLE samples (
        id INTEGER PRIMARY KEY AUTOINCREMENT,
        sha256 TEXT NOT NULL UNIQUE,
        class TEXT NOT NULL,
        split TEXT NOT NULL CHECK (split IN ('train', 'validation')),
        origin TEXT NOT NULL,
        site TEXT,
        added_ms INTEGER NOT NULL,
        image BLOB,
        features BLOB NOT NULL
    );
    CREATE INDEX samples_by_class ON samples (class);
    CREATE TABLE versions (
        id INTEGER PRIMARY KEY AUTOINCREMENT,
        parent INTEGER REFERENCES versions (id),
        created_ms INTEGER NOT NULL,
        method TEXT NOT NULL,
        params TEXT NOT NULL,
        sample_set TEXT NOT NULL,
        metrics TEXT NOT NULL,
        status TEXT NOT NULL CHECK (status IN ('source', 'promoted', 'rejected')),
        reasons TEXT NOT NULL,
        weights BLOB,
        weights_sha256 TEXT
    );
    CREATE TABLE events (
        id INTEGER PRIMARY KEY AUTOINCREMENT,
        at_ms INTEGER NOT NULL,
        kind TEXT NOT NULL,
        payload TEXT NOT NULL,
        delivered INTEGER NOT NULL DEFAULT 0
    );
    CREATE INDEX events_undelivered ON events (delivered, id);
    CREATE TABLE traffic (
        id INTEGER PRIMARY KEY AUTOINCREMENT,
        at_ms INTEGER NOT NULL,
        features BLOB NOT NULL
    );
    CREATE TABLE metrics (
        id INTEGER PRIMARY KEY AUTOINCREMENT,
        at_ms INTEGER NOT NULL,
        version INTEGER NOT NULL,
        payload TEXT NOT NULL
    );
    INSERT INTO versions (id, parent, created_ms, method, params, sample_set, metrics, status, reasons)
        VALUES (0, NULL, 0, 'source', '{}', '{}', '{}', 'source', '[]');
    INSERT INTO state (key, value) VALUES ('promoted', '0');
    ",
    // 2: fleet commands, for idempotency: a repeated command id gets the stored answer.
    "
    CREATE TABLE commands (
        id TEXT PRIMARY KEY,
        received_ms INTEGER NOT NULL,
        command TEXT NOT NULL,
        response TEXT
    );
    ",
    // 3: the metrics table, which nothing wrote: the metrics history is the MQTT metrics stream.
    "
    DROP TABLE metrics;
    ",
    // 4: recent classified images for labelling on the console, and who labelled each sample.
    "
    CREATE TABLE traffic_images (
        id INTEGER PRIMARY KEY AUTOINCREMENT,
        at_ms INTEGER NOT NULL,
        name TEXT NOT NULL,
        predicted TEXT NOT NULL,
        confidence REAL NOT NULL,
        top TEXT NOT NULL,
        image BLOB NOT NULL,
        bytes INTEGER NOT NULL,
        thumbnail BLOB,
        dhash INTEGER,
        sample INTEGER,
        skipped INTEGER NOT NULL DEFAULT 0
    );
    CREATE INDEX traffic_images_unthumbed ON traffic_images (id) WHERE thumbnail IS NULL;
    ALTER TABLE samples ADD COLUMN labelled_by TEXT;
    ",
    // 5: artefacts arriving in chunks from the fleet, kept so a transfer resumes.
    "
    CREATE TABLE transfers (
        transfer TEXT PRIMARY KEY,
        manifest TEXT NOT NULL,
        total_bytes INTEGER NOT NULL,
        offered_ms INTEGER NOT NULL,
        verified INTEGER NOT NULL DEFAULT 0
    );
    CREATE TABLE transfer_chunks (
        transfer TEXT NOT NULL,
        idx INTEGER NOT NULL,
        bytes BLOB NOT NULL,
        PRIMARY KEY (transfer, idx)
    );
    ",
    // 6: deployed bundles: the bundle each version and each sample's split tensors belong to.
    "
    ALTER TABLE versions ADD COLUMN bundle TEXT;
    ALTER TABLE samples ADD COLUMN bundle TEXT;
    UPDATE versions SET bundle = (SELECT value FROM state WHERE key = 'bundle') WHERE id > 0;
    UPDATE samples SET bundle = (SELECT value FROM state WHERE key = 'bundle');
    CREATE INDEX samples_by_bundle ON samples (bundle);
    ",
];

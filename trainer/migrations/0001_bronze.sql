-- Bronze: the data set's rows exactly as they arrived, as text, with where
-- they came from. Validation and typing happen in silver.
CREATE SCHEMA IF NOT EXISTS bronze;

CREATE TABLE bronze.events (
    source_file   text   NOT NULL,
    source_line   bigint NOT NULL,
    event_time    text,
    event_type    text,
    product_id    text,
    category_id   text,
    category_code text,
    brand         text,
    price         text,
    user_id       text,
    user_session  text,
    PRIMARY KEY (source_file, source_line)
);

-- One row per loaded file, written in the same transaction as its rows: a
-- file whose checksum is here is complete, and loading it again adds nothing.
CREATE TABLE bronze.load_manifest (
    checksum    text        PRIMARY KEY,
    source_file text        NOT NULL,
    rows        bigint      NOT NULL,
    loaded_at   timestamptz NOT NULL DEFAULT now()
);

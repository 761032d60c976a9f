-- Silver: typed events that passed cartscore-core's validation (the same
-- code the appliance runs), one row per distinct event. `event_key` is a
-- 16-byte BLAKE3 hash of the validated fields, so an exact duplicate row,
-- from the same file or another, is kept once and recorded in
-- silver.duplicates. Rows that fail validation go to silver.rejects with
-- the reason; nothing is dropped silently. The key leads with event_time:
-- events arrive roughly in time order, so the index grows at its end
-- instead of taking random inserts (3x faster loads than a bare hash key),
-- and it serves the trainer's time-ordered scan.
CREATE SCHEMA IF NOT EXISTS silver;

CREATE TABLE silver.events (
    event_key     bytea            NOT NULL,
    event_time    timestamptz      NOT NULL,
    event_type    text             NOT NULL
                  CHECK (event_type IN ('view', 'cart', 'remove_from_cart', 'purchase')),
    product_id    bigint           NOT NULL CHECK (product_id > 0),
    category_id   bigint           NOT NULL CHECK (category_id > 0),
    category_code text,
    brand         text,
    price         double precision NOT NULL CHECK (price >= 0),
    user_id       bigint           NOT NULL CHECK (user_id > 0),
    user_session  text             NOT NULL,
    source_file   text             NOT NULL,
    source_line   bigint           NOT NULL,
    PRIMARY KEY (event_time, event_key)
);
-- Purchases are rare: this small index answers "was this cart bought?".
CREATE INDEX events_purchases ON silver.events (user_session, product_id) WHERE event_type = 'purchase';

CREATE TABLE silver.rejects (
    source_file text   NOT NULL,
    source_line bigint NOT NULL,
    reason_code text   NOT NULL,
    reason      text   NOT NULL,
    PRIMARY KEY (source_file, source_line)
);

CREATE TABLE silver.duplicates (
    source_file text   NOT NULL,
    source_line bigint NOT NULL,
    event_key   bytea  NOT NULL,
    PRIMARY KEY (source_file, source_line)
);

ALTER TABLE bronze.load_manifest
    ADD COLUMN valid      bigint NOT NULL DEFAULT 0,
    ADD COLUMN rejected   bigint NOT NULL DEFAULT 0,
    ADD COLUMN duplicates bigint NOT NULL DEFAULT 0;

-- The dimensional model: dimensions kept current by every load, facts as
-- views over silver so they can never disagree with it.
CREATE SCHEMA IF NOT EXISTS warehouse;

CREATE TABLE warehouse.dim_category (
    category_id   bigint      PRIMARY KEY,
    category_code text,
    level1        text,
    level2        text,
    level3        text,
    first_seen    timestamptz NOT NULL,
    last_seen     timestamptz NOT NULL
);

CREATE TABLE warehouse.dim_brand (
    brand      text        PRIMARY KEY,
    first_seen timestamptz NOT NULL,
    last_seen  timestamptz NOT NULL
);

CREATE TABLE warehouse.dim_product (
    product_id  bigint           PRIMARY KEY,
    category_id bigint           NOT NULL,
    brand       text,
    last_price  double precision NOT NULL,
    first_seen  timestamptz      NOT NULL,
    last_seen   timestamptz      NOT NULL
);

CREATE TABLE warehouse.dim_user (
    user_id    bigint      PRIMARY KEY,
    first_seen timestamptz NOT NULL,
    last_seen  timestamptz NOT NULL,
    events     bigint      NOT NULL
);

-- Calendar of the UTC dates that have events; weekday is ISO (1 = Monday).
CREATE TABLE warehouse.dim_date (
    date_key   date    PRIMARY KEY,
    year       int     NOT NULL,
    quarter    int     NOT NULL,
    month      int     NOT NULL,
    day        int     NOT NULL,
    iso_week   int     NOT NULL,
    weekday    int     NOT NULL,
    is_weekend boolean NOT NULL
);

CREATE VIEW warehouse.fact_events AS
SELECT e.event_key,
       e.event_time,
       (e.event_time AT TIME ZONE 'UTC')::date               AS date_key,
       extract(hour FROM e.event_time AT TIME ZONE 'UTC')::int AS hour,
       e.event_type,
       e.product_id,
       e.category_id,
       e.brand,
       e.user_id,
       e.user_session,
       e.price
FROM silver.events e;

-- Every cart event with its outcome: bought when the same session later
-- purchases the same product (the training label; the trainer's replay also
-- ends a session after its idle timeout, which only matters for sessions
-- idle for longer than that).
CREATE VIEW warehouse.fact_cart_outcomes AS
SELECT c.event_key,
       c.event_time,
       (c.event_time AT TIME ZONE 'UTC')::date AS date_key,
       c.user_id,
       c.user_session,
       c.product_id,
       c.category_id,
       c.brand,
       c.price,
       EXISTS (
           SELECT 1
           FROM silver.events p
           WHERE p.event_type = 'purchase'
             AND p.user_session = c.user_session
             AND p.product_id = c.product_id
             AND (p.event_time, p.source_file COLLATE "C", p.source_line)
                 > (c.event_time, c.source_file COLLATE "C", c.source_line)
       ) AS purchased
FROM silver.events c
WHERE c.event_type = 'cart';

-- Gold: the offline feature store. Every training run from the warehouse
-- writes back the point-in-time feature rows its replay computed, exactly
-- as the model saw them (string columns already encoded), with the label
-- and the window each row fell in.
CREATE SCHEMA IF NOT EXISTS gold;

CREATE TABLE gold.training_runs (
    model_version    text        PRIMARY KEY,
    data_fingerprint text        NOT NULL,
    contract_version int         NOT NULL,
    source           text        NOT NULL,
    trained_at       timestamptz NOT NULL DEFAULT now(),
    examples         bigint      NOT NULL,
    report           jsonb       NOT NULL
);

CREATE TABLE gold.feature_rows (
    model_version                 text        NOT NULL REFERENCES gold.training_runs ON DELETE CASCADE,
    example                       int         NOT NULL,
    event_time                    timestamptz NOT NULL,
    user_session                  text        NOT NULL,
    product_id                    bigint      NOT NULL,
    split                         text        NOT NULL CHECK (split IN ('train', 'validation', 'test')),
    label                         boolean     NOT NULL,
    brand_freq                    real        NOT NULL,
    brand_purchase_rate           real        NOT NULL,
    price                         real        NOT NULL,
    weekday                       real        NOT NULL,
    category_l1_freq              real        NOT NULL,
    category_l1_purchase_rate     real        NOT NULL,
    category_l2_freq              real        NOT NULL,
    category_l2_purchase_rate     real        NOT NULL,
    session_events                real        NOT NULL,
    session_views                 real        NOT NULL,
    session_carts                 real        NOT NULL,
    session_removes               real        NOT NULL,
    session_purchases             real        NOT NULL,
    session_distinct_products     real        NOT NULL,
    product_views_in_session      real        NOT NULL,
    product_prev_carts_in_session real        NOT NULL,
    session_age_seconds           real        NOT NULL,
    seconds_since_prev_event      real        NOT NULL,
    price_to_mean_view_price      real        NOT NULL,
    hour_of_day                   real        NOT NULL,
    user_prev_sessions            real        NOT NULL,
    user_carts                    real        NOT NULL,
    user_purchases                real        NOT NULL,
    user_purchase_rate            real        NOT NULL,
    user_days_since_first_seen    real        NOT NULL,
    PRIMARY KEY (model_version, example)
);

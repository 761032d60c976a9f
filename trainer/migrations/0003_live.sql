-- Live: the appliance's resolved outcomes (every scored cart joined with
-- whether it was bought), copied from its GET /v1/outcomes by
-- `cartscore-trainer outcomes`, so the serving models' real quality sits
-- beside the training runs that produced them. `source` names the appliance
-- (several may feed one warehouse); `seq` is its store's sequence number,
-- so a page copied twice adds nothing.
CREATE SCHEMA IF NOT EXISTS live;

CREATE TABLE live.outcomes (
    source                   text             NOT NULL,
    seq                      bigint           NOT NULL,
    user_id                  bigint           NOT NULL,
    user_session             text             NOT NULL,
    product_id               bigint           NOT NULL,
    cart_time                timestamptz      NOT NULL,
    model_version            text             NOT NULL,
    probability              double precision NOT NULL CHECK (probability BETWEEN 0 AND 1),
    scored_at                timestamptz      NOT NULL,
    canary                   boolean          NOT NULL,
    paired_model_version     text,
    paired_probability       double precision,
    label                    boolean          NOT NULL,
    resolved_at              timestamptz      NOT NULL,
    resolution_delay_seconds double precision NOT NULL,
    PRIMARY KEY (source, seq)
);
CREATE INDEX outcomes_by_version ON live.outcomes (model_version, cart_time);

-- Where each source's copy stands: written in the transaction of the rows
-- it covers, so an interrupted copy resumes exactly where it stopped.
CREATE TABLE live.cursors (
    source     text        PRIMARY KEY,
    next_seq   bigint      NOT NULL,
    copied_at  timestamptz NOT NULL DEFAULT now()
);

-- Every score a version gave a resolved cart: the one that answered
-- (`served`) and the other model's on the same cart (`shadow`: a shadow
-- model's, or the primary's beside a canary's answer), so champion and
-- challenger are compared on the same carts.
CREATE VIEW live.scores AS
SELECT source, seq, cart_time, model_version, probability, label, 'served' AS scored_as
FROM live.outcomes
UNION ALL
SELECT source, seq, cart_time, paired_model_version, paired_probability, label, 'shadow'
FROM live.outcomes
WHERE paired_model_version IS NOT NULL;

-- Quality per model version, role and UTC day of the cart, computed as the
-- appliance computes it: ROC-AUC from mid-ranks (ties count one half),
-- log-loss with probabilities clipped to [1e-15, 1 - 1e-15], Brier score.
CREATE VIEW live.quality_by_day AS
WITH ranked AS (
    SELECT model_version,
           scored_as,
           (cart_time AT TIME ZONE 'UTC')::date AS day,
           label,
           probability,
           rank() OVER w + (count(*) OVER t - 1) / 2.0 AS mid_rank
    FROM live.scores
    WINDOW w AS (PARTITION BY model_version, scored_as, (cart_time AT TIME ZONE 'UTC')::date ORDER BY probability),
           t AS (PARTITION BY model_version, scored_as, (cart_time AT TIME ZONE 'UTC')::date, probability)
)
SELECT model_version,
       scored_as,
       day,
       count(*)                           AS outcomes,
       avg(label::int)                    AS positive_rate,
       avg(probability)                   AS mean_probability,
       (sum(mid_rank) FILTER (WHERE label)
          - count(*) FILTER (WHERE label) * (count(*) FILTER (WHERE label) + 1) / 2.0)
         / nullif(count(*) FILTER (WHERE label) * count(*) FILTER (WHERE NOT label), 0)
                                          AS roc_auc,
       -avg(CASE WHEN label THEN ln(greatest(probability, 1e-15))
                 ELSE ln(greatest(1 - probability, 1e-15)) END)
                                          AS log_loss,
       avg(power(probability - label::int, 2)) AS brier
FROM ranked
GROUP BY model_version, scored_as, day;

-- The same over every outcome of a version and role.
CREATE VIEW live.quality AS
WITH ranked AS (
    SELECT model_version,
           scored_as,
           label,
           probability,
           rank() OVER w + (count(*) OVER t - 1) / 2.0 AS mid_rank
    FROM live.scores
    WINDOW w AS (PARTITION BY model_version, scored_as ORDER BY probability),
           t AS (PARTITION BY model_version, scored_as, probability)
)
SELECT model_version,
       scored_as,
       count(*)                           AS outcomes,
       avg(label::int)                    AS positive_rate,
       avg(probability)                   AS mean_probability,
       (sum(mid_rank) FILTER (WHERE label)
          - count(*) FILTER (WHERE label) * (count(*) FILTER (WHERE label) + 1) / 2.0)
         / nullif(count(*) FILTER (WHERE label) * count(*) FILTER (WHERE NOT label), 0)
                                          AS roc_auc,
       -avg(CASE WHEN label THEN ln(greatest(probability, 1e-15))
                 ELSE ln(greatest(1 - probability, 1e-15)) END)
                                          AS log_loss,
       avg(power(probability - label::int, 2)) AS brier
FROM ranked
GROUP BY model_version, scored_as;

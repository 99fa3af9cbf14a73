-- Meterline's ClickHouse schema, version 4: the months `aggregator close` has closed (HR-7).
-- One row per close, written before the close reads the month's lines; the invoice lines of
-- that close are in invoice_lines under the same close_version. The raters learn of a close
-- from the compacted closed-months Kafka topic (see docs/ARCHITECTURE.md); this table is the
-- analysts' record of it.

CREATE TABLE IF NOT EXISTS {database}.closed_months
(
    billing_month      Date,
    close_version      UInt64,                 -- milliseconds since the epoch of the close
    closed_at          DateTime,               -- the close version, in seconds
    marketplace        String,                 -- the profile id of the price book closed under
    price_book_version String
)
ENGINE = MergeTree
ORDER BY (billing_month, close_version);

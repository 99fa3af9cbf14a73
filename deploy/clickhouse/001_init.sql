-- Meterline's ClickHouse schema, version 1. Runs on ClickHouse 18.16 (Debian) and 24.x+.
-- `{database}` is replaced by the configured database. Statements are separated by `;` at the
-- end of a line. Applied by `aggregator migrate` (and by the aggregator at start).
--
-- Every table is written idempotently: a replay after a crash writes rows that the engine
-- collapses (ReplacingMergeTree); read them with FINAL (or argMax) for exact answers before
-- background merges have run.

CREATE TABLE IF NOT EXISTS {database}.rated_usage
(
    record_id          String,          -- MeteringRecordId returned to the seller
    dedup_key          String,          -- fingerprint of (product, customer, dimension, hour)
    seller             String,
    product            String,
    customer           String,
    dimension          String,
    usage_hour         DateTime,        -- UTC hour of the usage
    month              Date,            -- first day of the billing month
    quantity           Decimal(38, 9),
    covered_quantity   Decimal(38, 9),  -- absorbed by annual subscriptions (Y−X)
    billable_quantity  Decimal(38, 9),
    unit_rate          Decimal(38, 12),
    currency           String,
    amount             Decimal(38, 18), -- billable_quantity × unit_rate, exact
    charge_type        String,
    agreement_id       String,
    offer_id           String,
    price_book_version String,
    pricing_model      String,          -- per_unit | graduated | volume | package | per_duration | byol
    month_price        String,          -- JSON price of a month-priced model (tiers, packages); '' otherwise
    source_partition   Int32,           -- rated-topic partition and offset it was read from
    source_offset      Int64,
    inserted_at        DateTime
)
ENGINE = ReplacingMergeTree
PARTITION BY toYYYYMM(month)
ORDER BY (dedup_key);

CREATE TABLE IF NOT EXISTS {database}.monthly_charges
(
    month                  Date,            -- billing month (first day)
    usage_period_start     DateTime,
    usage_period_end       DateTime,        -- exclusive
    marketplace            String,
    customer               String,          -- payer / end user (one account per customer for now)
    seller_of_record       String,
    manufacturer           String,
    channel                String,          -- direct | cppo | dsor
    product                String,
    agreement_id           String,
    offer_id               String,
    dimension              String,
    charge_type            String,
    pricing_model          String,
    currency               String,
    quantity               Decimal(38, 9),
    covered_quantity       Decimal(38, 9),
    billable_quantity      Decimal(38, 9),
    unit_rate              Decimal(38, 12), -- the rate when one applied all month (see mixed_rates)
    mixed_rates            UInt8,           -- 1 when the month spans a price change
    month_price            String,          -- JSON price the month-priced quantity is priced at ('' if none)
    month_price_hour       DateTime,        -- hour of the record that set month_price (latest wins)
    month_priced_quantity  Decimal(38, 9),  -- billable quantity priced by month_price
    record_amounts         Decimal(38, 18), -- exact sum of the record-priced line items
    amount_unrounded       Decimal(38, 18), -- record_amounts + month_price(month_priced_quantity), exact
    customer_billed_amount Decimal(38, 9),  -- rounded half-up once to the currency's minor unit
    records                UInt64,
    source_partition       Int32,           -- the rated partition that owns this line
    version                Int64,           -- last rated offset folded in: the newest row wins
    updated_at             DateTime
)
ENGINE = ReplacingMergeTree(version)
PARTITION BY toYYYYMM(month)
ORDER BY (month, customer, product, agreement_id, dimension, charge_type, currency);

CREATE TABLE IF NOT EXISTS {database}.rejected_records
(
    rejection_id   String,
    received_at    DateTime,
    received_at_ms Int64,
    seller         String,
    product        String,
    customer       String,
    record_id      String,     -- empty when the record did not parse far enough
    reason         String,     -- DuplicateRecord, TimestampOutOfBounds, …
    message        String,
    raw            String
)
ENGINE = ReplacingMergeTree
PARTITION BY toYYYYMM(received_at)
ORDER BY (rejection_id);

CREATE TABLE IF NOT EXISTS {database}.dead_letters
(
    at               DateTime,
    stage            String,
    source_topic     String,
    source_partition Int32,
    source_offset    Int64,
    reason           String,
    payload_hex      String
)
ENGINE = ReplacingMergeTree
ORDER BY (source_topic, source_partition, source_offset);

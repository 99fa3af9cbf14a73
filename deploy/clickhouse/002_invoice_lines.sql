-- Meterline's ClickHouse schema, version 2: the invoice lines month close writes (RPT-6).
-- Append-only, like billing events: closing a month again writes a new close_version and
-- never updates or deletes a row. Read the current close through invoice_lines_current.

CREATE TABLE IF NOT EXISTS {database}.invoice_lines
(
    close_version            UInt64,          -- milliseconds since the epoch of the close
    billing_month            Date,
    usage_period_start       DateTime,
    usage_period_end         DateTime,        -- exclusive
    marketplace              String,
    broker_id                String,
    invoice_id               String,
    invoice_date             Date,
    seller_of_record         String,
    manufacturer             String,
    channel                  String,          -- direct | cppo | dsor
    customer                 String,
    customer_identifier      String,
    payer_account_id         String,
    product                  String,
    offer_id                 String,
    offer_visibility         String,          -- public | private
    agreement_id             String,
    dimension                String,
    usage_unit               String,
    charge_type              String,          -- usage | monthly_fee | contract_upfront | installment | credit | adjustment
    description              String,
    pricing_model            String,
    quantity                 Decimal(38, 9),
    unit_rate                Nullable(Decimal(38, 12)),
    currency                 String,
    amount_unrounded         Decimal(38, 18), -- exact (prorations rounded at 18 dp)
    customer_billed_amount   Decimal(38, 9),  -- rounded half-up once to the minor unit
    listing_fee_rate         Decimal(38, 12),
    listing_fee              Decimal(38, 9),
    cost_of_goods            Decimal(38, 9),
    manufacturer_listing_fee Decimal(38, 9),
    seller_net               Decimal(38, 9),
    manufacturer_net         Decimal(38, 9),
    reporting_currency       String,
    reporting_amount         Nullable(Decimal(38, 9)),
    metering_records         UInt64
)
ENGINE = MergeTree
PARTITION BY toYYYYMM(billing_month)
ORDER BY (billing_month, close_version, customer, currency, product, agreement_id, charge_type, dimension);

CREATE VIEW IF NOT EXISTS {database}.invoice_lines_current AS
SELECT * FROM {database}.invoice_lines
WHERE (billing_month, close_version) IN
    (SELECT billing_month, max(close_version) FROM {database}.invoice_lines GROUP BY billing_month);

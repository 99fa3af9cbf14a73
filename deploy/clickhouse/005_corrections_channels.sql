-- Issue 17 items 2 and 5: corrections of closed months priced at the position the month had
-- reached, and the two-level (DSOR channel model) party written as columns, not only in JSON.
-- Applied once to an existing 004 database, as 003 is: `migrate` records version 5 in
-- schema_migrations and skips it afterwards, so running it again changes nothing (ClickHouse
-- 18.16 has no ADD COLUMN IF NOT EXISTS). Existing rows read the defaults (no corrections, no
-- distributor).

-- The corrections an adjustment line carries (JSON of each corrected month's closed and late
-- quantity and price; '' for every other line): the line's amount includes their deltas.
ALTER TABLE {database}.monthly_charges
    ADD COLUMN corrections String DEFAULT '';

-- The invoice line's references and the DSOR partner's share, written by the close directly.
ALTER TABLE {database}.invoice_lines
    ADD COLUMN corrects String DEFAULT '',
    ADD COLUMN distributor String DEFAULT '',
    ADD COLUMN distributor_cost_of_goods Nullable(Decimal(38, 9)),
    ADD COLUMN distributor_listing_fee Nullable(Decimal(38, 9)),
    ADD COLUMN distributor_net Nullable(Decimal(38, 9));

-- ClickHouse 18.16 expands a view's `SELECT *` when the view is created: recreate the current
-- view so it shows the new columns (same definition as in 002 and 003).
DROP TABLE IF EXISTS {database}.invoice_lines_current;

CREATE VIEW IF NOT EXISTS {database}.invoice_lines_current AS
SELECT * FROM {database}.invoice_lines
WHERE (billing_month, close_version) IN
    (SELECT billing_month, max(close_version) FROM {database}.invoice_lines GROUP BY billing_month);

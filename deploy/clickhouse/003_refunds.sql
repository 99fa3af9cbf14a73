-- Meterline's ClickHouse schema, version 3: refunds (credit notes) on invoice_lines (issue 17).
-- charge_type gains `annual` and `refund`. A refund line has negative amounts, and credits_line naming the line it
-- credits (`invoice_id/agreement_id/charge_type/dimension` of that line; empty on other lines).
-- The server derives the column from the line's description, which month close writes as
-- "refund of <credits_line>: <reason> (…)", so rows written without the column (and the rows of
-- earlier closes, which are not refunds) get it right; a writer that sends it overrides it.

ALTER TABLE {database}.invoice_lines
    ADD COLUMN credits_line String DEFAULT if(charge_type = 'refund', extract(description, '^refund of ([^ ]+): '), '');

-- ClickHouse 18.16 expands a view's `SELECT *` when the view is created: recreate the current
-- view so it shows the new column (same definition as in 002).
DROP TABLE IF EXISTS {database}.invoice_lines_current;

CREATE VIEW IF NOT EXISTS {database}.invoice_lines_current AS
SELECT * FROM {database}.invoice_lines
WHERE (billing_month, close_version) IN
    (SELECT billing_month, max(close_version) FROM {database}.invoice_lines GROUP BY billing_month);

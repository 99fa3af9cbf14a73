-- Issue 16 item 3: the seller's UsageAllocations travel with each rated record into ClickHouse, as
-- into the embedded store, so the query API's per-tag breakdown answers alike in both modes.
-- The canonical allocations as JSON (the embedded store's `allocations` text); '' when the seller
-- sent none. Applied once, as 005 is; existing rows read '' (untagged).
ALTER TABLE {database}.rated_usage
    ADD COLUMN allocations String DEFAULT '';

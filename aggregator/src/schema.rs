//! Versioned ClickHouse migrations: the SQL files of `deploy/clickhouse/`, applied in order and
//! recorded in `{database}.schema_migrations`, so `migrate` can run at every start.

use clickhouse::Client;

/// (version, file name, SQL) in order.
pub const MIGRATIONS: &[(u32, &str, &str)] = &[
    (1, "001_init.sql", include_str!("../../deploy/clickhouse/001_init.sql")),
    (2, "002_invoice_lines.sql", include_str!("../../deploy/clickhouse/002_invoice_lines.sql")),
    (3, "003_refunds.sql", include_str!("../../deploy/clickhouse/003_refunds.sql")),
    (4, "004_closed_months.sql", include_str!("../../deploy/clickhouse/004_closed_months.sql")),
    (5, "005_corrections_channels.sql", include_str!("../../deploy/clickhouse/005_corrections_channels.sql")),
    (6, "006_rated_allocations.sql", include_str!("../../deploy/clickhouse/006_rated_allocations.sql")),
];

/// Splits a migration file into statements (`;` at a line end), dropping comment-only lines.
pub fn statements(sql: &str, database: &str) -> Vec<String> {
    let mut out = Vec::new();
    let mut cur = String::new();
    for line in sql.lines() {
        let code = line.split("--").next().unwrap_or("");
        if code.trim().is_empty() {
            continue;
        }
        cur.push_str(code);
        cur.push('\n');
        if code.trim_end().ends_with(';') {
            let stmt = cur.trim().trim_end_matches(';').replace("{database}", database);
            out.push(stmt);
            cur.clear();
        }
    }
    if !cur.trim().is_empty() {
        out.push(cur.trim().replace("{database}", database));
    }
    out
}

/// Creates the database if needed and applies every migration not yet recorded. `client` must
/// not be bound to the database (it may not exist yet). Returns the versions applied now.
pub async fn migrate(client: &Client, database: &str) -> Result<Vec<u32>, clickhouse::error::Error> {
    if !database.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_') {
        return Err(clickhouse::error::Error::Custom(format!("database name `{database}` must be [A-Za-z0-9_]")));
    }
    client.query(&format!("CREATE DATABASE IF NOT EXISTS {database}")).execute().await?;
    client
        .query(&format!(
            "CREATE TABLE IF NOT EXISTS {database}.schema_migrations (version UInt32, name String, applied_at DateTime) ENGINE = TinyLog"
        ))
        .execute()
        .await?;
    let applied: Vec<u32> =
        client.query(&format!("SELECT version FROM {database}.schema_migrations")).fetch_all::<u32>().await?;
    let mut now_applied = Vec::new();
    for (version, name, sql) in MIGRATIONS {
        if applied.contains(version) {
            continue;
        }
        for stmt in statements(sql, database) {
            client.query(&stmt).execute().await?;
        }
        client
            .query(&format!(
                "INSERT INTO {database}.schema_migrations (version, name, applied_at) VALUES (?, ?, now())"
            ))
            .bind(*version)
            .bind(*name)
            .execute()
            .await?;
        now_applied.push(*version);
    }
    Ok(now_applied)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn migration_files_split_into_statements() {
        let s = statements(MIGRATIONS[0].2, "meterline");
        assert_eq!(s.len(), 4);
        assert!(s.iter().all(|x| x.starts_with("CREATE TABLE IF NOT EXISTS meterline.")));
        assert!(s.iter().all(|x| !x.contains("--") && !x.ends_with(';')));
        let s = statements(MIGRATIONS[1].2, "meterline");
        assert_eq!(s.len(), 2);
        assert!(s[1].starts_with("CREATE VIEW IF NOT EXISTS meterline.invoice_lines_current"));
        // 003: the ALTER and the view recreated, with no `?` (the client reads it as a bind
        // placeholder).
        let s = statements(MIGRATIONS[2].2, "meterline");
        assert_eq!(s.len(), 3);
        assert!(s[0].starts_with("ALTER TABLE meterline.invoice_lines") && s.iter().all(|x| !x.contains('?')));
        assert!(s[2].starts_with("CREATE VIEW IF NOT EXISTS meterline.invoice_lines_current"));
        let closed_months = MIGRATIONS.iter().find(|m| m.0 == 4).unwrap();
        let s = statements(closed_months.2, "meterline");
        assert_eq!(s.len(), 1);
        assert!(s[0].starts_with("CREATE TABLE IF NOT EXISTS meterline.closed_months"));
        // 005: the two ALTERs (corrections; the DSOR partner's columns), the view recreated.
        let s = statements(MIGRATIONS[4].2, "meterline");
        assert_eq!(s.len(), 4);
        assert!(
            s[0].starts_with("ALTER TABLE meterline.monthly_charges")
                && s[1].starts_with("ALTER TABLE meterline.invoice_lines")
        );
        assert!(s.iter().all(|x| !x.contains('?')));
        assert!(s[3].starts_with("CREATE VIEW IF NOT EXISTS meterline.invoice_lines_current"));
    }
}

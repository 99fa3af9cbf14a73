#!/usr/bin/env bash
# Supply-chain checks with cargo-deny (policy: deny.toml, SECURITY.md). Installs cargo-deny if
# missing (idempotent).
#   licenses, bans, sources: always (they need only Cargo.lock and the crates' metadata).
#   advisories: need the RustSec database, a git clone from GitHub. Where GitHub is not reachable
#   (this project's build machines reach package registries only), the check is skipped with a
#   loud notice unless METERLINE_REQUIRE_ADVISORIES=1, which makes it fail instead.
set -euo pipefail
cd "$(dirname "$0")/.."
CARGO_DENY_VERSION="0.20.2"
step() { printf '[deny] %s\n' "$*"; }

case "$(cargo deny --version 2>/dev/null || true)" in
    *"$CARGO_DENY_VERSION"*) ;;
    *)
        step "installing cargo-deny $CARGO_DENY_VERSION"
        cargo install --locked cargo-deny --version "$CARGO_DENY_VERSION"
        ;;
esac

cargo deny --all-features check licenses bans sources

if cargo deny fetch db; then
    # The database is here: advisories are checked strictly.
    cargo deny --all-features check advisories
    step "advisories: checked against the RustSec database"
elif [ "${METERLINE_REQUIRE_ADVISORIES:-0}" = "1" ]; then
    step "advisories: the RustSec database could not be fetched"
    exit 1
else
    step "advisories: NOT CHECKED: the RustSec database (github.com/rustsec/advisory-db) could not be fetched; set METERLINE_REQUIRE_ADVISORIES=1 where GitHub is reachable"
fi

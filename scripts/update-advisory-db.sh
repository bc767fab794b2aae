#!/usr/bin/env bash
# Refreshes data/advisory-db.tar.gz from the RustSec advisory database (needs GitHub), so that
# tests/tests/process/advisories.rs checks Cargo.lock against today's advisories. Commit the result.
set -euo pipefail
cd "$(dirname "$0")/.."
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
git clone --depth 1 --quiet https://github.com/rustsec/advisory-db "$tmp/db"
commit=$(git -C "$tmp/db" log -1 --format='%h %cs')
tar -C "$tmp/db" --sort=name --owner=0 --group=0 --numeric-owner -czf data/advisory-db.tar.gz LICENSE.txt crates
echo "data/advisory-db.tar.gz: advisory-db at $commit; update the commit in data/README.md"
